//! Overwrite intents: one durable log record that lets many placed writes overwrite data
//! in place without each waiting for its own record's `fdatasync`.
//!
//! A placed write over data in place must leave recovery able to tell an unflushed
//! overwrite (the data no longer matches the table, and that is allowed) from corruption.
//! Its own record, made durable first, did that, at one `fdatasync` per write: a 1 MiB
//! sequential overwrite stream ran at under half of `nbdkit file` on a disk. An *intent*
//! record names a range of a layer (the write's blocks and the next ones, up to
//! [`INTENT_MAX_BLOCKS`]); once it is durable, a placed write inside the range whose
//! record lands in the intent's segment or an earlier one may overwrite in place at once,
//! provided every block it covers is durably named in the table as data (see
//! [`Inner::may_intend`]). Recovery checks every block of an intent still in the log and,
//! where nothing in the log holds and the bytes in place differ from the table's data
//! entry, takes the bytes in place (docs/storage.md, "Large writes").
//!
//! Why the segment rule: the checkpoint that deletes the intent's segment has settled
//! every placed write recorded up to it (it waits for their data, syncs it and writes
//! their checksums), so the intent is needed exactly as long as it lives.
//!
//! Why only over durable data entries: the bytes under a durable data entry are durable
//! (the checkpoint, the merge and recovery sync data before the entry naming it), so
//! whatever differs from them in place was written later, by a write at least as new as
//! any flushed one. Under a marker or a hole the bytes may be stale (a trim's punch need
//! not be durable), and keeping them could serve data older than a flushed trim.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use super::Inner;
use crate::catalog::LayerId;
use crate::error::Result;
use crate::format::{BlockEntry, RecordHeader, RecordKind};
use crate::layer::LayerFiles;

/// Largest range one intent names (16 MiB): a 1 MiB sequential stream then syncs once per
/// 16 writes, and a crash makes recovery hash at most this much per intent in the log.
pub(super) const INTENT_MAX_BLOCKS: u64 = 4096;
/// How far past a write its intent reaches, in multiples of the write's length: enough
/// for the writes that follow a sequential one, little for random ones.
const INTENT_AHEAD: u64 = 16;
/// Blocks named by intents in one segment that wake the checkpoint (4 GiB): each block
/// of an intent still in the log is read and hashed by recovery after a crash.
const INTENT_WAKE_BLOCKS: u64 = 1 << 20;

/// The durable intents, and the layers whose table holds entries not yet synced.
#[derive(Default)]
pub(super) struct Intents {
    ranges: Mutex<IntentState>,
    /// Blocks whose entries a checkpoint is writing where a cut could leave an entry
    /// that does not describe durable bytes, or let recovery walk back past a newer
    /// version: a logged version's copy (its data and entry reach the disk in any order),
    /// or a data entry replacing a marker or a hole (a cut may bring those back). As
    /// `(layer, first) -> end`, disjoint; from before the first entry is written until the
    /// checkpoint deleted the segments of the versions it named (or for good, if it
    /// failed, until the next one succeeds). A checkpoint that only names placed
    /// versions' checksums over data entries (a stream of overwrites) marks nothing: their
    /// data was synced before, and an older entry over it is as good after a cut.
    unsynced: Mutex<BTreeMap<(LayerId, u64), u64>>,
}

#[derive(Default)]
struct IntentState {
    /// By (layer, first block): (end block, segment).
    by_start: BTreeMap<(LayerId, u64), (u64, u64)>,
    /// The newest segment an intent went to, and the blocks intents named in it.
    seg: u64,
    blocks: u64,
}

impl Intents {
    /// Whether a durable intent in segment `seg` or later covers `first..end` of `layer`.
    fn covers(&self, layer: LayerId, first: u64, end: u64, seg: u64) -> bool {
        let g = self.ranges.lock();
        g.by_start
            .range((layer, 0)..=(layer, first))
            .rev()
            .take(8)
            .any(|(_, &(e, s))| e >= end && s >= seg)
    }

