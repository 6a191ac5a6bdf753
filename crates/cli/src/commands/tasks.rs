//! Long operations: listed, shown with their log, and followed to their end.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::args::TaskCmd;
use crate::client::Client;
use crate::endpoints::{TASK, TASKS};
use crate::node_names::NodeNames;
use crate::output::{col, field, table, utc, Output};

/// How long `watch` follows a task before it gives up (the task goes on).
const PATIENCE: Duration = Duration::from_secs(3600);

pub fn run(client: &Client, cmd: TaskCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        TaskCmd::Ls => {
            let v = client.call(TASKS, &[], None)?;
            out.print(&v, |v| {
                let rows = v.as_array().cloned().unwrap_or_default();
                table(
                    &rows,
                    &[
                        col("ID", |t: &Value| field(t, "id")),
                        col("STATE", |t: &Value| field(t, "state")),
                        col("PROGRESS", |t: &Value| field(t, "progress")),
                        col("USER", |t: &Value| field(t, "user")),
                        col("OPERATION", |t: &Value| field(t, "op.type")),
                    ],
                    out.wide(),
                )
            });
        }
        TaskCmd::Show { id } => {
            let v = client.call(TASK, &[&id], None)?;
            show(client, &v, out)?;
        }
        TaskCmd::Watch { id } => {
            let v = watch(client, &id, !out.is_json())?;
            show(client, &v, out)?;
            succeeded(&id, &v)?;
        }
    }
    Ok(())
}

/// Prints a task with its log, its node by name.
pub fn show(client: &Client, v: &Value, out: Output) -> anyhow::Result<()> {
    if out.is_json() {
        out.print(v, |_| {});
        return Ok(());
    }
    let node = NodeNames::fetch(client)?.name_of(&v["node"]);
    println!("task:     {}", field(v, "id"));
    println!("state:    {}", field(v, "state"));
    println!("progress: {}%", field(v, "progress"));
    println!("node:     {node}");
    if out.wide() {
        println!("node id:  {}", field(v, "node"));
    }
    if let Some(e) = v["error"].as_str() {
        println!("error:    {e}");
    }
    for l in v["log"].as_array().into_iter().flatten() {
        println!("  {}  {}", utc(&l["time_ms"]), field(l, "message"));
    }
    Ok(())
}

/// Polls a task until it ends; with `bar`, draws its progress on standard error.
pub fn watch(client: &Client, id: &str, bar: bool) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let v = client.call(TASK, &[id], None)?;
        let state = v["state"].as_str().unwrap_or("?").to_string();
        let pct = v["progress"].as_u64().unwrap_or(0).min(100) as usize;
        if bar {
            let filled = pct * 30 / 100;
            eprint!(
                "\r[{}{}] {pct:>3}% {state:<10}",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
        }
        if state == "succeeded" || state == "failed" {
            if bar {
                eprintln!();
            }
            return Ok(v);
        }
        if started.elapsed() > PATIENCE {
            bail!("task {id} is still {state} after an hour; it goes on (tessera task watch {id})");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits for the task in `v` (a task record) unless `no_wait`; fails if it fails.
pub fn follow(client: &Client, v: Value, no_wait: bool, bar: bool) -> anyhow::Result<Value> {
    let id = v["id"]
        .as_str()
        .context("no task id in the answer")?
        .to_string();
    if no_wait {
        return Ok(v);
    }
    let t = watch(client, &id, bar)?;
    succeeded(&id, &t)?;
    Ok(t)
}

fn succeeded(id: &str, t: &Value) -> anyhow::Result<()> {
    if t["state"] != "succeeded" {
        bail!(
            "task {id} failed: {}",
            t["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(())
}
