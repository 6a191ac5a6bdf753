//! The pending-write map: the newest version of each block whose checksum is in the WAL but
//! not yet in its layer's checksum table.
//!
//! A version is either *logged* (its data is in the WAL record and held here in memory)
//! or *placed* (a large write put its data straight into the layer's data file; only the
//! hash was logged). Writers publish here from inside the WAL append (under the log's
//! lock), so the order of versions in the map is the order of records in the log. Reads
//! look here before the layer files; the checkpoint takes the blocks of sealed segments,
//! copies logged data and every hash into the layer files and then retires them; fills
//! forget the blocks they cover.
//!
//! The map is ordered (a B-tree keyed by layer and block), so the checkpoint can walk it
//! a slice at a time, taking the lock once per [`CHUNK`] blocks and letting writers
//! publish in between, instead of holding it across the whole map (a 1 GiB sequential
//! stream leaves 256 Ki placed blocks pending: one hashed walk of those under the lock
//! stalled every writer, since they publish under the log's lock). Reads and trims look
//! up runs of consecutive blocks, one descent each. And no client-chosen block number can
//! make the map degrade, as a fast non-keyed hash could.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::catalog::LayerId;
use crate::format::{BLOCK_SIZE, SUM_LEN};

/// Held for writing by a placed write from before it is published until its data is in
/// place; readers and the checkpoint take it for reading before they touch that data.
pub(super) type Gate = Arc<RwLock<()>>;

/// Where a pending version's data is.
#[derive(Clone)]
pub(super) enum Content {
    /// In the WAL record, and here: block `index` of `buf`.
    Logged { buf: Arc<Vec<u8>>, index: u32 },
    /// In place in the layer's data file, once `gate` can be taken for reading.
    ///
    /// `shadows` are the older versions of the block this one replaced whose records are
    /// still in the log (oldest first, each without shadows of its own). A checkpoint that
    /// deletes the segment of the newest of them must put that version into the table
    /// (a logged one's data and checksum, a placed one's checksum) unless a newer placed
    /// version's data is in place and made durable, or a crash before this version is
    /// durable would lose both: recovery only sees the records left in the log.
    Placed {
        gate: Gate,
        shadows: Vec<Arc<Pending>>,
    },
}

/// The newest version of a block whose checksum is not yet in its layer's table.
#[derive(Clone)]
pub(super) struct Pending {
    /// The WAL segment holding the block's record.
    pub(super) seg: u64,
    /// The block's checksum, as logged.
    pub(super) hash: [u8; SUM_LEN],
    pub(super) content: Content,
}

impl Pending {
    /// The block's content, when it is held in memory (logged versions).
    pub(super) fn block(&self) -> Option<&[u8]> {
        match &self.content {
            Content::Logged { buf, index } => {
                let start = *index as usize * BLOCK_SIZE;
                Some(&buf[start..start + BLOCK_SIZE])
            }
            Content::Placed { .. } => None,
        }
    }

    /// This version without the older ones it carries.
    fn alone(&self) -> Pending {
        match &self.content {
            Content::Placed { gate, .. } => Pending {
                content: Content::Placed {
                    gate: gate.clone(),
                    shadows: Vec::new(),
                },
                ..self.clone()
            },
            Content::Logged { .. } => self.clone(),
        }
    }

    /// Whether `other` is this very version (not just an equal one).
    fn same(&self, other: &Pending) -> bool {
        self.seg == other.seg
            && match (&self.content, &other.content) {
                (Content::Logged { buf: a, index: i }, Content::Logged { buf: b, index: j }) => {
                    Arc::ptr_eq(a, b) && i == j
                }
                (Content::Placed { gate: a, .. }, Content::Placed { gate: b, .. }) => {
                    Arc::ptr_eq(a, b)
                }
                _ => false,
            }
    }
}

/// What became of a version the checkpoint is about to copy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Fate {
    /// Still the newest version.
    Current,
    /// A newer placed version's data is (or was) in place: copying the old version would
    /// overwrite it.
    PlacedOver,
    /// Something else replaced it (or it is gone).
    Replaced,
}

/// A block of a layer: the map's key.
pub(super) type BlockKey = (LayerId, u64);

