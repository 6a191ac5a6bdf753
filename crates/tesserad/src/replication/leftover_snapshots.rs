//! Snapshots a copy holds that the cluster has no record of, deleted (issue #8).
//!
//! A replicated snapshot that a copy failed during is not rolled back: the copies that
//! took it keep it and, once the cluster took the failing copy out of the in-sync set,
//! it completes on the copies in sync (docs/replication.md, "Snapshots and clones"). Its
//! task failed, so its record is gone; catch-up then carries it to the copy that lacked
//! it, like any snapshot. A copy that lacked a snapshot deleted meanwhile may also get it
//! back from a catch-up that had listed it already. Either way copies end up holding a
//! snapshot no record names: its name stays taken and its layer holds space.
//!
//! Each node deletes such snapshots of the replicated volumes it holds a copy of, once
//! its store took them more than [`GRACE`] ago (well past the resend after the failing
//! copy's removal, which completes it) and while the volume's record is ready. A snapshot
//! with a record (being made, ready, being deleted) is never touched: the record is
//! written before any store takes the snapshot, and it is looked up again right before
//! the deletion. Event `snapshot.reclaimed`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_state::{Command, Node};
use tessera_store::admin_client::AdminClientError;
use tessera_store_admin::{AdminOp, ErrorKind};

use super::roles::call;
use crate::records::table::{SNAPSHOTS, VOLUMES};
use crate::records::{snapshot_key, Snapshot, Volume, VolumeState};
use crate::tables::{event_about_nodes, get};

/// How long a snapshot without a record is left alone after its store took it.
pub const GRACE: Duration = Duration::from_secs(60);

/// One volume the store holds: its name and its snapshots' (name, seconds since the
/// epoch when the store took it).
pub type Held = (String, Vec<(String, u64)>);

/// Deletes, on the store at `socket`, the snapshots in `held` that no record names (see
/// the module doc).
pub async fn reclaim(node: &Node, me: &str, socket: &Path, held: &[Held]) {
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (volume, snapshots) in held {
        let old: Vec<&String> = snapshots
            .iter()
            .filter(|(_, created)| created.saturating_add(GRACE.as_secs()) < now_s)
            .map(|(name, _)| name)
            .collect();
        if old.is_empty() || !copy_here(node, me, volume) {
            continue;
        }
        for snapshot in old {
            let key = snapshot_key(volume, snapshot);
            if get::<Snapshot>(node, SNAPSHOTS, &key).is_some() || !copy_here(node, me, volume) {
                continue;
            }
            let op = AdminOp::DeleteSnapshot {
                volume: volume.clone(),
                snapshot: snapshot.clone(),
            };
            match call(socket, op).await {
                Ok(_) => {}
                Err(AdminClientError::Refused(e)) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(snapshot = %key, error = %e,
                        "a snapshot the cluster has no record of is not deleted yet");
                    continue;
                }
            }
            let name = super::node_records(node)
                .get(me)
                .and_then(|r| r["name"].as_str().map(str::to_string))
                .unwrap_or_else(|| me.to_string());
            let msg = format!(
                "the snapshot {key} on {name} had no record in the cluster (one that failed \
                 on a copy, or deleted while a copy lacked it) and was deleted there"
            );
            tracing::info!(snapshot = %key, "{msg}");
            let txn = Command::Txn {
                require: vec![],
                ops: vec![event_about_nodes(
                    "snapshot.reclaimed",
                    volume,
                    "tesserad",
                    &msg,
                    vec![me.to_string()],
                )],
            };
            if let Err(e) = node.write(txn).await {
                tracing::warn!(snapshot = %key, error = %e, "the reclaim's event was not written");
            }
        }
    }
}

/// Whether `volume` is a ready replicated volume with a copy on node `me`.
fn copy_here(node: &Node, me: &str, volume: &str) -> bool {
    get::<Volume>(node, VOLUMES, volume).is_some_and(|v| {
        v.is_replicated()
            && v.state == VolumeState::Ready
            && v.all_copies().iter().any(|c| c.node == me)
    })
}
