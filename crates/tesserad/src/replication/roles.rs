//! The stores' roles: the steps of creating and deleting a replicated volume that the
//! task runner hands here ([`run_task`]), and the per-node reconciler that keeps the local
//! store's role of every volume with a copy here equal to the cluster state.
//!
//! Creation, in order: every replica's node creates its copy and makes it a `replica` of
//! the volume's generation (a task each); the primary's node creates its copy, waits for
//! those tasks to succeed, and only then makes its copy the `primary` with them as its
//! in-sync replicas: its create task succeeds (and the volume becomes ready) only then.
//!
//! A store's primary must never start twice in one generation (the replicas count its
//! writes by sequence number within a generation). So this process remembers what it told
//! its store; a role it does not know it gave (after a restart of `tesserad` or of the
//! store) is given again as a primary only after the volume's generation was raised
//! through the cluster state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::CopyState;
use tessera_state::{Command, Node, Require};
use tessera_store::admin_client::{AdminClient, AdminClientError};
use tessera_store_admin::{AdminOp, AdminReply, ErrorKind, ReplicaPeer, ReplicationRole};

use super::{node_records, repl_addr, volumes, REPLICA_TIMEOUT_MS, ROUND};
use crate::records::table::{TASKS, VOLUMES};
use crate::records::{Task, TaskOp, TaskState, Volume, VolumeState};
use crate::tables::{event, get, put};

/// How long the primary's create step waits for the replicas' copies.
const REPLICAS_WAIT: Duration = Duration::from_secs(90);
/// How long one admin call may take (a primary's role may wait for its driver).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The role this process last gave its store, per volume: (generation, role).
type Applied = Mutex<HashMap<String, (u64, ReplicationRole)>>;

fn applied() -> &'static Applied {
    static APPLIED: OnceLock<Applied> = OnceLock::new();
    APPLIED.get_or_init(Applied::default)
}

fn remember(volume: &str, generation: u64, role: &ReplicationRole) {
    applied()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(volume.to_string(), (generation, role.clone()));
}

fn forget(volume: &str) {
    applied()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(volume);
}

