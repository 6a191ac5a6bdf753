//! Merging a layer into its only child: how deleting a snapshot gives the snapshot's space
//! back while the volume stays in use (what qemu's block-commit/block-stream and Proxmox's
//! snapshot delete do).
//!
//! When a deleted snapshot's layer L is left as the backing of exactly one layer C (no
//! other snapshot or clone builds on it), everything L holds that C does not is carried
//! into C; then the catalog makes L's backing C's and L's files go. Blocks C holds win:
//! its data, its markers and ranges, and writes to it still pending in the WAL are all
//! newer than L. L holds two kinds of things:
//! - *data* blocks, copied block by block (below);
//! - *zero* blocks (its zero ranges, and zero markers in its table), which hide a layer
//!   below L: carried as ranges with [`LayerFiles::zero_where_absent`], so a trimmed TiB
//!   costs C a few 32-byte records, not a marker per block. Only where L has a backing:
//!   without one, zero and absent read alike.
//!
//! The work goes in batches, under the checkpoint's locks, released between batches so I/O
//! goes on (see `docs/storage.md`, "Concurrency"):
//! - `apply` for writing, the whole batch: no fill writes a marker or range and no
//!   checkpoint copies or retires a pending version while the batch decides and writes;
//! - for data, `layer_writes` for writing, first while the batch writes C's data into C's
//!   holes, then again while it writes C's checksum entries, never across the sync
//!   between the two: a placed write's data waits for it, and a read retrying after a
//!   mismatch never sees half a copy.
//!
//! A data block is copied only where C's table says *absent* and no version of it is
//! pending, checked under those locks. The entries are written holding the pending map's
//! read lock ([`PendingWrites::while_unwritten`]): a placed writer publishes its version
//! before it reads the table, so it either published first (the block is left to it) or
//! sees the copied entry and makes its record durable before overwriting that data, as
//! for any overwrite in place.
//!
//! A zero range needs neither check: it only changes blocks C's table does not hold (a
//! table entry wins over a range, whenever it is written), changes no data, and covers
//! only blocks that read as zero in L, so the old chain (C over L) reads every block the
//! same with or without it. A version of a block pending in C when the range goes in
//! still wins: reads look in the pending map before C's table; the version leaves the map
//! only once the checkpoint wrote its table entry (which beats the range) or a fill wrote
//! its own markers; a placed write that fails is unpublished and the block reads the
//! range, i.e. L's zeroes, which is what it read before; after a crash, replay writes the
//! entry of every record that survived, and a write that did not survive was never
//! flushed. Nor does the range make a placed write into C an overwrite in place: there
//! is still no data entry under it.
//!
//! Crash safety: C's data is synced before the entries naming it are written, so every
//! entry that reaches the disk has its data there. C is synced again (which makes its
//! ranges durable), and the WAL flushed, before the catalog stops naming L: the new chain
//! then finds in C, or in the WAL replayed into C, everything the old one found in C or L.
//!
//! Finding L's work: its zero ranges come as ranges ([`LayerFiles::zero_ranges`]); only
//! the blocks between them are looked up entry by entry. `LayerFiles` offers no list of
//! the table chunks it holds, so a layer with few ranges is still scanned block by block
//! up to the end of its table (an in-memory scan, no I/O).
//!
//! [`PendingWrites::while_unwritten`]: super::pending::PendingWrites::while_unwritten

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Store;
use crate::catalog::{Catalog, LayerId};
use crate::error::{Result, StoreError};
use crate::format::{block_hash, BlockEntry, BLOCK, BLOCK_SIZE, SUM_LEN};
use crate::hooks::Point;
use crate::layer::LayerFiles;

mod scan;

use scan::{Scan, Work};

/// Data blocks of the layer one batch copies at most: 4 MiB of data, one sync of the child.
pub(super) const MERGE_BATCH: usize = 1024;
/// How often a long merge logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A layer to merge into its only child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MergePlan {
    /// The layer that goes.
    pub(super) layer: LayerId,
    /// The only layer built on it, which receives its blocks.
    pub(super) child: LayerId,
    /// The layer's own backing, which becomes the child's.
    pub(super) backing: Option<LayerId>,
}

