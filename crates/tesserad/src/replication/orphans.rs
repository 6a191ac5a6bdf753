//! Copies the cluster no longer counts, and their deletion (issue #8). A copy is left on
//! a store when its volume is deleted or its creation fails while the copy's node is
//! away, or when the copy is replaced by a rebuild elsewhere. Such a copy is recorded
//! in the cluster state as a pending deletion (`copy_deletions/<volume>@<node>`), in the
//! same transaction that stops counting it; the copy's own node deletes it whenever its
//! store answers (at once if it is up, when it is back otherwise), then removes the
//! record.
//!
//! A volume a store holds that the cluster does not know at all (no record, no pending
//! deletion) is reported once per process (event `volume.unknown_copy`) and left alone:
//! the cluster did not make it, so it does not delete it.
//!
//! Snapshots of a copy that no record names are deleted too (`leftover_snapshots`).
//!
//! Never deleted: a copy some volume record names on that node (a new volume of the same
//! name placed there since). Placement of a rebuild avoids nodes with a pending deletion
//! of the volume's name.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_state::{Command, Node, Require};
use tessera_store::admin_client::AdminClientError;
use tessera_store_admin::{AdminOp, AdminReply, ErrorKind, ReplicationRole};

use super::roles::call;
use crate::records::table::{COPY_DELETIONS, VOLUMES};
use crate::records::{Volume, VolumeState};
use crate::tables::{del, event, put};

/// A copy to delete on its node's store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDeletion {
    /// The volume (the copy's name on the store).
    pub volume: String,
    /// The node whose store holds it.
    pub node: String,
    /// Why it is left: the volume was deleted, its creation failed, or it was replaced.
    pub reason: String,
    /// When it was recorded (ms since the epoch).
    pub since_ms: u64,
}

/// The key of the pending deletion of `volume`'s copy on `node`.
pub fn key(volume: &str, node: &str) -> String {
    format!("{volume}@{node}")
}

/// The command recording that `node`'s copy of `volume` is to be deleted.
pub fn pending(volume: &str, node: &str, reason: &str) -> Command {
    put(
        COPY_DELETIONS,
        &key(volume, node),
        &PendingDeletion {
            volume: volume.to_string(),
            node: node.to_string(),
            reason: reason.to_string(),
            since_ms: crate::now_ms(),
        },
    )
}

