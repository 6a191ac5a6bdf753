//! Long operations: listed, shown with their log, and followed to their end.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;
use tessera_api::{Task, TaskState};

use crate::args::TaskCmd;
use crate::client::{decode, Client};
use crate::endpoints::{TASK, TASKS};
use crate::node_names::NodeNames;
use crate::output::{col, table, utc, word, Output};

/// How long `watch` follows a task before it gives up (the task goes on).
const PATIENCE: Duration = Duration::from_secs(3600);

pub fn run(client: &Client, cmd: TaskCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        TaskCmd::Ls => {
            let v = client.call(TASKS, &[], None)?;
            out.show(TASKS, &v, |tasks: Vec<Task>| {
                table(
                    &tasks,
                    &[
                        col("ID", |t: &Task| t.id.clone()),
                        col("STATE", |t: &Task| word(&t.state)),
                        col("PROGRESS", |t: &Task| t.progress.to_string()),
                        col("USER", |t: &Task| t.user.clone()),
                        col("OPERATION", operation),
                    ],
                    out.wide(),
                )
            })?;
        }
        TaskCmd::Show { id } => {
            let v = client.call(TASK, &[&id], None)?;
            show(client, &v, out)?;
        }
        TaskCmd::Watch { id } => {
            let (v, t) = watch(client, &id, !out.is_json())?;
            show(client, &v, out)?;
            succeeded(&t)?;
        }
    }
    Ok(())
}

/// What a task does in a word or two: the store operation, or the VM request and its VM.
fn operation(t: &Task) -> String {
    match &t.vm {
        Some(v) => format!("vm_{} {}", word(&v.action), v.vm),
        None => word(&t.op),
    }
}

/// Prints a task (as the API sent it) with its log, its node by name.
pub fn show(client: &Client, v: &Value, out: Output) -> anyhow::Result<()> {
    if out.is_json() {
        out.print(v, |_| {});
        return Ok(());
    }
    let t: Task = decode(TASK, v)?;
    let node = NodeNames::fetch(client)?.name(&t.node);
    println!("task:     {}", t.id);
    println!("op:       {}", operation(&t));
    println!("state:    {}", word(&t.state));
    println!("progress: {}%", t.progress);
    println!("node:     {node}");
    if out.wide() {
        println!("node id:  {}", t.node);
    }
    if let Some(e) = &t.error {
        println!("error:    {e}");
    }
    for l in &t.log {
        println!("  {}  {}", utc(l.time_ms), l.message);
    }
    Ok(())
}

/// Polls a task until it ends; with `bar`, draws its progress on standard error.
/// Returns the last answer as sent and as read.
pub fn watch(client: &Client, id: &str, bar: bool) -> anyhow::Result<(Value, Task)> {
    let started = Instant::now();
    loop {
        let v = client.call(TASK, &[id], None)?;
        let t: Task = decode(TASK, &v)?;
        let state = word(&t.state);
        let pct = usize::from(t.progress.min(100));
        if bar {
            let filled = pct * 30 / 100;
            eprint!(
                "\r[{}{}] {pct:>3}% {state:<10}",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
        }
        if matches!(t.state, TaskState::Succeeded | TaskState::Failed) {
            if bar {
                eprintln!();
            }
            return Ok((v, t));
        }
        if started.elapsed() > PATIENCE {
            bail!("task {id} is still {state} after an hour; it goes on (tessera task watch {id})");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits for the task in `v` (a task record) unless `no_wait`; fails if it fails.
/// Returns the task as the API last sent it.
pub fn follow(client: &Client, v: Value, no_wait: bool, bar: bool) -> anyhow::Result<Value> {
    let queued: Task = decode(TASK, &v)?;
    if no_wait {
        return Ok(v);
    }
    let (v, t) = watch(client, &queued.id, bar)?;
    succeeded(&t)?;
    Ok(v)
}

/// Shows the task's id and state.
pub fn done(v: &Value) {
    match decode::<Task>(TASK, v) {
        Ok(t) => println!("task {} {}", t.id, word(&t.state)),
        Err(e) => eprintln!("{e:#}"),
    }
}

fn succeeded(t: &Task) -> anyhow::Result<()> {
    if t.state != TaskState::Succeeded {
        bail!(
            "task {} failed: {}",
            t.id,
            t.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}