/// How `layer` can be merged in `cat`, if it is reachable only as the backing of exactly
/// one layer: no volume writes to it and no snapshot names it. `cat` is garbage-collected
/// (`Catalog::collect_garbage`), so every layer in it is reachable and counts as a child.
pub(super) fn plan(cat: &Catalog, layer: LayerId) -> Option<MergePlan> {
    let meta = cat.layers.get(&layer)?;
    let named = cat
        .volumes
        .values()
        .any(|v| v.top == layer || v.snapshots.values().any(|s| s.layer == layer));
    if named {
        return None;
    }
    let mut children = cat
        .layers
        .iter()
        .filter(|(_, m)| m.backing == Some(layer))
        .map(|(id, _)| *id);
    let child = children.next()?;
    if children.next().is_some() {
        return None;
    }
    Some(MergePlan {
        layer,
        child,
        backing: meta.backing,
    })
}

/// What a copy did, for the log.
#[derive(Default)]
struct Tally {
    data: u64,
    zero_ranges: u64,
    zero_blocks: u64,
}

/// The two layers of a merge, open.
struct Pair {
    from: Arc<LayerFiles>,
    into: Arc<LayerFiles>,
    /// Whether the layer's zero blocks are carried: they hide a layer below it, which the
    /// child would otherwise see through once the layer is gone.
    zeroes: bool,
}

impl Store {
    /// Carries into `plan.child` everything `plan.layer` holds that the child does not.
    /// Returns the data blocks the copy left to writes pending in the child (see
    /// [`Store::merge_unfinished`]). `what` names the deleted snapshot, for the log.
    pub(super) fn merge_copy_layer(&self, plan: &MergePlan, what: &str) -> Result<Vec<u64>> {
        // The layer is frozen (no volume writes to it), but versions logged before it was
        // frozen may still be pending: the checkpoint puts them in its table first.
        self.inner.checkpoint()?;
        if self.inner.pending.holds_layer(plan.layer) {
            return Err(StoreError::Busy(
                what.to_string(),
                format!(
                    "layer {} still has writes waiting for a checkpoint (an earlier \
                     checkpoint failed); try again",
                    plan.layer
                ),
            ));
        }
        let pair = self.merge_pair(plan)?;
        let end = pair.from.table_blocks()?;
        tracing::info!(
            snapshot = what,
            layer = plan.layer,
            into = plan.child,
            blocks = end,
            "merging the deleted snapshot's layer into its child"
        );
        let started = Instant::now();
        let mut logged = started;
        let mut tally = Tally::default();
        let mut watch = Vec::new();
        let mut scan = Scan::new(&pair, end);
        let mut batch = 0;
        while let Some(work) = scan.next_batch()? {
            self.inner.at(Point::MergeBatch(batch))?;
            match work {
                Work::Zeros(runs) => self.merge_zeros(&pair, &runs, &mut tally)?,
                Work::Data(blocks) => {
                    watch.extend(self.merge_batch(&pair, &blocks, &mut tally, what)?);
                }
            }
            batch += 1;
            if logged.elapsed() >= PROGRESS_EVERY {
                logged = Instant::now();
                tracing::info!(
                    snapshot = what,
                    layer = plan.layer,
                    scanned = scan.scanned(),
                    of = end,
                    copied = tally.data,
                    "merging: progress"
                );
            }
        }
        self.inner.synced(|| pair.into.sync())?;
        tracing::info!(
            snapshot = what,
            layer = plan.layer,
            into = plan.child,
            data_blocks = tally.data,
            zero_ranges = tally.zero_ranges,
            zero_blocks = tally.zero_blocks,
            left_to_pending_writes = watch.len(),
            secs = started.elapsed().as_secs_f64(),
            "copied the layer into its child"
        );
        Ok(watch)
    }

    /// Copies data blocks `blocks` (ascending) of `plan.layer` into the child, where it
    /// lacks them; for blocks an earlier pass left to a write that did not happen after
    /// all.
    pub(super) fn merge_copy_blocks(
        &self,
        plan: &MergePlan,
        blocks: &[u64],
        what: &str,
    ) -> Result<Vec<u64>> {
        let pair = self.merge_pair(plan)?;
        let mut tally = Tally::default();
        let mut watch = Vec::new();
        for chunk in blocks.chunks(MERGE_BATCH) {
            watch.extend(self.merge_batch(&pair, chunk, &mut tally, what)?);
        }
        self.inner.synced(|| pair.into.sync())?;
        Ok(watch)
    }

