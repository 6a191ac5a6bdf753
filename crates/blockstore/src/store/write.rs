//! The write path: writes and fills are logged in the WAL and published (in the
//! pending-write map, or as markers in the checksum table) before they are acknowledged.
//!
//! Fills (trim, write-zeroes) write their markers into the checksum table just before
//! their WAL record; a lost marker leaves the old data with its old checksum, and a marker
//! that reached the disk without its WAL record reads as zeroes; both are outcomes an
//! unflushed trim may have. Data space under a marker is only punched out during the
//! checkpoint, after the marker itself is durable. See `docs/storage.md` (concurrency) for
//! why the markers go in before the pending blocks are forgotten.

use std::sync::Arc;

use parking_lot::RwLock;

use super::checkpoint::PunchLater;
use super::pending::Gate;
use super::{block_range, Store, VolumeRuntime};
use crate::error::Result;
use crate::format::{
    BlockEntry, FillKind, RecordHeader, RecordKind, BLOCK, BLOCK_SIZE, SUM_LEN, WAL_MAX_BLOCKS,
};
use crate::hash::hash_blocks;
use crate::hooks::Point;

/// Writes of at least this many bytes go straight to their place in the layer's data file
/// (only their hashes are logged); smaller ones are logged whole and copied at the
/// checkpoint. Measured in BENCHMARKS.md: below this, the log's sequential append beats
/// scattered writes into the data file; above it, writing the data twice dominates.
pub(super) const PLACED_MIN: usize = 64 * 1024;

/// Pending placed blocks (1 GiB of data, ~30 MB of map) that wake the checkpoint before
/// the log's segment is full: placed records are small, so the log alone would let the
/// pending map (and the checkpoint's pause over it) grow with everything written for
/// seconds. Not lower: each checkpoint syncs the data files, and on a disk that sync's
/// writeback stalls the writes behind it (1M sequential writes lost a third at 256 MiB).
const PLACED_PENDING_WAKE: usize = 1 << 18;

impl Store {
    /// Writes `data` at `offset`, merging partial blocks at either end with their content.
    pub(super) fn write_chain(&self, rt: &VolumeRuntime, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let (b0, b1) = block_range(offset, data.len() as u64);
        let aligned = offset % BLOCK == 0 && data.len() % BLOCK_SIZE == 0;
        if aligned {
            return self.append_blocks(rt, b0, data.to_vec());
        }
        // Two unaligned writes to different bytes of one block must both survive, so the
        // edge blocks are read, merged and written under a per-block lock.
        let mut locks: Vec<usize> = [b0, b1 - 1]
            .iter()
            .map(|b| (b % self.inner.rmw.len() as u64) as usize)
            .collect();
        locks.dedup();
        let _g: Vec<_> = locks.iter().map(|i| self.inner.rmw[*i].lock()).collect();
        let mut blocks = vec![0u8; ((b1 - b0) * BLOCK) as usize];
        let skip = (offset - b0 * BLOCK) as usize;
        if skip != 0 {
            self.read_chain(&rt.chain, b0 * BLOCK, &mut blocks[..BLOCK_SIZE])?;
        }
        let tail = skip + data.len();
        if tail % BLOCK_SIZE != 0 && (b1 - b0 > 1 || skip == 0) {
            let last = blocks.len() - BLOCK_SIZE;
            self.read_chain(&rt.chain, (b1 - 1) * BLOCK, &mut blocks[last..])?;
        }
        blocks[skip..tail].copy_from_slice(data);
        self.append_blocks(rt, b0, blocks)
    }

