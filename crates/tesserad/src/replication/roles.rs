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
use tessera_store_admin::{
    AdminOp, AdminReply, ErrorKind, ReplicaPeer, ReplicationRole, VolumeReplication,
};

use super::{node_records, repl_addr, store_trouble, volumes, REPLICA_TIMEOUT_MS, ROUND};
use crate::records::table::{TASKS, VOLUMES};
use crate::records::{Task, TaskOp, TaskState, Volume, VolumeState};
use crate::tables::{event, get, put};

mod now;
pub use now::give_now;

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

pub(super) fn forget(volume: &str) {
    applied()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(volume);
}

/// One admin call to the store at `socket`, off the async workers, bounded.
pub(super) async fn call(socket: &Path, op: AdminOp) -> Result<AdminReply, AdminClientError> {
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
/// here, or one out of sync, which takes no writes until the primary catches it up).
pub fn desired(
    v: &Volume,
    me: &str,
    records: &HashMap<String, serde_json::Value>,
) -> Option<ReplicationRole> {
    let mine = v.copies.iter().find(|c| c.node == me)?;
    match mine.state {
        CopyState::OutOfSync => return None,
        CopyState::CatchingUp => return role(json!({"type": "replica", "catching_up": true})),
        CopyState::InSync if v.node != me => return role(json!({"type": "replica"})),
        CopyState::InSync => {}
    }
    let peers = |state: CopyState| {
        v.copies
            .iter()
            .filter(|c| c.node != me && c.state == state)
            .map(|c| ReplicaPeer {
                node: cert_name(records, &c.node),
                addr: records
                    .get(&c.node)
                    .and_then(repl_addr)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            })
            .collect::<Vec<_>>()
    };
    // New copies (a rebuild) are compared over the whole volume; copies away are listed
    // so the primary records what they miss, and forgets a copy the cluster replaced.
    let rebuilding: Vec<String> = v
        .copies
        .iter()
        .filter(|c| c.node != me && c.state == CopyState::CatchingUp && c.rebuild)
        .map(|c| cert_name(records, &c.node))
        .collect();
    role(json!({
        "type": "primary",
        "replicas": peers(CopyState::InSync),
        "catching_up": peers(CopyState::CatchingUp),
        "rebuilding": rebuilding,
        "out_of_sync": peers(CopyState::OutOfSync),
        "timeout_ms": REPLICA_TIMEOUT_MS,
        "operator_override": v.operator_override.is_some(),
    }))
}

/// The name node `id`'s certificate gives it (its Raft id's), which the stores use for
/// their peers.
pub fn cert_name(records: &HashMap<String, serde_json::Value>, id: &str) -> String {
    records
        .get(id)
        .and_then(|r| r["raft_id"].as_u64())
        .map(tessera_state::network::cert_name)
        .unwrap_or_else(|| id.to_string())
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
            // Only a creation queues this task: with the record gone, the creation was
            // given up, and no copy is to be made (a store holding that name anyway
            // must not be made a replica of nothing).
            let Some(v) = get::<Volume>(node, VOLUMES, volume) else {
                return Some(Err(failed(format!(
                    "volume {volume} is no longer being created (its creation failed)"
                ))));
            };
            let creating = v.state == VolumeState::Creating
                && v.is_replicated()
                && v.node != me
                && v.copies.iter().any(|c| c.node == me);
            if !creating {
                return None;
            }
            Some(create_replica(node, socket, &v, *generation).await)
        }
        TaskOp::CreateVolume { name, .. } | TaskOp::CloneSnapshot { name, .. } => {
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

/// The store call that makes this node's copy of a new replicated volume: a new volume,
/// or for a clone (`origin` `volume@snapshot`) a clone of this node's copy of the
/// snapshot, which every copy took at the same point of the write stream.
fn make_copy(v: &Volume) -> AdminOp {
    match v.origin.as_deref().and_then(|o| o.split_once('@')) {
        Some((volume, snapshot)) => AdminOp::CloneSnapshot {
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            name: v.name.clone(),
        },
        None => AdminOp::CreateVolume {
            name: v.name.clone(),
            size: v.size_bytes,
        },
    }
}

async fn create_replica(
    node: &Node,
    socket: &Path,
    v: &Volume,
    generation: u64,
) -> Result<AdminReply, AdminClientError> {
    call(socket, make_copy(v)).await?;
    let outcome = async {
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
        // The creation may have failed meanwhile (the primary's task gave up): a copy
        // made after that is nobody's.
        match get::<Volume>(node, VOLUMES, &v.name) {
            Some(now) if now.state == VolumeState::Creating => Ok(r),
            _ => Err(failed(format!(
                "volume {} is no longer being created (its creation failed)",
                v.name
            ))),
        }
    }
    .await;
    if outcome.is_err() {
        // Made here and not to be kept: the failed creation records no deletion for a
        // copy whose task failed.
        forget(&v.name);
        let _ = call(
            socket,
            AdminOp::SetReplication {
                volume: v.name.clone(),
                generation,
                role: ReplicationRole::Standalone {},
            },
        )
        .await;
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

async fn create_primary(
    node: &Node,
    me: &str,
    socket: &Path,
    v: &Volume,
    t: &Task,
) -> Result<AdminReply, AdminClientError> {
    call(socket, make_copy(v)).await?;
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
        let mut round = Round::default();
        loop {
            reconcile(&node, &me, &socket, &mut round).await;
            if tokio::time::timeout(ROUND, rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
    });
}

async fn reconcile(node: &Node, me: &str, socket: &Path, st: &mut Round) {
    let _giving = now::giving().lock().await;
    let mine: Vec<Volume> = volumes(node)
        .into_iter()
        .filter(|v| {
            v.state == VolumeState::Ready
                && v.is_replicated()
                && v.copies.iter().any(|c| c.node == me)
        })
        .collect();
    st.stalled
        .retain(|(n, g)| mine.iter().any(|v| v.name == *n && v.generation == *g));
    if mine.is_empty() {
        return;
    }
    // A store that does not answer may be restarting: what it was told is gone with it.
    // One that answers says which roles it holds unconfigured (restored after its
    // restart) or in an older generation: those are given again.
    let held: HashMap<String, VolumeReplication> =
        match call(socket, AdminOp::ReplicationStatus {}).await {
            Ok(AdminReply::Replication(held)) => {
                let mut a = applied().lock().unwrap_or_else(|p| p.into_inner());
                for h in &held {
                    let stale = a.get(&h.volume).is_some_and(|(g, _)| h.generation < *g);
                    if !h.configured || stale {
                        a.remove(&h.volume);
                    }
                }
                held.into_iter().map(|h| (h.volume.clone(), h)).collect()
            }
            Ok(_) => HashMap::new(),
            Err(e) => {
                tracing::debug!(error = %e, "store not answering; roles will be given again");
                applied().lock().unwrap_or_else(|p| p.into_inner()).clear();
                return;
            }
        };
    let records = node_records(node);
    for v in mine {
        let report = held.get(&v.name);
        if v.node == me {
            if let Some(r) = report.filter(|r| r.role == "primary") {
                super::repairs::record(node, me, r, &mut st.repairs).await;
            }
            // What the primary's store reports may change the cluster state (a failed
            // replica, a copy back or caught up); the stores hear of it next round.
            if let Some(step) = report.and_then(|r| {
                super::resync::decide(
                    &v,
                    r,
                    |cert| {
                        v.copies
                            .iter()
                            .find(|c| cert_name(&records, &c.node) == cert)
                            .map(|c| c.node.clone())
                    },
                    |n| {
                        super::liveness(me, n) == super::Liveness::Up
                            && records.get(n).is_some_and(|r| store_trouble(r).is_none())
                    },
                )
            }) {
                super::resync::act(node, &v, step, &mut st.stalled).await;
                continue;
            }
        }
        let Some(want) = desired(&v, me, &records) else {
            continue;
        };
        let have = applied()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v.name)
            .cloned();
        if have.as_ref() == Some(&(v.generation, want.clone())) {
            confirm_joined(node, me, &v, report).await;
            continue;
        }
        let is_primary = matches!(want, ReplicationRole::Primary { .. });
        // A replica's store learns a newer generation from its primary, which fences it
        // only once it took that generation itself (after a rejoin's last pass): told
        // first, the replica would refuse that primary's last writes as stale and fence
        // it for good. So a replica is told a generation only once its store holds it,
        // unless it is no serving replica at all (a former primary, or no role).
        if !is_primary && report.is_some_and(|h| h.role == "replica" && h.generation < v.generation)
        {
            continue;
        }
        // A primary may have run here in this generation unless we know otherwise: we
        // raised it ourselves (no store was ever given it), or we told this store an
        // older generation or another role.
        let raised_here = st.raised.get(&v.name) == Some(&v.generation);
        let fresh = raised_here
            || match &have {
                Some((g, _)) if *g < v.generation => true,
                Some((g, r)) => *g == v.generation && !matches!(r, ReplicationRole::Primary { .. }),
                None => false,
            };
        if is_primary && !fresh {
            // Remembered, or the next round (with nothing remembered for this volume, as
            // after a restart) would raise again, and again: the generation ran away by
            // thousands a minute, each raise an event, until this was kept.
            if let Some(g) = raise_generation(node, &v).await {
                st.raised.insert(v.name.clone(), g);
            }
            continue;
        }
        // A raised generation is given to one attempt only: once told, the store may run
        // in it, and a later restart must raise again.
        st.raised.remove(&v.name);
        let (what, told) = tell(socket, &v, &want).await;
        match told {
            Ok(_) => {
                tracing::info!(volume = %v.name, "{what}: done");
                st.complaints.remove(&v.name);
            }
            Err(AdminClientError::Refused(e)) if e.kind == ErrorKind::NotFound => {
                // A new copy (a rebuild) is made here, empty, then given its role; the
                // primary sends it everything. Any other copy the store lacks is lost:
                // said, not made up.
                if v.copies.iter().any(|c| c.node == me && c.rebuild) {
                    match make_rebuild_copy(socket, &v).await {
                        Ok(()) => {
                            tracing::info!(volume = %v.name, "new copy made here for a rebuild")
                        }
                        Err(e) => note(
                            &mut st.complaints,
                            &v.name,
                            format!("making the new copy for a rebuild: {e}"),
                        ),
                    }
                    continue;
                }
                note(
                    &mut st.complaints,
                    &v.name,
                    format!("{what}: the store has no copy: {e}"),
                );
            }
            Err(e) => note(&mut st.complaints, &v.name, format!("{what}: {e}")),
        }
    }
}

/// Tells the store at `socket` its role `want` for `v` in `v`'s generation, remembered
/// as given if it took it; the operation in words, and the store's answer.
async fn tell(
    socket: &Path,
    v: &Volume,
    want: &ReplicationRole,
) -> (String, Result<AdminReply, AdminClientError>) {
    let op = AdminOp::SetReplication {
        volume: v.name.clone(),
        generation: v.generation,
        role: want.clone(),
    };
    let what = op.describe();
    let told = call(socket, op).await;
    if told.is_ok() {
        remember(&v.name, v.generation, want);
    }
    (what, told)
}

/// The size of the empty copy a rebuild starts from: one block. The catch-up grows it
/// to each snapshot's size in turn as it brings them, oldest first, then to the
/// volume's: a copy made at the volume's size could not take a snapshot taken before the
/// volume grew (a block store takes a snapshot at its volume's size, and copies only
/// grow), and the new copy came without it.
const REBUILD_COPY_SIZE: u64 = 4096;

/// Makes the empty copy of `v` a rebuild starts from (its role is given next round).
async fn make_rebuild_copy(socket: &Path, v: &Volume) -> Result<(), AdminClientError> {
    call(
        socket,
        AdminOp::CreateVolume {
            name: v.name.clone(),
            size: REBUILD_COPY_SIZE.min(v.size_bytes),
        },
    )
    .await
    .map(|_| ())
}

/// A joining copy here whose store was told it is in sync (in the record's generation,
/// which the primary fenced it in after the last pass) and no longer must catch up:
/// the cluster state stops calling it joining, so failover may make it the primary.
async fn confirm_joined(node: &Node, me: &str, v: &Volume, report: Option<&VolumeReplication>) {
    let joining = v.copies.iter().any(|c| c.node == me && c.joining);
    let done = report.is_some_and(|h| {
        h.role == "replica" && h.configured && h.generation >= v.generation && !h.must_catch_up
    });
    if !(joining && done) || v.node == me {
        return;
    }
    let mut new = v.clone();
    for c in &mut new.copies {
        if c.node == me {
            c.joining = false;
        }
    }
    let msg = format!(
        "the copy on {me} confirmed it holds every write (generation {})",
        v.generation
    );
    if super::resync::write(node, v, &new, &[("volume.replica_joined", msg)]).await {
        tracing::info!(volume = %v.name, "copy joined the in-sync set");
    }
}

/// What the reconciler keeps between rounds.
#[derive(Default)]
struct Round {
    /// The last error per volume, logged once.
    complaints: HashMap<String, String>,
    /// Stalls already announced (volume, generation).
    stalled: Vec<(String, u64)>,
    /// Generations this node raised so its primary could start (no store ran in them).
    raised: HashMap<String, u64>,
    /// Blocks the primary's store repaired that are events already (`repairs.rs`).
    repairs: super::repairs::Recorded,
}

fn note(complaints: &mut HashMap<String, String>, volume: &str, msg: String) {
    if complaints.get(volume) != Some(&msg) {
        tracing::warn!(volume, "{msg}");
        complaints.insert(volume.to_string(), msg);
    }
}

/// Raises `v`'s generation through the cluster state (compare-and-swap: a concurrent
/// change wins and this is decided again next round). The new generation when it was
/// raised.
async fn raise_generation(node: &Node, v: &Volume) -> Option<u64> {
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
            tracing::info!(volume = %v.name, generation = new.generation, "generation raised to restart the primary");
            Some(new.generation)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "generation not raised yet");
            None
        }
    }
}
