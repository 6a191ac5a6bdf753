//! The task runner: every node runs the queued tasks assigned to it (the node whose store
//! holds the volume), against its local `tessera-store` admin socket, and records the
//! outcome together with the records it changes in one transaction.
//!
//! A task is picked up by a compare-and-swap from `queued` to `running`, so it runs once
//! even if the runner scans twice. A task found `running` when the runner starts was cut
//! off by a restart of this node: it is marked failed with that reason rather than
//! re-run blindly (the store's own state stays authoritative; the volume record keeps
//! its transitional state so an operator sees it).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tessera_state::{Command, Node, Require};
use tessera_store_admin::{AdminOp, ErrorKind};
use tessera_store::admin_client::{AdminClient, AdminClientError};

use crate::api::{del, event, get, put};
use crate::now_ms;
use crate::records::{
    snapshot_key, Snapshot, Task, TaskLog, TaskOp, TaskState, Volume, VolumeState,
};

fn log(t: &mut Task, message: impl Into<String>) {
    t.log.push(TaskLog {
        time_ms: now_ms(),
        message: message.into(),
    });
}

/// Starts the runner for node `me`, using the store at `admin_socket`.
pub fn start(node: Arc<Node>, me: String, admin_socket: PathBuf) {
    tokio::spawn(async move {
        let inflight: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut rx = node.state.subscribe();
        fail_interrupted(&node, &me).await;
        let mut last_trim = std::time::Instant::now();
        // The tasks table as last scanned: most changes of the state are elsewhere, and a
        // persistent map that did not change is the same pointer.
        let mut seen: Option<crate::api::Table> = None;
        loop {
            let tasks = node
                .state
                .read(|t| t.get("tasks").cloned())
                .unwrap_or_default();
            let changed = !seen.as_ref().is_some_and(|s| s.ptr_eq(&tasks));
            let queued: Vec<Task> = if changed {
                tasks
                    .values()
                    .filter(|v| v["node"] == me.as_str() && v["state"] == "queued")
                    .filter_map(|v| serde_json::from_value::<Task>(v.clone()).ok())
                    .collect()
            } else {
                Vec::new()
            };
            seen = Some(tasks);
            for t in queued {
                if !inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(t.id.clone())
                {
                    continue;
                }
                let (node, me, sock, inflight) = (
                    node.clone(),
                    me.clone(),
                    admin_socket.clone(),
                    inflight.clone(),
                );
                tokio::spawn(async move {
                    let id = t.id.clone();
                    run(&node, &me, &sock, t).await;
                    inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                });
            }
            let leader = node.raft.metrics().borrow().current_leader == Some(node.id);
            if leader && last_trim.elapsed() > Duration::from_secs(1) {
                last_trim = std::time::Instant::now();
                crate::api::trim_events(&node).await;
                crate::api::purge_expired(&node).await;
                purge_finished(&node).await;
            }
            // Wake on any change of the state, or every 2 s for the periodic work.
            if tokio::time::timeout(Duration::from_secs(2), rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
    });
}

/// Commits `txn` until it is applied (the outcome of work already done must not be lost
/// to a leader election); returns whether its requirements held.
async fn commit_until_applied(node: &Node, require: Vec<Require>, ops: Vec<Command>) -> bool {
    let txn = Command::Txn { require, ops };
    let mut wait = Duration::from_millis(200);
    loop {
        match node.write(txn.clone()).await {
            Ok(a) => return a.conflict.is_none(),
            Err(e) => {
                tracing::warn!(error = %e, "task outcome not recorded yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn fail_interrupted(node: &Node, me: &str) {
    // The local copy may lag right after a restart; catch up first (best effort).
    let _ = node.sync().await;
    let running: Vec<Task> = node.state.read(|t| {
        t.get("tasks")
            .map(|tasks| {
                tasks
                    .values()
                    .filter_map(|v| serde_json::from_value::<Task>(v.clone()).ok())
                    .filter(|t| t.node == me && t.state == TaskState::Running)
                    .collect()
            })
            .unwrap_or_default()
    });
    for old in running {
        let mut t = old.clone();
        t.state = TaskState::Failed;
        t.error = Some("interrupted: tesserad restarted while the task ran".into());
        t.finished_ms = Some(now_ms());
        log(&mut t, "interrupted by a restart of tesserad on this node");
        commit_until_applied(
            node,
            vec![Require::equals("tasks", &t.id, json!(old))],
            vec![
                put("tasks", &t.id, &t),
                event("task.failed", &t.id, "tesserad", "interrupted by a restart"),
            ],
        )
        .await;
    }
}

fn store_op(op: &TaskOp) -> AdminOp {
    match op.clone() {
        TaskOp::CreateVolume { name, size_bytes } => AdminOp::CreateVolume {
            name,
            size: size_bytes,
        },
        TaskOp::DeleteVolume { name } => AdminOp::DeleteVolume { name },
        TaskOp::CreateSnapshot { volume, snapshot } => AdminOp::CreateSnapshot { volume, snapshot },
        TaskOp::DeleteSnapshot { volume, snapshot } => AdminOp::DeleteSnapshot { volume, snapshot },
        TaskOp::CloneSnapshot {
            volume,
            snapshot,
            name,
        } => AdminOp::CloneSnapshot {
            volume,
            snapshot,
            name,
        },
    }
}

async fn run(node: &Node, me: &str, socket: &std::path::Path, queued: Task) {
    let mut t = queued.clone();
    t.state = TaskState::Running;
    t.progress = 10;
    log(&mut t, format!("started on node {me}"));
    let claimed = commit_until_applied(
        node,
        vec![Require::equals("tasks", &t.id, json!(queued))],
        vec![put("tasks", &t.id, &t)],
    )
    .await;
    if !claimed {
        return;
    }
    let op = store_op(&t.op);
    log(
        &mut t,
        format!("asking tessera-store ({})", socket.display()),
    );
    let sock = socket.to_path_buf();
    let result = tokio::task::spawn_blocking(move || AdminClient::connect(&sock)?.call(op))
        .await
        .unwrap_or_else(|e| {
            Err(AdminClientError::Protocol(format!(
                "the store call panicked: {e}"
            )))
        });
    // A delete of something the store no longer has reached its goal.
    let gone_already = matches!(&result, Err(AdminClientError::Refused(e)) if e.kind == ErrorKind::NotFound)
        && matches!(
            t.op,
            TaskOp::DeleteVolume { .. } | TaskOp::DeleteSnapshot { .. }
        );
    let ok = result.is_ok() || gone_already;
    if gone_already {
        log(&mut t, "the store did not have it any more");
    }
    let mut ops = Vec::new();
    let now = now_ms();
    match (&t.op, ok) {
        (TaskOp::CreateVolume { name, .. } | TaskOp::CloneSnapshot { name, .. }, true) => {
            if let Some(mut v) = get::<Volume>(node, "volumes", name) {
                v.state = VolumeState::Ready;
                ops.push(put("volumes", name, &v));
            }
        }
        (TaskOp::CreateVolume { name, .. } | TaskOp::CloneSnapshot { name, .. }, false) => {
            ops.push(del("volumes", name));
        }
        (TaskOp::DeleteVolume { name }, true) => {
            ops.push(del("volumes", name));
            let prefix = format!("{name}@");
            let snaps: Vec<String> = node.state.read(|tb| {
                tb.get("snapshots")
                    .map(|s| {
                        s.keys()
                            .filter(|k| k.starts_with(&prefix))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default()
            });
            ops.extend(snaps.iter().map(|k| del("snapshots", k)));
        }
        (TaskOp::DeleteVolume { name }, false) => {
            if let Some(mut v) = get::<Volume>(node, "volumes", name) {
                v.state = VolumeState::Ready;
                ops.push(put("volumes", name, &v));
            }
        }
        (TaskOp::CreateSnapshot { volume, snapshot }, true)
        | (TaskOp::DeleteSnapshot { volume, snapshot }, false) => {
            let key = snapshot_key(volume, snapshot);
            if let Some(mut s) = get::<Snapshot>(node, "snapshots", &key) {
                s.state = VolumeState::Ready;
                ops.push(put("snapshots", &key, &s));
            }
        }
        (TaskOp::CreateSnapshot { volume, snapshot }, false)
        | (TaskOp::DeleteSnapshot { volume, snapshot }, true) => {
            ops.push(del("snapshots", &snapshot_key(volume, snapshot)));
        }
    }
    t.progress = 100;
    t.finished_ms = Some(now);
    let what = t.op.describe();
    match &result {
        Ok(_) => log(&mut t, "done"),
        Err(_) if gone_already => log(&mut t, "done"),
        Err(e) => {
            let msg = e.to_string();
            log(&mut t, format!("failed: {msg}"));
            t.error = Some(msg);
        }
    }
    t.state = if ok {
        TaskState::Succeeded
    } else {
        TaskState::Failed
    };
    let kind = if ok { "task.succeeded" } else { "task.failed" };
    let message = match &t.error {
        None => format!("{what} done"),
        Some(e) => format!("{what} failed: {e}"),
    };
    ops.push(put("tasks", &t.id, &t));
    ops.push(event(kind, &t.id, &t.user, &message));
    commit_until_applied(node, vec![Require::exists("tasks", &t.id)], ops).await;
    tracing::info!(task = %t.id, state = ?t.state, "task finished");
}

/// How long finished tasks are kept.
const KEEP_FINISHED_MS: u64 = 7 * 24 * 3600 * 1000;

/// The deletions of tasks that finished more than `keep_ms` before `now_ms` (at most `max`).
fn finished_to_drop(
    tables: &tessera_state::Tables,
    now_ms: u64,
    keep_ms: u64,
    max: usize,
) -> Vec<Command> {
    tables
        .get("tasks")
        .map(|tasks| {
            tasks
                .iter()
                .filter(|(_, v)| {
                    v["finished_ms"]
                        .as_u64()
                        .is_some_and(|f| now_ms.saturating_sub(f) > keep_ms)
                })
                .take(max)
                .map(|(k, _)| del("tasks", k))
                .collect()
        })
        .unwrap_or_default()
}

/// The leader drops tasks finished more than a week ago.
async fn purge_finished(node: &Node) {
    let ops = node
        .state
        .read(|t| finished_to_drop(t, now_ms(), KEEP_FINISHED_MS, 500));
    if ops.is_empty() {
        return;
    }
    if let Err(e) = node
        .write(Command::Txn {
            require: vec![],
            ops,
        })
        .await
    {
        tracing::debug!(error = %e, "purging finished tasks failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tasks_finished_long_ago_are_dropped() {
        let mut tasks = imbl::OrdMap::new();
        tasks.insert("old".to_string(), json!({ "finished_ms": 1_000 }));
        tasks.insert("recent".to_string(), json!({ "finished_ms": 9_500 }));
        tasks.insert("running".to_string(), json!({ "finished_ms": null }));
        let mut tables = tessera_state::Tables::new();
        tables.insert("tasks".to_string(), tasks);
        assert_eq!(
            finished_to_drop(&tables, 10_000, 1_000, 100),
            vec![del("tasks", "old")]
        );
        assert!(finished_to_drop(&tables, 10_000, 1_000, 0).is_empty());
    }
}