/// How many blocks the checkpoint's walks handle per hold of the map's lock (and of
/// `layer_writes`, for its copy): a few hundred microseconds at most, so a writer
/// publishing meanwhile waits for one slice, not for the whole map.
pub(super) const CHUNK: usize = 4096;

/// The keys of blocks `first..first+n` of `layer`.
fn span(layer: LayerId, first: u64, n: u64) -> (Bound<BlockKey>, Bound<BlockKey>) {
    (
        Bound::Included((layer, first)),
        Bound::Excluded((layer, first.saturating_add(n))),
    )
}

/// The keys after `last` (all keys when `None`).
fn after(last: Option<BlockKey>) -> (Bound<BlockKey>, Bound<BlockKey>) {
    match last {
        Some(k) => (Bound::Excluded(k), Bound::Unbounded),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

/// Every pending block of the store.
#[derive(Default)]
pub(super) struct PendingWrites {
    map: RwLock<BTreeMap<BlockKey, Pending>>,
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
                    hash: h,
                    content: Content::Logged {
                        buf: buf.clone(),
                        index: i as u32,
                    },
                },
            );
        }
    }

    /// Publishes the blocks of one placed record (data going to its place under `gate`).
    /// Returns the versions it replaced, block by block.
    pub(super) fn publish_placed(
        &self,
        layer: LayerId,
        start: u64,
        seg: u64,
        hashes: &[u8],
        gate: &Gate,
    ) -> Vec<Option<Pending>> {
        let mut pending = self.map.write();
        hashes
            .chunks_exact(SUM_LEN)
            .enumerate()
            .map(|(i, hash)| {
                let mut h = [0u8; SUM_LEN];
                h.copy_from_slice(hash);
                let key = (layer, start + i as u64);
                let shadows = match pending.get(&key) {
                    // A logged version of the same segment is never needed: the
                    // checkpoint that deletes it handles this newer one too. (A placed one
                    // is: its data in place keeps an older shadow from being copied over
                    // it.)
                    Some(
                        old @ Pending {
                            content: Content::Logged { .. },
                            ..
                        },
                    ) if old.seg == seg => Vec::new(),
                    Some(old) => {
                        let mut older = match &old.content {
                            Content::Placed { shadows, .. } => shadows.clone(),
                            Content::Logged { .. } => Vec::new(),
                        };
                        older.push(Arc::new(old.alone()));
                        older
                    }
                    None => Vec::new(),
                };
                pending.insert(
                    key,
                    Pending {
                        seg,
                        hash: h,
                        content: Content::Placed {
                            gate: gate.clone(),
                            shadows,
                        },
                    },
                )
            })
            .collect()
    }

    /// Undoes [`PendingWrites::publish_placed`] for a write that failed: each block still
    /// holding that write's version gets back the version it replaced.
    pub(super) fn unpublish_placed(
        &self,
        layer: LayerId,
        start: u64,
        gate: &Gate,
        replaced: Vec<Option<Pending>>,
    ) {
        let mut pending = self.map.write();
        for (i, old) in replaced.into_iter().enumerate() {
            let k = (layer, start + i as u64);
            let ours = pending.get(&k).is_some_and(
                |p| matches!(&p.content, Content::Placed { gate: g, .. } if Arc::ptr_eq(g, gate)),
            );
            if !ours {
                continue;
            }
            match old {
                Some(p) => {
                    pending.insert(k, p);
                }
                None => {
                    pending.remove(&k);
                }
            }
        }
    }

    /// For each version `p` of block `k`: whether it is still the newest version, and if
    /// not, whether a placed version newer than `p` has put its data in place (its gate is
    /// free). One read lock covers the slice. Callers hold `layer_writes` for writing, so
    /// no placed write is between taking that lock and releasing its gate.
    pub(super) fn fates(&self, versions: &[(BlockKey, Pending)]) -> Vec<Fate> {
        let map = self.map.read();
        versions.iter().map(|(k, p)| fate(&map, k, p)).collect()
    }

    /// The blocks of `first..first+n` in `layer` whose newest version is placed (their
    /// data is in the layer's data file while the table may still say otherwise).
    pub(super) fn placed_among(&self, layer: LayerId, first: u64, n: u64) -> HashSet<u64> {
        self.map
            .read()
            .range(span(layer, first, n))
            .filter(|(_, p)| matches!(p.content, Content::Placed { .. }))
            .map(|((_, b), _)| *b)
            .collect()
    }

    /// How many blocks have a pending version.
    pub(super) fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Whether block `b` of `layer` has a pending version.
    pub(super) fn contains(&self, layer: LayerId, b: u64) -> bool {
        self.map.read().contains_key(&(layer, b))
    }

    /// Forgets blocks `first..first+n` of `layer` (a fill replaced them).
    pub(super) fn forget(&self, layer: LayerId, first: u64, n: u64) {
        let mut pending = self.map.write();
        let gone: Vec<BlockKey> = pending
            .range(span(layer, first, n))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            pending.remove(&k);
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
        let mut filled = 0;
        for ((_, b), p) in pending.range(span(layer, first, slots.len() as u64)) {
            let slot = &mut slots[(b - first) as usize];
            if slot.is_none() {
                *slot = Some(wrap(p.clone()));
                filled += 1;
            }
        }
        filled
    }

    /// For each block with a version logged in a segment up to `sealed`, the newest such
    /// version (the current one, or a shadow of it), sorted by layer and block.
    ///
    /// Taken a slice at a time: a block's version may change between slices, as it may
    /// after the walk, and each block is handled on its own (the checkpoint asks every
    /// version's fate again before it copies, and retires only versions still current).
    /// Nothing is logged into a segment up to `sealed` any more, so no block gains such a
    /// version meanwhile, and fills, which drop versions, wait for the checkpoint.
    pub(super) fn logged_upto(&self, sealed: u64) -> Vec<(BlockKey, Pending)> {
        let mut todo: Vec<(BlockKey, Pending)> = Vec::new();
        let mut last = None;
        loop {
            let pending = self.map.read();
            let mut seen = 0;
            for (k, p) in pending.range(after(last)).take(CHUNK) {
                seen += 1;
                last = Some(*k);
                if p.seg <= sealed {
                    todo.push((*k, p.clone()));
                    continue;
                }
                if let Content::Placed { shadows, .. } = &p.content {
                    if let Some(sh) = shadows.iter().rev().find(|sh| sh.seg <= sealed) {
                        todo.push((*k, (**sh).clone()));
                    }
                }
            }
            if seen < CHUNK {
                return todo;
            }
        }
    }

    /// Forgets the shadows (see [`Content::Placed`]) logged in segments up to `sealed`:
    /// the checkpoint has copied them or made the versions over them durable.
    pub(super) fn drop_shadows_upto(&self, sealed: u64) {
        let mut last = None;
        loop {
            let mut pending = self.map.write();
            let mut seen = 0;
            for (k, p) in pending.range_mut(after(last)).take(CHUNK) {
                seen += 1;
                last = Some(*k);
                if let Content::Placed { shadows, .. } = &mut p.content {
                    shadows.retain(|sh| sh.seg > sealed);
                }
            }
            if seen < CHUNK {
                return;
            }
        }
    }

    /// Removes blocks now in their layer files, unless a newer record replaced them.
    /// A slice at a time, so writers publish in between.
    pub(super) fn retire(&self, done: &[(BlockKey, Pending)]) {
        for slice in done.chunks(CHUNK) {
            let mut pending = self.map.write();
            for (k, p) in slice {
                if pending.get(k).is_some_and(|cur| cur.same(p)) {
                    pending.remove(k);
                }
            }
        }
    }

    /// Whether any block of `layer` has a pending version.
    pub(super) fn holds_layer(&self, layer: LayerId) -> bool {
        self.map
            .read()
            .range(span(layer, 0, u64::MAX))
            .next()
            .is_some()
    }

    /// Calls `f` with those of `blocks` (of `layer`) that have no pending version, holding
    /// the map's read lock until `f` returns, so that no version of them is published
    /// meanwhile.
    ///
    /// For a merge writing checksum entries into a layer that takes writes: a placed
    /// writer publishes first and then reads the table to tell whether it overwrites data
    /// in place, so with this lock held across the check and the entries' write, it either
    /// published before (the block is left to it) or finds the entry and makes its record
    /// durable before writing over that data.
    pub(super) fn while_unwritten<R>(
        &self,
        layer: LayerId,
        blocks: &[u64],
        f: impl FnOnce(&[u64]) -> R,
    ) -> R {
        let pending = self.map.read();
        let free: Vec<u64> = blocks
            .iter()
            .copied()
            .filter(|b| !pending.contains_key(&(layer, *b)))
            .collect();
        f(&free)
    }
}

