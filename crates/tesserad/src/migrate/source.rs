//! The source node's side: wait for the target to listen, tell the VM's VMM to migrate,
//! follow its figures into the task, and end the migration — the guest runs on the
//! target, or (failed, cancelled, timed out) it runs here again.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::{DesiredState, MigrationPhase, MigrationProgress, Task, TaskLog, TaskState, Vm};
use tessera_state::Node;

use super::progress::{self, Marks};
use super::{fail, record, swap, update_task, vmm_call, Held, Local, Migration};
use crate::now_ms;
use crate::records::table::{MIGRATIONS, VMS};
use crate::tables::{del, event, get};
use crate::vmrun::supervisor::{self, RunDir};

/// How long the target may take to listen.
const PREPARE_LIMIT: Duration = Duration::from_secs(30);
/// How long the target may hold the loaded VM before taking over.
const SWITCH_LIMIT: Duration = Duration::from_secs(30);

/// How a migration ended, as the source sees it.
enum Outcome {
    /// The guest runs on the target.
    Done {
        figures: MigrationProgress,
        note: Option<String>,
    },
    /// The guest runs here again (or its VMM died): why.
    Failed(String),
}

pub(super) async fn run(node: &Arc<Node>, local: &Local, m: Migration) {
    let dir = RunDir::new(&local.vmrun.data_dir, &m.vm);
    let sock = dir.api_socket();
    update_task(
        node,
        &m.task,
        |t| {
            if t.state == TaskState::Queued {
                t.state = TaskState::Running;
                t.progress = 5;
                note(t, format!("taken up by node {}", local.me));
            }
        },
        Vec::new(),
    )
    .await;
    // Beside the migration: the disk's hand-over once it switched over.
    let released = {
        let (node, local, m) = (node.clone(), local.clone(), m.clone());
        tokio::spawn(async move { super::release::source(&node, &local, &m).await })
    };
    let mut marks = Marks::new();
    let outcome = drive(node, local, &m, &sock, &mut marks).await;
    if released.is_finished() {
        marks.extend(released.await.unwrap_or_default());
    } else {
        released.abort();
    }
    finish(node, local, &m, &dir, outcome, &marks).await;
}

fn note(t: &mut Task, message: String) {
    t.log.push(TaskLog {
        time_ms: now_ms(),
        message,
    });
}

