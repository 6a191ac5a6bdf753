//! The window of the last changes applied to each volume's copy on this store, as a
//! replica or as the primary: where the copies may differ after a failover.
//!
//! A primary completes a request only when every in-sync copy has it, but sends it to
//! all of them at once; if it dies (or is cut off) with requests in flight, some copies
//! applied them and others did not, and nobody will ever complete them. Those requests
//! lie among the last [`MAX_PENDING`] the old primary sent (it never has more
//! uncompleted), so on every copy among its last applied changes: a window of
//! [`WINDOW`] changes covers them, also when they were sent again after a generation
//! change. The new primary asks every in-sync replica for its window (`Unsettled`),
//! adds its own, and writes its content of all those regions to every copy before any
//! client request (`primary/reconcile.rs`). Kept in memory: a copy that restarted is
//! not in sync and is compared with the primary when it is caught up.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tessera_replication::primary::op_region;
use tessera_replication::regions::{Region, RegionSet};
use tessera_replication::replica::Op;

/// Most requests a primary of this store has in flight (sent and not completed); more
/// wait before they are given to the state machine.
pub const MAX_PENDING: usize = 1024;
/// Changes remembered per volume: room for the old primary's in-flight window twice
/// over (it is sent again, in full, after each generation change).
pub const WINDOW: usize = 4 * MAX_PENDING;

/// Per volume, the regions of its last [`WINDOW`] applied changes (`None`: a flush,
/// snapshot or resize, which count as one change and touch no block).
#[derive(Clone, Default)]
pub struct Recent {
    by_volume: Arc<Mutex<HashMap<String, VecDeque<Option<Region>>>>>,
}

impl Recent {
    /// `op` was applied to `volume`'s copy here.
    pub fn note(&self, volume: &str, op: &Op) {
        let mut map = self.by_volume.lock();
        let window = map.entry(volume.to_string()).or_default();
        if window.len() == WINDOW {
            window.pop_front();
        }
        window.push_back(op_region(op));
    }

    /// The regions the window of `volume` touched, merged.
    pub fn regions(&self, volume: &str) -> RegionSet {
        let mut set = RegionSet::new();
        if let Some(window) = self.by_volume.lock().get(volume) {
            for r in window.iter().flatten() {
                set.insert(*r);
            }
        }
        set
    }

    /// Forgets `volume` (deleted, or its copy replaced).
    pub fn forget(&self, volume: &str) {
        self.by_volume.lock().remove(volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_last_changes_merged() {
        let r = Recent::default();
        for i in 0..(WINDOW as u64 + 10) {
            r.note(
                "v",
                &Op::WriteZeroes {
                    offset: i * 4096,
                    len: 4096,
                },
            );
        }
        r.note("v", &Op::Flush);
        let set = r.regions("v");
        let all: Vec<Region> = set.iter().collect();
        // The flush pushed one more out: the first 11 writes are gone.
        assert_eq!(
            all,
            vec![Region {
                offset: 11 * 4096,
                len: (WINDOW as u64 - 1) * 4096
            }]
        );
        assert!(r.regions("w").is_empty());
        r.forget("v");
        assert!(r.regions("v").is_empty());
    }
}