/// [`PendingWrites::fates`] of one version.
fn fate(map: &BTreeMap<BlockKey, Pending>, k: &BlockKey, p: &Pending) -> Fate {
    let Some(cur) = map.get(k) else {
        return Fate::Replaced;
    };
    if cur.same(p) {
        return Fate::Current;
    }
    let Content::Placed { gate, shadows } = &cur.content else {
        return Fate::Replaced;
    };
    let in_place = |v: &Pending| match &v.content {
        Content::Placed { gate, .. } => gate.try_read().is_some(),
        Content::Logged { .. } => false,
    };
    let newer_in_place = gate.try_read().is_some()
        || shadows
            .iter()
            .skip_while(|sh| !sh.same(p))
            .skip(1)
            .any(|sh| in_place(sh));
    if newer_in_place {
        Fate::PlacedOver
    } else {
        Fate::Replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map holding more than a few slices: the checkpoint's sliced walks must see every
    /// block once, in order, and a slice boundary must not lose or repeat one.
    #[test]
    fn sliced_walks_cover_every_block_across_slices() {
        let map = PendingWrites::default();
        let n = (CHUNK * 2 + 17) as u64;
        let buf = Arc::new(vec![7u8; BLOCK_SIZE * n as usize]);
        let hashes = vec![1u8; SUM_LEN * n as usize];
        // Two layers, logged in segment 1; layer 9 first in the map's order.
        map.publish(9, 0, 1, &buf, &hashes);
        map.publish(3, 100, 1, &buf, &hashes);
        // A placed write in segment 2 over a run crossing the first slice boundary of
        // layer 3: its blocks carry the logged versions as shadows.
        let gate: Gate = Arc::new(RwLock::new(()));
        let over = CHUNK as u64 - 10;
        let replaced = map.publish_placed(3, 100 + over, 2, &vec![2u8; SUM_LEN * 20], &gate);
        assert!(replaced.iter().all(Option::is_some));

        let todo = map.logged_upto(1);
        assert_eq!(todo.len(), 2 * n as usize);
        assert!(
            todo.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no repeats"
        );
        assert!(todo.iter().all(|(_, p)| p.seg == 1 && p.block().is_some()));
        // The shadowed blocks were replaced by a placed write whose data is in place (its
        // gate is free): their logged versions must not be copied over it.
        let fates = map.fates(&todo);
        for ((k, _), f) in todo.iter().zip(&fates) {
            let shadowed = k.0 == 3 && (100 + over..100 + over + 20).contains(&k.1);
            let want = if shadowed {
                Fate::PlacedOver
            } else {
                Fate::Current
            };
            assert_eq!(*f, want, "block {k:?}");
        }

        map.retire(&todo);
        map.drop_shadows_upto(1);
        assert_eq!(map.len(), 20, "only the placed blocks stay");
        assert_eq!(map.placed_among(3, 0, u64::MAX / 2).len(), 20);
        assert!(map.logged_upto(1).is_empty(), "no shadow of segment 1 left");
        assert!(!map.holds_layer(9) && map.holds_layer(3));

        // Reads see the placed run through one range lookup; a trim forgets part of it.
        let mut slots: Vec<Option<u64>> = vec![None; 40];
        let filled = map.fill_slots(3, 100 + over - 10, &mut slots, |p| p.seg);
        assert_eq!(filled, 20);
        assert!(slots[10..30].iter().all(|s| *s == Some(2)));
        map.forget(3, 100 + over + 5, 10);
        assert_eq!(map.len(), 10);
        assert!(!map.contains(3, 100 + over + 5) && map.contains(3, 100 + over + 15));
    }
}
