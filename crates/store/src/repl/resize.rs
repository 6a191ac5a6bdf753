//! Growing replicated volumes: every copy grows at one point of the write stream.
//!
//! The admin op `resize_volume` on a volume this store is the primary of does not grow
//! the local copy alone: it goes through the `Primary` state machine as [`Op::Resize`],
//! sequenced like a write. Every copy (the local one included) grows when it reaches that
//! seq, so a write past the old end, sequenced after it, finds every copy grown. The
//! admin op answers when the local copy and every in-sync replica grew. An out-of-sync
//! copy misses the message; its catch-up grows it to the primary's size before it sends
//! anything (`catchup`). A replica's own store refuses the admin op: its size comes only
//! from its primary.

use tessera_blockstore::{Store, StoreError, VolumeInfo};
use tessera_replication::replica::Op;

use super::{Replication, RoleError};

/// Grows `volume` on this store to at least `size` bytes; a copy already that large is
/// left alone (a resend, or a copy grown by an earlier primary), never shrunk.
pub(super) fn grow(store: &Store, volume: &str, size: u64) -> Result<(), StoreError> {
    if store.volume_info(volume)?.size >= size {
        return Ok(());
    }
    store.resize_volume(volume, size).map(|_| ())
}

impl Replication {
    /// The admin op `resize_volume` for a replicated volume: `None` when `volume` has no
    /// replication role here (the store grows it alone, as before).
    pub fn resize_volume(&self, volume: &str, size: u64) -> Option<Result<VolumeInfo, RoleError>> {
        if self.replicas.holds(volume) {
            return Some(Err(RoleError::Refused(format!(
                "volume {volume} is a replica on this store: it grows through its primary's stream (resize it on the primary's node)"
            ))));
        }
        if self.waits_for_configuration(volume) {
            return Some(Err(RoleError::Refused(format!(
                "volume {volume} was this store's replicated primary before it restarted: no resize until tesserad configures it again"
            ))));
        }
        let primary = self.primaries.get(volume)?;
        Some(self.resize_through(&primary, volume, size))
    }

    fn resize_through(
        &self,
        primary: &super::primary::PrimaryHandle,
        volume: &str,
        size: u64,
    ) -> Result<VolumeInfo, RoleError> {
        let now = self.store.volume_info(volume)?.size;
        if size < now {
            return Err(StoreError::Invalid {
                field: "size",
                reason: format!("{size} is smaller than the current {now}; volumes only grow"),
            }
            .into());
        }
        // Checked as the block store checks a size, before anything is sequenced: a size
        // the copies would refuse must not reach the stream.
        tessera_blockstore::catalog::validate_size(size)?;
        // Like a client's write: a replica failing meanwhile costs a delay while the
        // cluster takes it out, not an error.
        primary
            .submit(Op::Resize { size })
            .map_err(|e| RoleError::Refused(format!("resize of {volume} to {size} bytes: {e}")))?;
        Ok(self.store.volume_info(volume)?)
    }
}