    /// Of `watch` (blocks a copy left to pending writes of the child), those the child
    /// still lacks: absent from its table with no version pending, because the placed
    /// write that was pending failed and was undone. The caller keeps writes to the child
    /// out (its volume's runtime held for writing), so none is in flight.
    pub(super) fn merge_unfinished(&self, plan: &MergePlan, watch: &[u64]) -> Result<Vec<u64>> {
        if watch.is_empty() {
            return Ok(Vec::new());
        }
        let into = self.layer(plan.child)?;
        let mut missing = Vec::new();
        for r in runs(watch) {
            let first = watch[r.start];
            let have = into.read_entries(first, r.len())?;
            for (i, e) in have.iter().enumerate() {
                let b = first + i as u64;
                if *e == BlockEntry::Absent && !self.inner.pending.contains(plan.child, b) {
                    missing.push(b);
                }
            }
        }
        Ok(missing)
    }

    fn merge_pair(&self, plan: &MergePlan) -> Result<Pair> {
        Ok(Pair {
            from: self.layer(plan.layer)?,
            into: self.layer(plan.child)?,
            zeroes: plan.backing.is_some(),
        })
    }

    /// Makes the runs of `runs` read as zero in the child where its table holds nothing
    /// (see the module's comment for why pending versions need no check). Holds `apply`
    /// like every batch, so no fill or checkpoint changes the child meanwhile.
    fn merge_zeros(&self, pair: &Pair, runs: &[(u64, u64)], tally: &mut Tally) -> Result<()> {
        let _apply = self.inner.apply.write();
        for &(first, end) in runs {
            pair.into.zero_where_absent(first, end - first)?;
            tally.zero_ranges += 1;
            tally.zero_blocks += end - first;
        }
        Ok(())
    }

    /// Copies one batch of data blocks of the layer (ascending) into the child where it
    /// lacks them. Returns the blocks left to the child's pending writes.
    fn merge_batch(
        &self,
        pair: &Pair,
        blocks: &[u64],
        tally: &mut Tally,
        what: &str,
    ) -> Result<Vec<u64>> {
        let (from, into) = (&pair.from, &pair.into);
        let inner = &self.inner;
        let _apply = inner.apply.write();
        let mut watch = Vec::new();
        // 1. Choose, and put the data in the child's holes. Its table does not point
        //    there yet, so a crash from here to the entries leaves nothing to read.
        let chosen: Vec<(u64, [u8; SUM_LEN])> = {
            let _changing = inner.layer_writes.write();
            let mut wanted = Vec::new();
            for r in runs(blocks) {
                let first = blocks[r.start];
                let held = from.read_entries(first, r.len())?;
                let have = into.read_entries(first, r.len())?;
                for (i, (e, c)) in held.iter().zip(&have).enumerate() {
                    if let (BlockEntry::Data(h), BlockEntry::Absent) = (e, c) {
                        wanted.push((first + i as u64, *h));
                    }
                }
            }
            let wanted_blocks: Vec<u64> = wanted.iter().map(|(b, _)| *b).collect();
            let free = inner
                .pending
                .while_unwritten(into.id, &wanted_blocks, <[u64]>::to_vec);
            let chosen = keep_only(wanted, &free, &mut watch);
            copy_data(from, into, &chosen, what)?;
            chosen
        };
        if chosen.is_empty() {
            return Ok(watch);
        }
        // 2. Data before the entries that name it.
        inner.synced(|| into.sync())?;
        // 3. The entries, where the data is still what was copied: a placed write may have
        //    come in since (it is pending, and wins) or failed after writing part of its
        //    data (it left no trace but that: the block is left for another pass).
        let _changing = inner.layer_writes.write();
        let intact = still_copied(into, chosen, &mut watch)?;
        let intact_blocks: Vec<u64> = intact.iter().map(|(b, _)| *b).collect();
        let written =
            inner
                .pending
                .while_unwritten(into.id, &intact_blocks, |free| -> Result<Vec<u64>> {
                    let todo = subsequence(&intact, free);
                    write_absent_entries(into, &todo)
                })?;
        for (b, _) in &intact {
            if written.binary_search(b).is_err() {
                watch.push(*b);
            } else {
                tally.data += 1;
            }
        }
        watch.sort_unstable();
        Ok(watch)
    }
}

/// Of `wanted`, those in `free` (both ascending); the others go to `watch`.
fn keep_only(
    wanted: Vec<(u64, [u8; SUM_LEN])>,
    free: &[u64],
    watch: &mut Vec<u64>,
) -> Vec<(u64, [u8; SUM_LEN])> {
    let mut kept = Vec::with_capacity(free.len());
    for (b, h) in wanted {
        if free.binary_search(&b).is_ok() {
            kept.push((b, h));
        } else {
            watch.push(b);
        }
    }
    kept
}

