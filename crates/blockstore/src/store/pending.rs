//! The pending-write map: the newest version of each block that is in the WAL but not yet
//! in its layer file.
//!
//! Writers publish here from inside the WAL append (under the log's lock), so the order
//! of versions in the map is the order of records in the log. Reads look here before the
//! layer files; the checkpoint takes the blocks of sealed segments, copies them into the
//! layer files and then retires them; fills forget the blocks they cover.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::catalog::LayerId;
use crate::format::{BLOCK_SIZE, SUM_LEN};

/// The newest version of a block that is in the WAL but not yet in its layer file.
#[derive(Clone)]
pub(super) struct Pending {
    /// The WAL segment holding the block's record.
    pub(super) seg: u64,
    buf: Arc<Vec<u8>>,
    index: u32,
    /// The block's checksum, as logged.
    pub(super) hash: [u8; SUM_LEN],
}

impl Pending {
    /// The block's content.
    pub(super) fn block(&self) -> &[u8] {
        let start = self.index as usize * BLOCK_SIZE;
        &self.buf[start..start + BLOCK_SIZE]
    }
}

/// A block of a layer: the map's key.
pub(super) type BlockKey = (LayerId, u64);

/// Every pending block of the store.
#[derive(Default)]
pub(super) struct PendingWrites {
    map: RwLock<HashMap<BlockKey, Pending>>,
}

impl PendingWrites {
    /// Publishes the blocks of one data record: block `start + i` is the `i`-th block of
    /// `buf`, with the `i`-th checksum of `hashes`.
    pub(super) fn publish(
        &self,
        layer: LayerId,
        start: u64,
        seg: u64,
        buf: &Arc<Vec<u8>>,
        hashes: &[u8],
    ) {
        let mut pending = self.map.write();
        for (i, hash) in hashes.chunks_exact(SUM_LEN).enumerate() {
            let mut h = [0u8; SUM_LEN];
            h.copy_from_slice(hash);
            pending.insert(
                (layer, start + i as u64),
                Pending {
                    seg,
                    buf: buf.clone(),
                    index: i as u32,
                    hash: h,
                },
            );
        }
    }

    /// Forgets blocks `first..first+n` of `layer` (a fill replaced them).
    pub(super) fn forget(&self, layer: LayerId, first: u64, n: u64) {
        let mut pending = self.map.write();
        if (n as usize) < pending.len() {
            for b in first..first + n {
                pending.remove(&(layer, b));
            }
        } else {
            pending.retain(|(l, b), _| !(*l == layer && (first..first + n).contains(b)));
        }
    }

    /// For each empty slot `i`, puts in `wrap(pending)` when block `first + i` of `layer`
    /// is pending. Returns how many slots it filled. One read lock covers the whole call.
    pub(super) fn fill_slots<T>(
        &self,
        layer: LayerId,
        first: u64,
        slots: &mut [Option<T>],
        wrap: impl Fn(Pending) -> T,
    ) -> usize {
        let pending = self.map.read();
        if pending.is_empty() {
            return 0;
        }
        let mut filled = 0;
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_none() {
                if let Some(p) = pending.get(&(layer, first + i as u64)) {
                    *slot = Some(wrap(p.clone()));
                    filled += 1;
                }
            }
        }
        filled
    }

    /// The blocks logged in segments up to `sealed`, sorted by layer and block.
    pub(super) fn logged_upto(&self, sealed: u64) -> Vec<(BlockKey, Pending)> {
        let mut todo: Vec<(BlockKey, Pending)> = self
            .map
            .read()
            .iter()
            .filter(|(_, p)| p.seg <= sealed)
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        todo.sort_unstable_by_key(|(k, _)| *k);
        todo
    }

    /// Removes blocks now in their layer files, unless a newer record replaced them.
    pub(super) fn retire(&self, done: &[(BlockKey, Pending)]) {
        let mut pending = self.map.write();
        for (k, p) in done {
            if pending.get(k).is_some_and(|cur| cur.seg == p.seg) {
                pending.remove(k);
            }
        }
    }
}