async fn drive(
    node: &Node,
    local: &Local,
    m: &Migration,
    sock: &Path,
    marks: &mut Marks,
) -> Outcome {
    let deadline = Instant::now() + PREPARE_LIMIT;
    let m = loop {
        match record(node, &m.vm, &m.task) {
            None => return Outcome::Failed("the migration's record is gone".into()),
            Some(r) if r.phase == MigrationPhase::Failed => {
                return Outcome::Failed(r.error.unwrap_or_else(|| "failed".into()))
            }
            Some(r) if r.phase != MigrationPhase::Preparing => break r,
            Some(_) => {}
        }
        if Instant::now() > deadline {
            let why = format!(
                "the target node {} did not get ready within {} s",
                m.to,
                PREPARE_LIMIT.as_secs()
            );
            return match fail(node, m, &why).await {
                Some(r) if r.phase == MigrationPhase::Failed => {
                    Outcome::Failed(r.error.unwrap_or(why))
                }
                _ => continue,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    local.vmrun.migrations.set(&m.vm, Held::Leaving);
    let m = if m.phase == MigrationPhase::Listening {
        let mut t = m.clone();
        t.phase = MigrationPhase::Transferring;
        if !swap(node, &m, &t, Vec::new()).await {
            let now = record(node, &m.vm, &m.task);
            return Outcome::Failed(
                now.and_then(|r| r.error)
                    .unwrap_or_else(|| "the migration changed meanwhile".into()),
            );
        }
        let tls = &local.vmrun.tls_dir;
        // Node certificates name the node's Raft id, as the Raft transport verifies them.
        let server_name =
            crate::replicated::raft_id(&tessera_cluster::identity::NodeId(t.to.clone()))
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    tessera_pki::node_dns_name(&tessera_state::network::cert_name(id))
                        .map_err(|e| e.to_string())
                });
        let server_name = match server_name {
            Ok(n) => n,
            Err(e) => return failed(node, &t, &e).await,
        };
        let op = json!({
            "type": "migrate",
            "to": t.listen,
            "server_name": server_name,
            "token": t.token,
            "tls_ca": tls.join("ca.crt"),
            "tls_cert": tls.join("node.crt"),
            "tls_key": tls.join("node.key"),
            "downtime_ms": t.downtime_ms,
            "max_bandwidth_kib_s": t.max_bandwidth_kib_s,
        });
        if let Err(e) = vmm_call(sock.to_path_buf(), op).await {
            return failed(
                node,
                &t,
                &format!("the VM's VMM did not start the migration: {e}"),
            )
            .await;
        }
        t
    } else {
        m
    };
    follow(node, &m, sock, marks).await
}

/// Fails the migration with `why`; the outcome is what won.
async fn failed(node: &Node, m: &Migration, why: &str) -> Outcome {
    match fail(node, m, why).await {
        Some(r) if r.phase == MigrationPhase::SwitchedOver => Outcome::Done {
            figures: MigrationProgress::default(),
            note: Some(why.to_string()),
        },
        Some(r) => Outcome::Failed(r.error.unwrap_or_else(|| why.to_string())),
        None => Outcome::Failed(why.to_string()),
    }
}

/// Whether the VM still wants what the migration started from (running, same start).
fn still_wanted(node: &Node, m: &Migration) -> bool {
    get::<Vm>(node, VMS, &m.vm).is_some_and(|v| {
        v.desired_state == DesiredState::Running
            && v.start_seq == m.start_seq
            && v.placed_on
                .as_deref()
                .is_some_and(|p| p == m.from || p == m.to)
    })
}

/// Follows the source VMM until the migration ends one way or the other; `marks` gets
/// its switch-over timeline.
async fn follow(node: &Node, m: &Migration, sock: &Path, marks: &mut Marks) -> Outcome {
    let mut last: Option<String> = None;
    let mut last_written = Instant::now() - Duration::from_secs(10);
    let mut switching_since: Option<Instant> = None;
    let mut figures = MigrationProgress::default();
    loop {
        let rec = record(node, &m.vm, &m.task);
        let rec_phase = rec.as_ref().map(|r| r.phase);
        let asked = json!({"type": "migration_status", "wait_ms": 1000, "phase": last});
        let st = match vmm_call(sock.to_path_buf(), asked).await {
            Ok(s) => s,
            Err(e) => {
                if rec_phase == Some(MigrationPhase::SwitchedOver) {
                    return Outcome::Done {
                        figures,
                        note: Some("the source VMM ended before it reported".into()),
                    };
                }
                return failed(node, m, &format!("the source VMM ended: {e}")).await;
            }
        };
        let phase = st["phase"].as_str().unwrap_or("").to_string();
        let vmm = progress::vmm_marks(&st, "vmm_");
        if !vmm.is_empty() {
            *marks = vmm;
        }
        figures = progress::figures(&m.from, &m.to, rec_phase.unwrap_or_default(), &st);
        if last.as_deref() != Some(phase.as_str())
            || last_written.elapsed() > Duration::from_secs(1)
        {
            let (line, pct, fig) = (
                (last.as_deref() != Some(phase.as_str()))
                    .then(|| progress::words(&phase, &st))
                    .flatten(),
                progress::percent(&phase, figures.iterations),
                figures.clone(),
            );
            update_task(
                node,
                &m.task,
                |t| {
                    t.progress = t.progress.max(pct);
                    if let Some(vt) = t.vm.as_mut() {
                        vt.migration = Some(fig.clone());
                    }
                    if let Some(l) = &line {
                        note(t, l.clone());
                    }
                },
                Vec::new(),
            )
            .await;
            last_written = Instant::now();
        }
        if phase == "switching_over" {
            switching_since.get_or_insert_with(Instant::now);
        }
        last = Some(phase.clone());
        let vmm_error = st["error"].as_str().unwrap_or("failed").to_string();
        match (rec_phase, phase.as_str()) {
            (_, "completed") => {
                return Outcome::Done {
                    figures,
                    note: None,
                }
            }
            (None | Some(MigrationPhase::Failed), p) => {
                let why = rec
                    .and_then(|r| r.error)
                    .unwrap_or_else(|| "the migration's record is gone".into());
                if !matches!(p, "failed" | "cancelled") {
                    resume_here(sock).await;
                }
                return Outcome::Failed(why);
            }
            (_, "failed" | "cancelled") => return failed(node, m, &vmm_error).await,
            (Some(MigrationPhase::SwitchedOver), "undecided") => {
                stop_here(sock).await;
                return Outcome::Done {
                    figures,
                    note: Some(format!(
                        "the source lost the target after sending everything ({vmm_error}); the target runs the guest"
                    )),
                };
            }
            (_, "undecided") => {
                let why = format!(
                    "the stream to the target broke after everything was sent: {vmm_error}"
                );
                return decide_after_sending(node, m, sock, &why).await;
            }
            (rp, "switching_over")
                if switching_since.is_some_and(|s| s.elapsed() > SWITCH_LIMIT) =>
            {
                if rp == Some(MigrationPhase::SwitchedOver) {
                    stop_here(sock).await;
                    return Outcome::Done {
                        figures,
                        note: Some("the target did not tell the source it runs the guest".into()),
                    };
                }
                let why = format!(
                    "the target did not take the VM over within {} s",
                    SWITCH_LIMIT.as_secs()
                );
                return decide_after_sending(node, m, sock, &why).await;
            }
            (Some(MigrationPhase::Transferring), _) if !still_wanted(node, m) => {
                // Fail first: the switch-over cannot commit after this.
                if let Outcome::Failed(w) =
                    failed(node, m, "the VM was stopped or restarted meanwhile").await
                {
                    resume_here(sock).await;
                    return Outcome::Failed(w);
                }
            }
            _ => {}
        }
    }
}

/// After the source VMM sent everything and then lost its way (the stream broke, or the
/// target never said it runs the guest): fails the migration with `why` if it did not
/// switch over yet, and the guest runs on here; else the target runs it and the VMM here
/// stops.
async fn decide_after_sending(node: &Node, m: &Migration, sock: &Path, why: &str) -> Outcome {
    match failed(node, m, why).await {
        Outcome::Failed(w) => {
            resume_here(sock).await;
            Outcome::Failed(w)
        }
        done => {
            stop_here(sock).await;
            done
        }
    }
}

/// Cancels the source VMM's migration: the guest runs on here.
async fn resume_here(sock: &Path) {
    if let Err(e) = vmm_call(sock.to_path_buf(), json!({"type": "migration_cancel"})).await {
        tracing::debug!(error = %e, "nothing to cancel in the source VMM");
    }
}

/// Stops the source VMM: the guest runs on the target.
async fn stop_here(sock: &Path) {
    if let Err(e) = vmm_call(sock.to_path_buf(), json!({"type": "power_off"})).await {
        tracing::warn!(error = %e, "could not power off the source VMM");
    }
}

async fn finish(
    node: &Node,
    local: &Local,
    m: &Migration,
    dir: &RunDir,
    outcome: Outcome,
    marks: &Marks,
) {
    let reg = &local.vmrun.migrations;
    let (ok, line, mut figures) = match outcome {
        Outcome::Done { figures, note } => {
            reg.set(&m.vm, Held::Left);
            // The VMM here ends by itself; one that hangs is killed.
            let pid = supervisor::find_running(dir, &reg.exits).map(|i| i.pid);
            if let Some(pid) = pid {
                let gone = wait_gone(pid, &reg.exits, Duration::from_secs(10)).await;
                if !gone {
                    tracing::warn!(vm = %m.vm, pid, "the source VMM did not exit after the migration; killing it");
                    supervisor::kill(pid);
                }
            }
            let downtime = figures
                .downtime_ms
                .map_or(String::new(), |d| format!(": downtime {d} ms"));
            let mut line = format!("VM {} moved from {} to {}{downtime}", m.vm, m.from, m.to);
            if let Some(n) = note {
                line.push_str(&format!(" ({n})"));
            }
            (true, line, figures)
        }
        Outcome::Failed(why) => {
            reg.clear(&m.vm);
            (
                false,
                format!("the VM runs on {}: {why}", m.from),
                MigrationProgress {
                    from: m.from.clone(),
                    to: m.to.clone(),
                    ..MigrationProgress::default()
                },
            )
        }
    };
    figures.phase = if ok {
        MigrationPhase::Done
    } else {
        MigrationPhase::Failed
    };
    let (kind, what) = if ok {
        ("vm.migrated", line.clone())
    } else {
        (
            "vm.migrate_failed",
            format!("live migration of VM {} to {} failed; {line}", m.vm, m.to),
        )
    };
    let extra = vec![
        event(kind, &m.vm, &m.user, &what),
        event(
            if ok { "task.succeeded" } else { "task.failed" },
            &m.task,
            &m.user,
            &format!("migration of VM {}: {line}", m.vm),
        ),
        del(MIGRATIONS, &m.vm),
    ];
    let now = now_ms();
    update_task(
        node,
        &m.task,
        |t| {
            t.state = if ok {
                TaskState::Succeeded
            } else {
                TaskState::Failed
            };
            t.progress = 100;
            t.finished_ms = Some(now);
            if !ok {
                t.error = Some(line.clone());
            }
            if let Some(vt) = t.vm.as_mut() {
                if ok || vt.migration.is_none() {
                    vt.migration = Some(figures.clone());
                } else if let Some(f) = vt.migration.as_mut() {
                    f.phase = MigrationPhase::Failed;
                }
            }
            if let Some(l) = ok
                .then(|| progress::timeline_line("source", marks))
                .flatten()
            {
                note(t, l);
            }
            note(t, format!("{}: {line}", if ok { "done" } else { "failed" }));
        },
        extra,
    )
    .await;
    tracing::info!(vm = %m.vm, task = %m.task, ok, %line, "live migration ended");
}

/// Waits until process `pid` is gone, at most `limit`; whether it is.
async fn wait_gone(pid: u32, exits: &supervisor::Exits, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !supervisor::alive(pid, exits) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !supervisor::alive(pid, exits)
}
