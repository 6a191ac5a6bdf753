//! The task runner: every node runs the queued tasks assigned to it (the node whose store
//! holds the volume), against its local `tessera-store` admin socket, and records the
//! outcome together with the records it changes in one transaction.
//!
//! A task is picked up by a compare-and-swap from `queued` to `running`, so it runs once
//! even if the runner scans twice. A task found `running` when the runner starts was cut
//! off by a restart of this node: it is marked failed with that reason rather than
//! re-run blindly (the store's own state stays authoritative; the volume record keeps
//! its transitional state so an operator sees it, and the API lets an operator delete a
//! volume whose task ended that way).
//!
//! A queued task for a node that is down (silent on the management network, see
//! [`crate::health`]) is failed by the leader after [`DOWN_NODE_GRACE`] with a message
//! naming the node, and what it reserved is released as for any failure: a client waiting
//! for it gets an answer instead of waiting for the node forever. A task the node already
//! runs is left to it (it may still be working, cut off); it ends when the node is back.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tessera_state::{Command, Node, Require};
use tessera_store::admin_client::{AdminClient, AdminClientError};
use tessera_store_admin::ErrorKind;

use crate::now_ms;
use crate::records::table::{SNAPSHOTS, TASKS, VOLUMES};
use crate::records::{
    snapshot_key, Snapshot, Task, TaskLog, TaskOp, TaskState, Volume, VolumeState,
};
use crate::tables::{del, event, get, put, Table};

/// How long a queued task waits for its node to be up before the leader fails it.
pub const DOWN_NODE_GRACE: Duration = Duration::from_secs(10);

/// The management network's view of the peers (last heard, by node id), once the daemon
/// has one; without it no task is failed for its node being down.
static HEARD: std::sync::OnceLock<crate::Heard> = std::sync::OnceLock::new();

/// Lets the runner see which nodes are down.
pub fn watch_health(heard: crate::Heard) {
    let _ = HEARD.set(heard);
}

fn log(t: &mut Task, message: impl Into<String>) {
    t.log.push(TaskLog {
        time_ms: now_ms(),
        message: message.into(),
    });
}

