//! Snapshots of replicated volumes: taken at one point of the write stream on every copy.
//!
//! A snapshot of a volume this store is the primary of is not taken by the admin op
//! directly: it goes through the `Primary` state machine as [`Op::Snapshot`], sequenced
//! like a write, so the local copy and every in-sync replica take it after exactly the
//! same writes (each applies the stream in seq order). The admin op answers when the
//! local copy and every in-sync replica took it. While a replica is out of sync or
//! failing it is refused, naming them. A replica takes snapshots only from its primary's
//! stream; its admin op refuses them.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use tessera_blockstore::{Export, SnapshotInfo, Store, StoreError};
use tessera_replication::primary::RequestError;
use tessera_replication::replica::Op;
use tessera_replication::wire::VolumeName;

use super::primary::ForwardError;
use super::{Replication, RoleError};

/// The snapshots (`volume@name`) this store took from a write stream since it started,
/// until the admin op deletes them.
pub type Taken = Arc<Mutex<HashSet<String>>>;

/// Takes snapshot `name` of `volume` (open as `export`) for the write stream, at `size`
/// when given. A snapshot this copy already took from the stream (`taken`) is done, not
/// taken again: after a generation change the primary sends what was not completed
/// again, the snapshot among it, and the copy holds it at the right point already.
///
/// A `size` below the copy's comes only from a catch-up carrying a snapshot taken before
/// the volume grew to a copy larger already (`catchup/snapshots.rs`): the copy's bytes
/// past it are trimmed and the trim made durable first, so the snapshot reads as the
/// primary's, past its end too once a clone of it is grown (the block store refuses it
/// otherwise). The catch-up's passes bring the trimmed head back.
pub(super) fn take(
    store: &Store,
    export: &Export,
    volume: &str,
    name: &VolumeName,
    size: Option<u64>,
    taken: &Taken,
) -> Result<(), StoreError> {
    let key = format!("{volume}@{}", name.as_str());
    if taken.lock().contains(&key) {
        return Ok(());
    }
    match size {
        None => store.create_snapshot(volume, name.as_str())?,
        Some(size) => {
            let current = export.size();
            if size < current {
                export.trim(size, current - size, false)?;
                export.flush()?;
            }
            store.create_snapshot_sized(volume, name.as_str(), size)?
        }
    };
    taken.lock().insert(key);
    Ok(())
}

impl Replication {
    /// The admin op deleted `volume@snapshot`: a later snapshot of that name from a
    /// stream is a new one.
    pub fn forget_snapshot(&self, volume: &str, snapshot: &str) {
        self.taken.lock().remove(&format!("{volume}@{snapshot}"));
    }

    /// The admin op `create_snapshot` for a replicated volume: `None` when `volume` has no
    /// replication role here (the store takes it alone, as before).
    pub fn create_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Option<Result<SnapshotInfo, RoleError>> {
        if self.replicas.holds(volume) {
            return Some(Err(RoleError::Refused(format!(
                "volume {volume} is a replica on this store: its snapshots are taken through its primary's stream (snapshot it on the primary's node)"
            ))));
        }
        if self.waits_for_configuration(volume) {
            return Some(Err(RoleError::Refused(format!(
                "volume {volume} was this store's replicated primary before it restarted: no snapshot until tesserad configures it again"
            ))));
        }
        let primary = self.primaries.get(volume)?;
        Some(self.snapshot_through(&primary, volume, snapshot))
    }

    fn snapshot_through(
        &self,
        primary: &super::primary::PrimaryHandle,
        volume: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, RoleError> {
        let name = VolumeName::new(snapshot).map_err(|e| {
            RoleError::Store(StoreError::Invalid {
                field: "snapshot",
                reason: e.to_string(),
            })
        })?;
        // One replicated snapshot at a time per store: the name is checked free here,
        // and a local failure of the snapshot would stop the primary (its copy would
        // then differ from the stream the replicas applied).
        let _one = self.snapshot_lock.lock();
        let info = self.store_volume_info(volume)?;
        if info.snapshots.iter().any(|s| s.name == snapshot) {
            return Err(StoreError::AlreadyExists(format!("snapshot {volume}@{snapshot}")).into());
        }
        let bound = primary.admin_wait();
        primary.submit_within(Op::Snapshot { name, size: None }, bound).map_err(|e| {
            let why = match e {
                ForwardError::Request(RequestError::NotAllInSync(ids)) => {
                    let nodes: Vec<String> = ids
                        .iter()
                        .map(|r| primary.node_of(*r).unwrap_or_else(|| format!("{r:?}")))
                        .collect();
                    format!(
                        "a snapshot needs every copy in sync: the copy on {} is out of sync or failing",
                        nodes.join(", ")
                    )
                }
                ForwardError::TimedOut(_) => format!(
                    "{e}; not acknowledged: the copies that took it keep it, and it completes on the copies in sync once the cluster removed the failing replica (see docs/replication.md)"
                ),
                e => e.to_string(),
            };
            RoleError::Refused(format!("snapshot {volume}@{snapshot}: {why}"))
        })?;
        self.store_volume_info(volume)?
            .snapshots
            .into_iter()
            .find(|s| s.name == snapshot)
            .ok_or_else(|| {
                RoleError::Refused(format!(
                    "snapshot {volume}@{snapshot}: the stream completed it but the local copy does not list it"
                ))
            })
    }

    fn store_volume_info(&self, volume: &str) -> Result<tessera_blockstore::VolumeInfo, RoleError> {
        Ok(self.store.volume_info(volume)?)
    }
}
