//! Overwrite intents: one durable log record that lets many placed writes overwrite data
//! in place without each waiting for its own record's `fdatasync`.
//!
//! A placed write over data in place must leave recovery able to tell an unflushed
//! overwrite (the data no longer matches the table, and that is allowed) from corruption.
//! Its own record, made durable first, did that, at one `fdatasync` per write: a 1 MiB
//! sequential overwrite stream then ran at a third of `nbdkit file` on a disk. An
//! *intent* record names a range of a layer (the write's blocks and the next ones, up to
//! [`INTENT_MAX_BLOCKS`]); once it is durable, every placed write inside the range whose
//! record lands in the intent's segment or an earlier one may overwrite in place at once.
//! Recovery checks every block of an intent still in the log and keeps what is on disk
//! where it disagrees with the table (docs/storage.md, "Large writes").
//!
//! Why the segment rule: the checkpoint that deletes the intent's segment has settled
//! every placed write recorded up to it (it waits for their data, syncs it and writes
//! their checksums), so the intent is needed exactly as long as it lives.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use super::Inner;
use crate::catalog::LayerId;
use crate::error::Result;
use crate::format::{RecordHeader, RecordKind};

/// Largest range one intent names (16 MiB): a 1 MiB sequential stream then syncs once per
/// 16 writes, and a crash makes recovery hash at most this much per intent in the log.
pub(super) const INTENT_MAX_BLOCKS: u64 = 4096;
/// How far past a write its intent reaches, in multiples of the write's length: enough
/// for the writes that follow a sequential one, little for random ones.
const INTENT_AHEAD: u64 = 16;
/// Blocks named by intents in one segment that wake the checkpoint (4 GiB): each block
/// of an intent still in the log is read and hashed by recovery after a crash.
const INTENT_WAKE_BLOCKS: u64 = 1 << 20;

/// The durable intents, by (layer, first block): (end block, segment).
#[derive(Default)]
pub(super) struct Intents {
    ranges: Mutex<IntentState>,
}

#[derive(Default)]
struct IntentState {
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
}

impl Inner {
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