    /// Writes zeroes as data over `start..end` (bytes).
    pub(super) fn write_zero_data(&self, rt: &VolumeRuntime, start: u64, end: u64) -> Result<()> {
        let zeroes = vec![0u8; (WAL_MAX_BLOCKS as usize * BLOCK_SIZE).min((end - start) as usize)];
        let mut at = start;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64);
            self.write_chain(rt, at, &zeroes[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// Appends whole blocks to the WAL and publishes them.
    pub(super) fn append_blocks(
        &self,
        rt: &VolumeRuntime,
        first: u64,
        data: Vec<u8>,
    ) -> Result<()> {
        let max = WAL_MAX_BLOCKS as usize * BLOCK_SIZE;
        if data.len() >= PLACED_MIN {
            for (c, chunk) in data.chunks(max).enumerate() {
                let start = first + (c * WAL_MAX_BLOCKS as usize) as u64;
                self.place_record(rt, start, chunk)?;
            }
            return Ok(());
        }
        self.append_record(rt, first, data)
    }

    /// Writes whole blocks (at most [`WAL_MAX_BLOCKS`]) straight to their place in the top
    /// layer's data file, logging only their hashes: the data is written once.
    ///
    /// Overwriting a block whose current content is in place (its checksum is in the
    /// table, or an earlier placed write put it there) is only safe once the record naming
    /// the new hashes is durable: after a crash, recovery compares what is in place with
    /// both versions and keeps the one that matches. Without the record, a torn or newer
    /// block would match nothing and read as corruption. Writes into a hole need no such
    /// sync: until their record is replayed, the table does not point at their data. A
    /// trim's markers make a hole only once a checkpoint has synced them: until then a
    /// power cut may bring back the entries they replaced.
    fn place_record(&self, rt: &VolumeRuntime, start: u64, data: &[u8]) -> Result<()> {
        let top = &rt.chain[0];
        let layer = top.id;
        let n = data.len() / BLOCK_SIZE;
        let hashes = hash_blocks(data);
        self.inner.admit((data.len() + hashes.len()) as u64)?;
        let gate: Gate = Arc::new(RwLock::new(()));
        let closed = gate.write();
        let header = RecordHeader {
            kind: RecordKind::Placed,
            nblocks: n as u32,
            segment: 0,
            layer,
            first_block: start,
            generation: rt.generation,
        };
        let (replaced, wal_len) = self.inner.wal.append(&header, &hashes, &[], |seg| {
            self.inner
                .pending
                .publish_placed(layer, start, seg, &hashes, &gate)
        })?;
        let placed = || -> Result<()> {
            self.inner.at(Point::PlacedLogged)?;
            // What the disk may hold for these blocks: data the table names, or data under
            // a fill's markers that no checkpoint has made durable yet. After a power cut
            // that loses the fill (unflushed) and this write's record, the table names the
            // old data again, so writing over it without a durable record would leave a
            // block matching nothing (power-loss finding 4, docs/power-loss.md).
            let holds_data = || -> Result<bool> {
                Ok(top
                    .read_entries(start, n)?
                    .iter()
                    .any(|e| matches!(e, BlockEntry::Data(_)))
                    || self.inner.fill_not_durable(layer, start, n as u64))
            };
            let mut synced = false;
            if replaced
                .iter()
                .any(|r| r.as_ref().is_some_and(|p| p.block().is_none()))
                || holds_data()?
            {
                self.inner.sync_wal()?;
                synced = true;
            }
            self.inner.at(Point::PlacedDecided)?;
            loop {
                // The checkpoint changes layer files only under `layer_writes` held for
                // writing; the gate is released before this lock, so a checkpoint that
                // finds the gate closed knows the data is not in place yet.
                let stable = self.inner.layer_writes.read();
                // A checkpoint may have copied an older logged version of these blocks in
                // since the check above (it does while the gate is closed): then this is
                // an overwrite after all, and its record must be durable first.
                if !synced && holds_data()? {
                    drop(stable);
                    self.inner.sync_wal()?;
                    synced = true;
                    continue;
                }
                top.write_blocks(start, data)?;
                drop(closed);
                drop(stable);
                return Ok(());
            }
        };
        if let Err(e) = placed() {
            // Nothing acknowledged it: put back the versions it replaced, so reads do not
            // look for its data in place. Its record, if it became durable, is checked
            // against what is in place by recovery.
            self.inner
                .pending
                .unpublish_placed(layer, start, &gate, replaced);
            return Err(e);
        }
        self.inner.placed_dirty.lock().insert(layer, top.clone());
        if self.inner.pending.len() >= PLACED_PENDING_WAKE {
            self.inner.wake_checkpoint();
        }
        self.inner.maybe_wake_checkpoint(wal_len);
        Ok(())
    }

    /// Logs one record of whole blocks (at most [`WAL_MAX_BLOCKS`]) and publishes them.
    fn append_record(&self, rt: &VolumeRuntime, start: u64, data: Vec<u8>) -> Result<()> {
        let layer = rt.chain[0].id;
        let n = data.len() / BLOCK_SIZE;
        let hashes = hash_blocks(&data);
        self.inner.admit((data.len() + hashes.len()) as u64)?;
        let buf = Arc::new(data);
        let header = RecordHeader {
            kind: RecordKind::Data,
            nblocks: n as u32,
            segment: 0,
            layer,
            first_block: start,
            generation: rt.generation,
        };
        let ((), wal_len) = self.inner.wal.append(&header, &hashes, &buf, |seg| {
            self.inner.pending.publish(layer, start, seg, &buf, &hashes);
        })?;
        self.inner.maybe_wake_checkpoint(wal_len);
        Ok(())
    }

    /// Makes whole blocks read as zeroes without storing data.
    pub(super) fn fill(&self, rt: &VolumeRuntime, first: u64, count: u64) -> Result<()> {
        let top = &rt.chain[0];
        let kind = if rt.chain.len() > 1 {
            FillKind::Zero
        } else {
            FillKind::Absent
        };
        let _apply = self.inner.apply.read();
        let mut at = first;
        let end = first + count;
        // One record may cover at most u32::MAX blocks.
        while at < end {
            let n = (end - at).min(u64::from(u32::MAX));
            let header = RecordHeader {
                kind: RecordKind::Fill(kind),
                nblocks: n as u32,
                segment: 0,
                layer: top.id,
                first_block: at,
                generation: rt.generation,
            };
            self.inner
                .admit(n.div_ceil(BLOCK_SIZE as u64 / SUM_LEN as u64) * BLOCK)?;
            // Queued before the markers go in: from then until the checkpoint has synced
            // them, a placed write must not take a marker here for a durable hole (see
            // `place_record`). Its segment is filled in once the record is logged (no
            // checkpoint runs meanwhile: it waits for `apply`).
            let slot = PunchLater {
                seg: PunchLater::UNLOGGED,
                layer: top.id,
                first: at,
                count: n,
            };
            self.inner.punches.lock().push(slot);
            // Markers first, pending blocks forgotten second: a read in between finds the
            // pending block (the trim is not acknowledged yet), a read after finds the
            // marker. The other order let a read see neither and return the layer file's
            // older data.
            let logged = top.fill_entries(at, n, kind).and_then(|()| {
                self.inner.wal.append(&header, &[], &[], |seg| {
                    self.inner.pending.forget(top.id, at, n);
                    seg
                })
            });
            // On failure the markers may be in the table without a record (an outcome an
            // unacknowledged trim may have): the next checkpoint syncs them, then punches.
            let seg = logged.as_ref().map_or(0, |(seg, _)| *seg);
            if let Some(p) = self.inner.punches.lock().iter_mut().find(|p| **p == slot) {
                p.seg = seg;
            }
            let (_, wal_len) = logged?;
            self.inner.at(Point::FillLogged)?;
            self.inner.maybe_wake_checkpoint(wal_len);
            at += n;
        }
        Ok(())
    }
}