    /// Records a durable intent; returns whether the checkpoint should be woken.
    fn insert(&self, layer: LayerId, first: u64, end: u64, seg: u64, record_seg: u64) -> bool {
        let mut g = self.ranges.lock();
        // Intents of segments older than the record's cannot cover later writes.
        if g.by_start.len() >= 4096 {
            g.by_start.retain(|_, &mut (_, s)| s >= record_seg);
        }
        let slot = g.by_start.entry((layer, first)).or_insert((end, seg));
        if (slot.1, slot.0) < (seg, end) {
            *slot = (end, seg);
        }
        if seg > g.seg {
            g.seg = seg;
            g.blocks = 0;
        }
        g.blocks += end - first;
        g.blocks >= INTENT_WAKE_BLOCKS
    }

    /// A checkpoint is about to write the entries of `ranges` (`(layer, first, end)`,
    /// sorted).
    pub(super) fn entries_writing(&self, ranges: &[(LayerId, u64, u64)]) {
        let mut u = self.unsynced.lock();
        for &(layer, first, end) in ranges {
            // Merged with what overlaps it, so the map stays disjoint.
            let (mut lo, mut hi) = (first, end);
            let over: Vec<(LayerId, u64)> = u
                .range((layer, 0)..(layer, end.saturating_add(1)))
                .filter(|(_, &e)| e >= first)
                .map(|(k, _)| *k)
                .collect();
            for k in over {
                if let Some(e) = u.remove(&k) {
                    lo = lo.min(k.1);
                    hi = hi.max(e);
                }
            }
            u.insert((layer, lo), hi);
        }
    }

    /// The checkpoint synced what it wrote and deleted the segments whose versions it
    /// named. Checkpoints run one at a time, and a later one names again whatever a
    /// failed one did not retire.
    pub(super) fn entries_synced(&self) {
        self.unsynced.lock().clear();
    }

    /// Whether a checkpoint is writing entries of `first..end` of `layer` (see
    /// `unsynced`).
    fn entries_unsettled(&self, layer: LayerId, first: u64, end: u64) -> bool {
        let u = self.unsynced.lock();
        u.range((layer, 0)..(layer, end))
            .next_back()
            .is_some_and(|(_, &e)| e > first)
    }
}

impl Inner {
    /// Whether a placed write over blocks `first..first + n` of `top` may rely on an
    /// intent instead of its own durable record: every block's entry in the table is
    /// data, and durably so, with no record of it left in the log that recovery could
    /// take over newer bytes (no fill whose markers may not be durable covers them, no
    /// checkpoint is writing entries there that a cut could undo or leave without their
    /// data: see `unsynced`). Callers hold `layer_writes` for
    /// reading when the answer decides a write into place.
    pub(super) fn may_intend(&self, top: &LayerFiles, first: u64, n: u64) -> Result<bool> {
        if self.intents.entries_unsettled(top.id, first, first + n)
            || self.fill_not_durable(top.id, first, n)
        {
            return Ok(false);
        }
        Ok(top
            .read_entries(first, n as usize)?
            .iter()
            .all(|e| matches!(e, BlockEntry::Data(_))))
    }

    /// Makes sure a durable intent covers `first..first + n` of `layer` for a placed
    /// write whose record went to segment `seg`, logging one (and syncing the log) if
    /// none does.
    pub(super) fn intend_overwrite(
        &self,
        layer: LayerId,
        first: u64,
        n: u64,
        seg: u64,
        generation: u64,
    ) -> Result<()> {
        let end = first + n;
        if self.intents.covers(layer, first, end, seg) {
            return Ok(());
        }
        let len = n.max((n * INTENT_AHEAD).min(INTENT_MAX_BLOCKS));
        let header = RecordHeader {
            kind: RecordKind::Overwrite,
            nblocks: u32::try_from(len).unwrap_or(u32::MAX),
            segment: 0,
            layer,
            first_block: first,
            generation,
        };
        let (iseg, _) = self.wal.append(&header, &[], &[], |s| s)?;
        self.sync_wal()?;
        let intent_end = first + u64::from(header.nblocks);
        if self.intents.insert(layer, first, intent_end, iseg, seg) {
            self.wake_checkpoint();
        }
        Ok(())
    }
}