/// Reads the data blocks `chosen` from the layer, verifying each against its checksum,
/// and writes them at the same place in the child's data file.
fn copy_data(
    from: &LayerFiles,
    into: &LayerFiles,
    chosen: &[(u64, [u8; SUM_LEN])],
    what: &str,
) -> Result<()> {
    let blocks: Vec<u64> = chosen.iter().map(|(b, _)| *b).collect();
    for r in runs(&blocks) {
        let first = blocks[r.start];
        let mut buf = vec![0u8; r.len() * BLOCK_SIZE];
        from.read_blocks(first, &mut buf)?;
        for (i, block) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
            if block_hash(block) != chosen[r.start + i].1 {
                let b = first + i as u64;
                tracing::error!(
                    snapshot = what,
                    layer = from.id,
                    block = b,
                    "checksum mismatch while merging a deleted snapshot's layer"
                );
                return Err(StoreError::Io {
                    context: format!(
                        "deleting snapshot {what}: block {b} (offset {}) of its layer {} \
                         fails its checksum, so the layer cannot be merged; the snapshot is \
                         kept and the volume unchanged (run scrub)",
                        b * BLOCK,
                        from.id
                    ),
                    cause: std::io::Error::from_raw_os_error(nix::libc::EIO),
                });
            }
        }
        into.write_blocks(first, &buf)?;
    }
    Ok(())
}

/// Of `chosen`, the blocks whose data in the child is still the copy; the others go to
/// `watch`.
fn still_copied(
    into: &LayerFiles,
    chosen: Vec<(u64, [u8; SUM_LEN])>,
    watch: &mut Vec<u64>,
) -> Result<Vec<(u64, [u8; SUM_LEN])>> {
    let blocks: Vec<u64> = chosen.iter().map(|(b, _)| *b).collect();
    let mut ok = vec![false; chosen.len()];
    for r in runs(&blocks) {
        let first = blocks[r.start];
        let mut buf = vec![0u8; r.len() * BLOCK_SIZE];
        into.read_blocks(first, &mut buf)?;
        for (i, block) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
            ok[r.start + i] = block_hash(block) == chosen[r.start + i].1;
        }
    }
    let mut intact = Vec::with_capacity(chosen.len());
    for ((b, h), ok) in chosen.into_iter().zip(ok) {
        if ok {
            intact.push((b, h));
        } else {
            watch.push(b);
        }
    }
    Ok(intact)
}

/// The entries of `all` (ascending) whose blocks are in `some`, a subsequence of them.
fn subsequence(all: &[(u64, [u8; SUM_LEN])], some: &[u64]) -> Vec<(u64, [u8; SUM_LEN])> {
    let mut out = Vec::with_capacity(some.len());
    let mut it = all.iter();
    for b in some {
        if let Some(found) = it.find(|(x, _)| x == b) {
            out.push(*found);
        }
    }
    out
}

/// Writes the data entries of `todo` (ascending) into the child's table where it still
/// says absent, a stretch of neighbours per write; returns the blocks written. Nothing
/// else writes the child's table while the merge holds `apply`, so all are, unless a bug
/// says otherwise: then the block is left alone rather than overwritten.
fn write_absent_entries(into: &LayerFiles, todo: &[(u64, [u8; SUM_LEN])]) -> Result<Vec<u64>> {
    let blocks: Vec<u64> = todo.iter().map(|(b, _)| *b).collect();
    let mut written = Vec::with_capacity(todo.len());
    for r in runs(&blocks) {
        let first = blocks[r.start];
        let have = into.read_entries(first, r.len())?;
        let mut i = 0;
        while i < have.len() {
            if have[i] != BlockEntry::Absent {
                i += 1;
                continue;
            }
            let start = i;
            let mut raw = Vec::new();
            while i < have.len() && have[i] == BlockEntry::Absent {
                raw.extend_from_slice(&BlockEntry::Data(todo[r.start + i].1).encode());
                written.push(first + i as u64);
                i += 1;
            }
            into.write_entries(first + start as u64, &raw)?;
        }
    }
    Ok(written)
}

/// The runs of consecutive numbers in `blocks` (ascending), as index ranges.
fn runs(blocks: &[u64]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=blocks.len() {
        if i == blocks.len() || blocks[i] != blocks[i - 1] + 1 {
            if start < i {
                out.push(start..i);
            }
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_split_at_gaps() {
        assert!(runs(&[]).is_empty());
        assert_eq!(runs(&[7]), vec![std::ops::Range { start: 0, end: 1 }]);
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9]), [0..3, 3..5, 5..6]);
    }
}
