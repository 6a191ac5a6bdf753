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

use super::checkpoint::PunchLater;
use super::{block_range, Store, VolumeRuntime};
use crate::error::Result;
use crate::format::{
    block_hash, FillKind, RecordHeader, RecordKind, BLOCK, BLOCK_SIZE, SUM_LEN, WAL_MAX_BLOCKS,
};
use crate::hooks::Point;

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
        if data.len() <= max {
            return self.append_record(rt, first, data);
        }
        for (c, chunk) in data.chunks(max).enumerate() {
            let start = first + (c * WAL_MAX_BLOCKS as usize) as u64;
            self.append_record(rt, start, chunk.to_vec())?;
        }
        Ok(())
    }

    /// Logs one record of whole blocks (at most [`WAL_MAX_BLOCKS`]) and publishes them.
    fn append_record(&self, rt: &VolumeRuntime, start: u64, data: Vec<u8>) -> Result<()> {
        let layer = rt.chain[0].id;
        let n = data.len() / BLOCK_SIZE;
        let mut hashes = Vec::with_capacity(n * SUM_LEN);
        for block in data.chunks_exact(BLOCK_SIZE) {
            hashes.extend_from_slice(&block_hash(block));
        }
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
            // Markers first, pending blocks forgotten second: a read in between finds the
            // pending block (the trim is not acknowledged yet), a read after finds the
            // marker. The other order let a read see neither and return the layer file's
            // older data.
            top.fill_entries(at, n, kind)?;
            let (seg, wal_len) = self.inner.wal.append(&header, &[], &[], |seg| {
                self.inner.pending.forget(top.id, at, n);
                seg
            })?;
            self.inner.at(Point::FillLogged)?;
            self.inner.punches.lock().push(PunchLater {
                seg,
                layer: top.id,
                first: at,
                count: n,
            });
            self.inner.maybe_wake_checkpoint(wal_len);
            at += n;
        }
        Ok(())
    }
}