/// One admin call to the store at `socket`, off the async workers, bounded.
async fn call(socket: &Path, op: AdminOp) -> Result<AdminReply, AdminClientError> {
    let sock = socket.to_path_buf();
    let asked = tokio::task::spawn_blocking(move || {
        let mut c = AdminClient::connect(&sock)?;
        c.set_timeout(Some(CALL_TIMEOUT))?;
        c.call(op)
    });
    match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(5), asked).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(AdminClientError::Protocol(format!(
            "the store call failed: {e}"
        ))),
        Err(_) => Err(AdminClientError::Protocol(format!(
            "the store did not answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

fn failed(msg: String) -> AdminClientError {
    AdminClientError::Protocol(msg)
}

/// The role the cluster state gives `me`'s copy of `v` (`None`: none to give: not a copy
/// here, or one out of sync, which takes no writes until caught up).
pub fn desired(
    v: &Volume,
    me: &str,
    records: &HashMap<String, serde_json::Value>,
) -> Option<ReplicationRole> {
    let mine = v.copies.iter().find(|c| c.node == me)?;
    if mine.state != CopyState::InSync {
        return None;
    }
    if v.node != me {
        return role(json!({"type": "replica"}));
    }
    let replicas = v
        .copies
        .iter()
        .filter(|c| c.node != me && c.state == CopyState::InSync)
        .map(|c| ReplicaPeer {
            // The store checks the replica's certificate, which names its Raft id.
            node: records
                .get(&c.node)
                .and_then(|r| r["raft_id"].as_u64())
                .map(tessera_state::network::cert_name)
                .unwrap_or_else(|| c.node.clone()),
            addr: records
                .get(&c.node)
                .and_then(repl_addr)
                .map(|a| a.to_string())
                .unwrap_or_default(),
        })
        .collect::<Vec<_>>();
    role(json!({"type": "primary", "replicas": replicas, "timeout_ms": REPLICA_TIMEOUT_MS}))
}

/// A role from its JSON form: built through serde, with the optional fields at their
/// defaults, so this code does not depend on which of them a build of the admin types
/// has (the store side adds catch-up fields).
fn role(v: serde_json::Value) -> Option<ReplicationRole> {
    serde_json::from_value(v)
        .map_err(|e| tracing::error!(error = %e, "building a replication role"))
        .ok()
}

/// The task runner's hook: the steps of a replicated volume's create and delete, done
/// here instead of the plain store call (`None`: not such a step, the runner calls the
/// store as for any task).
pub async fn run_task(
    node: &Node,
    me: &str,
    socket: &Path,
    t: &Task,
) -> Option<Result<AdminReply, AdminClientError>> {
    match &t.op {
        TaskOp::SetReplication {
            volume,
            generation,
            role: ReplicationRole::Replica { .. },
        } => {
            let v: Volume = get(node, VOLUMES, volume)?;
            let creating = v.state == VolumeState::Creating
                && v.is_replicated()
                && v.node != me
                && v.copies.iter().any(|c| c.node == me);
            if !creating {
                return None;
            }
            Some(create_replica(socket, &v, *generation).await)
        }
        TaskOp::CreateVolume { name, .. } => {
            let v: Volume = get(node, VOLUMES, name)?;
            if !(v.is_replicated() && v.state == VolumeState::Creating && v.node == me) {
                return None;
            }
            Some(create_primary(node, me, socket, &v, t).await)
        }
        TaskOp::DeleteVolume { name } => {
            let v: Volume = get(node, VOLUMES, name)?;
            if !v.is_replicated() {
                return None;
            }
            // Out of its role first, so the store's primary or replica stops with it.
            let _ = call(
                socket,
                AdminOp::SetReplication {
                    volume: name.clone(),
                    generation: v.generation,
                    role: ReplicationRole::Standalone {},
                },
            )
            .await;
            forget(name);
            Some(call(socket, AdminOp::DeleteVolume { name: name.clone() }).await)
        }
        _ => None,
    }
}

async fn create_replica(
    socket: &Path,
    v: &Volume,
    generation: u64,
) -> Result<AdminReply, AdminClientError> {
    call(
        socket,
        AdminOp::CreateVolume {
            name: v.name.clone(),
            size: v.size_bytes,
        },
    )
    .await?;
    let role = role(json!({"type": "replica"}))
        .ok_or_else(|| failed("no replica role could be built".into()))?;
    let r = call(
        socket,
        AdminOp::SetReplication {
            volume: v.name.clone(),
            generation,
            role: role.clone(),
        },
    )
    .await?;
    remember(&v.name, generation, &role);
    Ok(r)
}

async fn create_primary(
    node: &Node,
    me: &str,
    socket: &Path,
    v: &Volume,
    t: &Task,
) -> Result<AdminReply, AdminClientError> {
    call(
        socket,
        AdminOp::CreateVolume {
            name: v.name.clone(),
            size: v.size_bytes,
        },
    )
    .await?;
    let outcome = async {
        wait_for_replicas(node, me, v, t).await?;
        let role = desired(v, me, &node_records(node))
            .ok_or_else(|| failed("this node holds no in-sync copy".into()))?;
        let r = call(
            socket,
            AdminOp::SetReplication {
                volume: v.name.clone(),
                generation: v.generation,
                role: role.clone(),
            },
        )
        .await?;
        remember(&v.name, v.generation, &role);
        Ok(r)
    }
    .await;
    if outcome.is_err() {
        // The record goes with the failed task: so does this copy (the replicas' copies
        // stay; see docs/replication.md).
        let _ = call(
            socket,
            AdminOp::DeleteVolume {
                name: v.name.clone(),
            },
        )
        .await;
    }
    outcome
}

/// Waits until every other copy's replica task for `v` succeeded.
async fn wait_for_replicas(
    node: &Node,
    me: &str,
    v: &Volume,
    t: &Task,
) -> Result<(), AdminClientError> {
    let deadline = Instant::now() + REPLICAS_WAIT;
    let others: Vec<&str> = v
        .copies
        .iter()
        .filter(|c| c.node != me)
        .map(|c| c.node.as_str())
        .collect();
    let mut rx = node.state.subscribe();
    loop {
        let tasks: Vec<Task> = node.state.read(|tb| {
            tb.get(TASKS)
                .map(|ts| {
                    ts.values()
                        .filter_map(|x| serde_json::from_value::<Task>(x.clone()).ok())
                        .filter(|x| {
                            x.created_ms + 60_000 >= t.created_ms
                                && matches!(&x.op, TaskOp::SetReplication { volume, generation, role: ReplicationRole::Replica { .. } }
                                    if *volume == v.name && *generation == v.generation)
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        let mut all = true;
        for n in &others {
            let newest = tasks
                .iter()
                .filter(|x| x.node == *n)
                .max_by_key(|x| x.created_ms);
            match newest.map(|x| (x.state, x.error.clone())) {
                Some((TaskState::Succeeded, _)) => {}
                Some((TaskState::Failed, e)) => {
                    return Err(failed(format!(
                        "the copy on node {n} failed: {}",
                        e.unwrap_or_default()
                    )))
                }
                None => return Err(failed(format!("no task makes the copy on node {n}"))),
                Some(_) => all = false,
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "the replicas' copies were not made within {} s",
                REPLICAS_WAIT.as_secs()
            )));
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
    }
}

/// Starts the reconciler of node `me`'s store roles (see the module's documentation).
pub fn start_reconciler(node: Arc<Node>, me: String, socket: PathBuf) {
    tokio::spawn(async move {
        let mut rx = node.state.subscribe();
        // The last error per volume, logged once.
        let mut complaints: HashMap<String, String> = HashMap::new();
        loop {
            reconcile(&node, &me, &socket, &mut complaints).await;
            if tokio::time::timeout(ROUND, rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
    });
}

async fn reconcile(node: &Node, me: &str, socket: &Path, complaints: &mut HashMap<String, String>) {
    let mine: Vec<Volume> = volumes(node)
        .into_iter()
        .filter(|v| {
            v.state == VolumeState::Ready
                && v.is_replicated()
                && v.copies.iter().any(|c| c.node == me)
        })
        .collect();
    if mine.is_empty() {
        return;
    }
    // A store that does not answer may be restarting: what it was told is gone with it.
    // One that answers says which roles it holds unconfigured (restored after its
    // restart) or in an older generation: those are given again.
    match call(socket, AdminOp::ReplicationStatus {}).await {
        Ok(AdminReply::Replication(held)) => {
            let mut a = applied().lock().unwrap_or_else(|p| p.into_inner());
            for h in held {
                let stale = a.get(&h.volume).is_some_and(|(g, _)| h.generation < *g);
                if !h.configured || stale {
                    a.remove(&h.volume);
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "store not answering; roles will be given again");
            applied().lock().unwrap_or_else(|p| p.into_inner()).clear();
            return;
        }
    }
    let records = node_records(node);
    for v in mine {
        let Some(want) = desired(&v, me, &records) else {
            continue;
        };
        let have = applied()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v.name)
            .cloned();
        if have.as_ref() == Some(&(v.generation, want.clone())) {
            continue;
        }
        let is_primary = matches!(want, ReplicationRole::Primary { .. });
        // A primary may have run here in this generation unless we know otherwise.
        let fresh = match &have {
            Some((g, _)) if *g < v.generation => true,
            Some((g, r)) => *g == v.generation && !matches!(r, ReplicationRole::Primary { .. }),
            None => false,
        };
        if is_primary && !fresh {
            raise_generation(node, &v).await;
            continue;
        }
        let op = AdminOp::SetReplication {
            volume: v.name.clone(),
            generation: v.generation,
            role: want.clone(),
        };
        let what = op.describe();
        match call(socket, op).await {
            Ok(_) => {
                tracing::info!(volume = %v.name, "{what}: done");
                complaints.remove(&v.name);
                remember(&v.name, v.generation, &want);
            }
            Err(AdminClientError::Refused(e)) if e.kind == ErrorKind::NotFound => {
                note(
                    complaints,
                    &v.name,
                    format!("{what}: the store has no copy: {e}"),
                );
            }
            Err(e) => note(complaints, &v.name, format!("{what}: {e}")),
        }
    }
}

fn note(complaints: &mut HashMap<String, String>, volume: &str, msg: String) {
    if complaints.get(volume) != Some(&msg) {
        tracing::warn!(volume, "{msg}");
        complaints.insert(volume.to_string(), msg);
    }
}

/// Raises `v`'s generation through the cluster state (compare-and-swap: a concurrent
/// change wins and this is decided again next round).
async fn raise_generation(node: &Node, v: &Volume) {
    let mut new = v.clone();
    new.generation += 1;
    let txn = Command::Txn {
        require: vec![Require::equals(VOLUMES, &v.name, json!(v))],
        ops: vec![
            put(VOLUMES, &v.name, &new),
            event(
                "volume.generation_raised",
                &v.name,
                "tesserad",
                &format!(
                    "generation {} so the primary's store can start again (tesserad or the store \
                     restarted)",
                    new.generation
                ),
            ),
        ],
    };
    match node.write(txn).await {
        Ok(a) if a.conflict.is_none() => {
            tracing::info!(volume = %v.name, generation = new.generation, "generation raised to restart the primary")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "generation not raised yet"),
    }
}