/// Every pending deletion.
pub fn all(n: &Node) -> Vec<PendingDeletion> {
    n.state.read(|t| {
        t.get(COPY_DELETIONS)
            .map(|d| {
                d.values()
                    .filter_map(|v| serde_json::from_value(v.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The pending deletions a replicated volume's deletion leaves (every copy but the one
/// on `done_on`, whose node just deleted it).
pub fn after_delete(v: &Volume, done_on: &str) -> Vec<Command> {
    v.copies
        .iter()
        .filter(|c| c.node != done_on)
        .map(|c| pending(&v.name, &c.node, "the volume was deleted"))
        .collect()
}

/// The pending deletions a replicated volume's failed creation leaves: the copies whose
/// replica task succeeded (made and made a replica). A replica task that fails removes
/// what it made itself, and one still to run finds the record gone and makes nothing.
pub fn after_failed_create(n: &Node, v: &Volume) -> Vec<Command> {
    if !v.is_replicated() {
        return Vec::new();
    }
    let made: HashSet<String> = n.state.read(|t| {
        t.get(crate::records::table::TASKS)
            .map(|tasks| {
                tasks
                    .values()
                    .filter(|x| x["state"] == "succeeded" && x["copy"].is_null())
                    .filter_map(|x| serde_json::from_value::<crate::records::Task>(x.clone()).ok())
                    .filter(|x| {
                        x.created_ms + 60_000 >= v.created_ms
                            && matches!(&x.op, AdminOp::SetReplication { volume, generation, role: ReplicationRole::Replica { .. } }
                                if *volume == v.name && *generation == v.generation)
                    })
                    .map(|x| x.node)
                    .collect()
            })
            .unwrap_or_default()
    });
    v.copies
        .iter()
        .filter(|c| c.node != v.node && made.contains(&c.node))
        .map(|c| pending(&v.name, &c.node, "the volume's creation failed"))
        .collect()
}

/// Starts node `me`'s loop: its pending deletions done, unknown volumes reported.
pub fn start(node: Arc<Node>, me: String, socket: PathBuf) {
    tokio::spawn(async move {
        let mut rx = node.state.subscribe();
        let mut st = Round::default();
        loop {
            round(&node, &me, &socket, &mut st).await;
            let wait = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
            if wait.is_ok_and(|r| r.is_err()) {
                return;
            }
        }
    });
}

/// What the loop keeps between rounds.
#[derive(Default)]
struct Round {
    /// Unknown volumes already reported.
    reported: HashSet<String>,
    /// The last problem per pending deletion, logged once.
    complaints: HashMap<String, String>,
    /// When the store's volumes were last listed.
    listed: Option<Instant>,
}

/// How often the store's volumes are compared with the cluster's.
const LIST_EVERY: Duration = Duration::from_secs(5);

async fn round(node: &Node, me: &str, socket: &Path, st: &mut Round) {
    let mine: Vec<PendingDeletion> = all(node).into_iter().filter(|p| p.node == me).collect();
    for p in mine {
        let k = key(&p.volume, me);
        match delete_one(node, me, socket, &p).await {
            Ok(()) => {
                st.complaints.remove(&k);
            }
            Err(e) => {
                if st.complaints.get(&k) != Some(&e) {
                    tracing::warn!(volume = %p.volume, "the copy left here is not deleted yet: {e}");
                    st.complaints.insert(k, e);
                }
            }
        }
    }
    if st.listed.is_some_and(|t| t.elapsed() < LIST_EVERY) {
        return;
    }
    st.listed = Some(Instant::now());
    report_unknown(node, me, socket, st).await;
}

/// Deletes `p`'s copy here (out of any replication role first) and its record.
async fn delete_one(
    node: &Node,
    me: &str,
    socket: &Path,
    p: &PendingDeletion,
) -> Result<(), String> {
    let record: Option<Volume> = crate::tables::get(node, VOLUMES, &p.volume);
    if let Some(v) = record.filter(|v| v.all_copies().iter().any(|c| c.node == me)) {
        // A volume of that name has a copy here now: not this one to delete. Once it is
        // ready, the old copy was gone before it was made (its store refuses a name it
        // holds), so the record is stale.
        if v.state != VolumeState::Ready {
            return Err("a volume of that name is being made or deleted here".into());
        }
        return forget(node, p, "a volume of that name has a copy here now").await;
    }
    super::roles::forget(&p.volume);
    // A store serving the copy (a replica, a former primary) keeps it open: out of its
    // role first, in the generation it holds.
    if let Ok(AdminReply::Replication(held)) = call(socket, AdminOp::ReplicationStatus {}).await {
        if let Some(h) = held.iter().find(|h| h.volume == p.volume) {
            call(
                socket,
                AdminOp::SetReplication {
                    volume: p.volume.clone(),
                    generation: h.generation,
                    role: ReplicationRole::Standalone {},
                },
            )
            .await
            .map_err(|e| format!("setting it standalone: {e}"))?;
        }
    }
    match call(
        socket,
        AdminOp::DeleteVolume {
            name: p.volume.clone(),
        },
    )
    .await
    {
        Ok(_) => {}
        Err(AdminClientError::Refused(e)) if e.kind == ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    let name = super::node_records(node)
        .get(me)
        .and_then(|r| r["name"].as_str().map(str::to_string))
        .unwrap_or_else(|| me.to_string());
    let msg = format!(
        "the copy of {} left on {name} ({}) was deleted",
        p.volume, p.reason
    );
    let txn = Command::Txn {
        require: vec![Require::equals(
            COPY_DELETIONS,
            &key(&p.volume, me),
            json!(p),
        )],
        ops: vec![
            del(COPY_DELETIONS, &key(&p.volume, me)),
            event("volume.orphan_deleted", &p.volume, "tesserad", &msg),
        ],
    };
    match node.write(txn).await {
        Ok(_) => {
            tracing::info!(volume = %p.volume, "{msg}");
            Ok(())
        }
        Err(e) => Err(format!("deleted, but not recorded yet: {e}")),
    }
}

/// Drops the pending deletion `p` without touching the store.
async fn forget(node: &Node, p: &PendingDeletion, why: &str) -> Result<(), String> {
    let txn = Command::Txn {
        require: vec![Require::equals(
            COPY_DELETIONS,
            &key(&p.volume, &p.node),
            json!(p),
        )],
        ops: vec![del(COPY_DELETIONS, &key(&p.volume, &p.node))],
    };
    node.write(txn)
        .await
        .map(|_| tracing::info!(volume = %p.volume, "pending deletion dropped: {why}"))
        .map_err(|e| e.to_string())
}

/// Reports (once per volume and process) what the store holds that the cluster does not
/// know.
async fn report_unknown(node: &Node, me: &str, socket: &Path, st: &mut Round) {
    // The store first, the state after: a copy made since has its record by then (the
    // record is written before any task makes a copy).
    let Ok(AdminReply::Volumes(held)) = call(socket, AdminOp::ListVolumes {}).await else {
        return;
    };
    let snapshots: Vec<super::leftover_snapshots::Held> = held
        .iter()
        .map(|v| {
            let s = v.snapshots.iter().map(|s| (s.name.clone(), s.created));
            (v.name.clone(), s.collect())
        })
        .collect();
    super::leftover_snapshots::reclaim(node, me, socket, &snapshots).await;
    let known: HashSet<String> = node.state.read(|t| {
        let mut k: HashSet<String> = t
            .get(VOLUMES)
            .map(|v| v.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(d) = t.get(COPY_DELETIONS) {
            k.extend(
                d.values()
                    .filter(|p| p["node"] == me)
                    .filter_map(|p| p["volume"].as_str().map(str::to_string)),
            );
        }
        k
    });
    for v in held {
        if known.contains(&v.name) || st.reported.contains(&v.name) {
            continue;
        }
        // Deleted meanwhile (a delete task removes the copy, then the record): listed
        // before, no record after, but gone: not a stranger.
        let still = call(
            socket,
            AdminOp::VolumeInfo {
                name: v.name.clone(),
            },
        )
        .await;
        if matches!(&still, Err(AdminClientError::Refused(e)) if e.kind == ErrorKind::NotFound)
            || crate::tables::get::<Volume>(node, VOLUMES, &v.name).is_some()
        {
            continue;
        }
        st.reported.insert(v.name.clone());
        let msg = format!(
            "the store of node {me} holds a volume {} ({} bytes) that the cluster has no \
             record of; it is left in place (delete it on that node with tessera-store if it \
             is not needed)",
            v.name, v.size
        );
        tracing::warn!(node = %me, "{msg}");
        let txn = Command::Txn {
            require: vec![],
            ops: vec![event("volume.unknown_copy", &v.name, "tesserad", &msg)],
        };
        if node.write(txn).await.is_err() {
            st.reported.remove(&v.name);
        }
    }
    st.reported.retain(|n| !known.contains(n));
}
