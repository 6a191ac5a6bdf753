//! Space accounting: a write is refused, before it is logged, when the filesystem could
//! not also hold the checkpoint's copy of everything in the WAL.

use std::time::{Duration, Instant};

use super::Inner;
use crate::error::{Result, StoreError};

/// Space kept free beyond what the WAL needs, for the catalog and checksum tables.
const SPACE_RESERVE: u64 = 4 << 20;

/// Free space on the store's filesystem, re-read every few megabytes or milliseconds.
#[derive(Default)]
pub(super) struct SpaceGuard {
    checked: Option<Instant>,
    free: u64,
    since: u64,
}

impl Inner {
    /// Refuses a WAL append of `len` bytes when the filesystem could not also hold the
    /// checkpoint's copy of everything in the WAL: a full disk must fail new writes, never
    /// leave acknowledged ones that cannot be replayed.
    pub(super) fn admit(&self, len: u64) -> Result<()> {
        let mut g = self.space.lock();
        let stale = g
            .checked
            .is_none_or(|t| t.elapsed() > Duration::from_millis(200) || g.since > (8 << 20));
        if stale {
            let st = nix::sys::statvfs::statvfs(&self.dir)
                .map_err(|e| StoreError::io("checking free space", e.into()))?;
            g.free = st.blocks_available() as u64 * st.fragment_size() as u64;
            g.since = 0;
            g.checked = Some(Instant::now());
        }
        let unapplied = self.wal.unapplied();
        let need = 2 * len + unapplied + SPACE_RESERVE;
        let free = g.free.saturating_sub(g.since);
        if free < need {
            drop(g);
            self.wake_checkpoint();
            return Err(StoreError::NoSpace {
                context: format!(
                    "{free} bytes free, {need} needed to log this write and keep the log replayable"
                ),
            });
        }
        g.since += len;
        if unapplied > free / 4 {
            drop(g);
            self.wake_checkpoint();
        }
        Ok(())
    }
}