/// Starts the runner for node `me`, using the store at `admin_socket`.
pub fn start(node: Arc<Node>, me: String, admin_socket: PathBuf) {
    crate::replication::start(node.clone(), me.clone(), admin_socket.clone());
    tokio::spawn(async move {
        let inflight: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut rx = node.state.subscribe();
        fail_interrupted(&node, &me).await;
        let started = std::time::Instant::now();
        let mut last_trim = std::time::Instant::now();
        // The tasks table as last scanned: most changes of the state are elsewhere, and a
        // persistent map that did not change is the same pointer.
        let mut seen: Option<Table> = None;
        loop {
            let tasks = node
                .state
                .read(|t| t.get(TASKS).cloned())
                .unwrap_or_default();
            let changed = !seen.as_ref().is_some_and(|s| s.ptr_eq(&tasks));
            let queued: Vec<Task> = if changed {
                tasks
                    .values()
                    .filter(|v| v["node"] == me.as_str() && v["state"] == "queued")
                    // VM tasks ask no store: the reconciler follows them.
                    .filter(|v| v["vm"].is_null())
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
                crate::housekeeping::sweep(&node).await;
                // Right after this node started it has heard nobody yet: not "down".
                if started.elapsed() > DOWN_NODE_GRACE {
                    fail_tasks_of_down_nodes(&node, &me).await;
                }
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
        t.get(TASKS)
            .map(|tasks| {
                tasks
                    .values()
                    .filter_map(|v| serde_json::from_value::<Task>(v.clone()).ok())
                    .filter(|t| t.node == me && t.state == TaskState::Running)
                    // A VM task follows the VM's reported state, which a restart keeps;
                    // a copy task follows its copy's record (the leader moves it).
                    .filter(|t| t.vm.is_none() && t.copy.is_none())
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
            vec![Require::equals(TASKS, &t.id, json!(old))],
            vec![
                put(TASKS, &t.id, &t),
                event("task.failed", &t.id, "tesserad", "interrupted by a restart"),
            ],
        )
        .await;
    }
}

async fn run(node: &Node, me: &str, socket: &std::path::Path, queued: Task) {
    let mut t = queued.clone();
    t.state = TaskState::Running;
    t.progress = 10;
    log(&mut t, format!("started on node {me}"));
    let claimed = commit_until_applied(
        node,
        vec![Require::equals(TASKS, &t.id, json!(queued))],
        vec![put(TASKS, &t.id, &t)],
    )
    .await;
    if !claimed {
        return;
    }
    let op = t.op.clone();
    log(
        &mut t,
        format!("asking tessera-store ({})", socket.display()),
    );
    let sock = socket.to_path_buf();
    // A replicated volume's create and delete steps are the replication module's.
    let result = match crate::replication::roles::run_task(node, me, socket, &t).await {
        Some(r) => r,
        None => tokio::task::spawn_blocking(move || AdminClient::connect(&sock)?.call(op))
            .await
            .unwrap_or_else(|e| {
                Err(AdminClientError::Protocol(format!(
                    "the store call panicked: {e}"
                )))
            }),
    };
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
    // The size the store reports for a volume it grew or cloned is the one to record.
    let size = match &result {
        Ok(tessera_store_admin::AdminReply::Volume(info)) => Some(info.size),
        _ => None,
    };
    let mut ops = outcome_ops(node, &t.op, ok, size);
    let now = now_ms();
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
    ops.push(put(TASKS, &t.id, &t));
    ops.push(event(kind, &t.id, &t.user, &message));
    commit_until_applied(node, vec![Require::exists(TASKS, &t.id)], ops).await;
    tracing::info!(task = %t.id, state = ?t.state, "task finished");
}

/// The changes to the records a task reserved once it ended, successfully (`ok`) or not;
/// `size`: the volume's size as the store answered it, if it did.
fn outcome_ops(node: &Node, op: &TaskOp, ok: bool, size: Option<u64>) -> Vec<Command> {
    let mut ops = Vec::new();
    match (op, ok) {
        (TaskOp::CreateVolume { name, .. } | TaskOp::CloneSnapshot { name, .. }, true) => {
            if let Some(mut v) = get::<Volume>(node, VOLUMES, name) {
                v.state = VolumeState::Ready;
                // A clone has its snapshot's size, smaller than the volume's when the
                // volume grew after the snapshot.
                if let (TaskOp::CloneSnapshot { .. }, Some(s)) = (op, size) {
                    v.size_bytes = s;
                }
                ops.push(put(VOLUMES, name, &v));
            }
        }
        (TaskOp::CreateVolume { name, .. } | TaskOp::CloneSnapshot { name, .. }, false) => {
            ops.push(del(VOLUMES, name));
            // The copies other nodes made for it are nobody's now.
            if let Some(v) = get::<Volume>(node, VOLUMES, name) {
                ops.extend(crate::replication::orphans::after_failed_create(node, &v));
            }
        }
        (TaskOp::DeleteVolume { name }, true) => {
            ops.push(del(VOLUMES, name));
            // A replicated volume's other copies are deleted by their own nodes, whenever
            // their stores answer.
            if let Some(v) = get::<Volume>(node, VOLUMES, name) {
                ops.extend(crate::replication::orphans::after_delete(&v, &v.node));
            }
            let prefix = format!("{name}@");
            let snaps: Vec<String> = node.state.read(|tb| {
                tb.get(SNAPSHOTS)
                    .map(|s| {
                        s.keys()
                            .filter(|k| k.starts_with(&prefix))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default()
            });
            ops.extend(snaps.iter().map(|k| del(SNAPSHOTS, k)));
        }
        (TaskOp::DeleteVolume { name }, false) => {
            if let Some(mut v) = get::<Volume>(node, VOLUMES, name) {
                v.state = VolumeState::Ready;
                ops.push(put(VOLUMES, name, &v));
            }
        }
        (TaskOp::CreateSnapshot { volume, snapshot }, true)
        | (TaskOp::DeleteSnapshot { volume, snapshot }, false) => {
            let key = snapshot_key(volume, snapshot);
            if let Some(mut s) = get::<Snapshot>(node, SNAPSHOTS, &key) {
                s.state = VolumeState::Ready;
                ops.push(put(SNAPSHOTS, &key, &s));
            }
        }
        (TaskOp::CreateSnapshot { volume, snapshot }, false)
        | (TaskOp::DeleteSnapshot { volume, snapshot }, true) => {
            ops.push(del(SNAPSHOTS, &snapshot_key(volume, snapshot)));
        }
        (TaskOp::ResizeVolume { name, size: asked }, true) => {
            // Two resizes may run at once: the store keeps the larger (it never
            // shrinks), and so does the record, whichever task ends last.
            if let Some(mut v) = get::<Volume>(node, VOLUMES, name) {
                v.size_bytes = v.size_bytes.max(size.unwrap_or(*asked));
                ops.push(put(VOLUMES, name, &v));
            }
        }
        // Queries, a refused resize, a scrub and a replication role (the store's own
        // state) change no record.
        (
            TaskOp::ResizeVolume { .. }
            | TaskOp::SetReplication { .. }
            | TaskOp::ListVolumes {}
            | TaskOp::VolumeInfo { .. }
            | TaskOp::Scrub {}
            | TaskOp::Status {}
            | TaskOp::ReplicationStatus {},
            _,
        ) => {}
    }
    ops
}

/// On the leader: fails the queued tasks of nodes down for longer than
/// [`DOWN_NODE_GRACE`] (and older than it), releasing what they reserved.
async fn fail_tasks_of_down_nodes(node: &Node, me: &str) {
    let Some(heard) = HEARD.get() else {
        return;
    };
    let now = now_ms();
    let grace_ms = DOWN_NODE_GRACE.as_millis() as u64;
    let queued: Vec<Task> = node.state.read(|t| {
        t.get(TASKS)
            .map(|tasks| {
                tasks
                    .values()
                    .filter(|v| v["state"] == "queued" && v["node"] != me)
                    .filter_map(|v| serde_json::from_value::<Task>(v.clone()).ok())
                    .filter(|t| now.saturating_sub(t.created_ms) > grace_ms)
                    .collect()
            })
            .unwrap_or_default()
    });
    if queued.is_empty() {
        return;
    }
    let silent: std::collections::HashMap<String, Option<Duration>> = {
        let h = heard.lock().unwrap_or_else(|p| p.into_inner());
        queued
            .iter()
            .map(|t| (t.node.clone(), h.get(&t.node).map(|i| i.elapsed())))
            .collect()
    };
    for old in queued {
        let quiet = silent.get(&old.node).copied().flatten();
        if crate::health::state(quiet) != "down" || quiet.is_some_and(|q| q < DOWN_NODE_GRACE) {
            continue;
        }
        let name = node
            .state
            .read(|t| {
                t.get(crate::records::table::NODES)
                    .and_then(|n| n.get(&old.node))
                    .and_then(|r| r["name"].as_str().map(str::to_string))
            })
            .unwrap_or_else(|| old.node.clone());
        let msg = match quiet {
            Some(q) => format!(
                "{name} is down (not heard for {} s); the task did not start there and was \
                 cancelled",
                q.as_secs()
            ),
            None => format!(
                "{name} is down (not heard since this leader started); the task did not start \
                 there and was cancelled"
            ),
        };
        let mut t = old.clone();
        t.state = TaskState::Failed;
        t.error = Some(msg.clone());
        t.finished_ms = Some(now_ms());
        t.progress = 100;
        log(&mut t, format!("failed: {msg}"));
        let mut ops = outcome_ops(node, &t.op, false, None);
        ops.push(put(TASKS, &t.id, &t));
        ops.push(event(
            "task.failed",
            &t.id,
            &t.user,
            &format!("{} failed: {msg}", t.op.describe()),
        ));
        // Only if the node did not claim it meanwhile (it may just have come back).
        let txn = Command::Txn {
            require: vec![Require::equals(TASKS, &t.id, json!(old))],
            ops,
        };
        match node.write(txn).await {
            Ok(a) if a.conflict.is_none() => {
                tracing::warn!(task = %t.id, node = %name, "task failed: its node is down")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "failing a task of a down node: not yet"),
        }
    }
}
