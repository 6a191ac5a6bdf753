//! The read path: where each block's current content comes from (the pending-write map,
//! then each layer of the chain, newest first), and reading it with its checksum checked.

use std::sync::Arc;

use super::pending::{Content, Gate, Pending};
use super::{block_range, Store};
use crate::error::{Result, StoreError};
use crate::format::{BlockEntry, BLOCK, BLOCK_SIZE, SUM_LEN};
use crate::hash::hash_blocks;
use crate::hooks::Point;
use crate::layer::LayerFiles;

/// How often a read is tried before a checksum mismatch counts as corruption: each retry
/// follows a write or checkpoint that changed the block under the read, which needs
/// overlapping writes to the same block to keep coming.
const READ_ATTEMPTS: usize = 4;

/// Where one block's current content comes from.
pub(super) enum Source {
    /// The pending-write map (logged, not yet in its layer file).
    Pending(Pending),
    /// A placed write's data, in place in the layer at this depth, with its checksum;
    /// readable once the gate can be taken for reading.
    Placed(usize, [u8; SUM_LEN], Gate),
    /// The layer at this depth of the chain, with the checksum its table holds.
    Layer(usize, [u8; SUM_LEN]),
    /// Nothing stored, or a fill marker: reads as zeroes.
    Zero,
}

impl Store {
    /// Finds the source of blocks `first..first+n` through `chain`.
    pub(super) fn resolve(
        &self,
        chain: &[Arc<LayerFiles>],
        first: u64,
        n: usize,
    ) -> Result<Vec<Source>> {
        let mut out: Vec<Option<Source>> = (0..n).map(|_| None).collect();
        let mut left = n;
        for (depth, layer) in chain.iter().enumerate() {
            left -= self
                .inner
                .pending
                .fill_slots(layer.id, first, &mut out, |p| match &p.content {
                    Content::Placed { gate, .. } => Source::Placed(depth, p.hash, gate.clone()),
                    Content::Logged { .. } => Source::Pending(p),
                });
            if left == 0 {
                break;
            }
            let lo = out.iter().position(Option::is_none).unwrap_or(0);
            let hi = out.iter().rposition(Option::is_none).map_or(0, |p| p + 1);
            let entries = layer.read_entries(first + lo as u64, hi - lo)?;
            for (k, e) in entries.into_iter().enumerate() {
                let slot = &mut out[lo + k];
                if slot.is_some() {
                    continue;
                }
                match e {
                    BlockEntry::Absent => {}
                    BlockEntry::Zero => {
                        *slot = Some(Source::Zero);
                        left -= 1;
                    }
                    BlockEntry::Data(h) => {
                        *slot = Some(Source::Layer(depth, h));
                        left -= 1;
                    }
                }
            }
            if left == 0 {
                break;
            }
        }
        Ok(out.into_iter().map(|s| s.unwrap_or(Source::Zero)).collect())
    }

    /// Reads `buf.len()` bytes at `offset` through `chain`.
    ///
    /// Reads take no lock the checkpoint or a placed write excludes: between looking up a
    /// block's checksum and reading its data, the checkpoint may copy a newer version in
    /// (data first, then checksum) or punch it out under a durable trim marker, and a
    /// placed write may overwrite it in place (after publishing its new checksum). So a
    /// mismatch is first taken for such a race: the read is done again, looking the
    /// sources up afresh, while the checkpoint is kept from changing layer files. A
    /// mismatch that persists through [`READ_ATTEMPTS`] tries is corruption.
    pub(super) fn read_chain(
        &self,
        chain: &[Arc<LayerFiles>],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut result = self.read_chain_once(chain, offset, buf);
        for _ in 1..READ_ATTEMPTS {
            if !matches!(result, Err(StoreError::Corrupt { .. })) {
                return result;
            }
            let _stable = self.inner.layer_writes.read();
            result = self.read_chain_once(chain, offset, buf);
        }
        if let Err(StoreError::Corrupt { layer, block }) = &result {
            tracing::error!(layer, block, "checksum mismatch on read");
        }
        result
    }

    /// One attempt of [`Store::read_chain`]: resolve, then read and verify.
    fn read_chain_once(
        &self,
        chain: &[Arc<LayerFiles>],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let (b0, b1) = block_range(offset, buf.len() as u64);
        let sources = self.resolve(chain, b0, (b1 - b0) as usize)?;
        self.inner.at(Point::ReadResolved)?;
        let aligned = offset % BLOCK == 0 && buf.len() % BLOCK_SIZE == 0;
        if aligned {
            return Self::copy_sources(chain, b0, &sources, buf);
        }
        let mut blocks = vec![0u8; sources.len() * BLOCK_SIZE];
        Self::copy_sources(chain, b0, &sources, &mut blocks)?;
        let skip = (offset - b0 * BLOCK) as usize;
        let len = buf.len();
        buf.copy_from_slice(&blocks[skip..skip + len]);
        Ok(())
    }

    /// Fills `blocks` (whole blocks from `b0`) from their resolved sources, verifying
    /// every block read from a layer file against its checksum.
    fn copy_sources(
        chain: &[Arc<LayerFiles>],
        b0: u64,
        sources: &[Source],
        blocks: &mut [u8],
    ) -> Result<()> {
        let mut i = 0;
        while i < sources.len() {
            match &sources[i] {
                Source::Zero => {
                    blocks[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0);
                    i += 1;
                }
                Source::Pending(p) => {
                    let out = &mut blocks[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
                    match p.block() {
                        Some(b) => out.copy_from_slice(b),
                        None => out.fill(0),
                    }
                    i += 1;
                }
                Source::Layer(depth, _) | Source::Placed(depth, _, _) => {
                    let depth = *depth;
                    let mut j = i + 1;
                    while j < sources.len() && sources[j].depth() == Some(depth) {
                        j += 1;
                    }
                    // A placed write's data is readable once its writer let go of the gate.
                    let mut gates: Vec<&Gate> = Vec::new();
                    for s in &sources[i..j] {
                        if let Source::Placed(_, _, g) = s {
                            if !gates.last().is_some_and(|l| Arc::ptr_eq(l, g)) {
                                gates.push(g);
                            }
                        }
                    }
                    let _open: Vec<_> = gates.iter().map(|g| g.read()).collect();
                    let layer = &chain[depth];
                    let out = &mut blocks[i * BLOCK_SIZE..j * BLOCK_SIZE];
                    layer.read_blocks(b0 + i as u64, out)?;
                    // Hashed side by side, and on every core when large (crate::hash).
                    let got = hash_blocks(out);
                    for (k, got) in got.chunks_exact(SUM_LEN).enumerate() {
                        let want = match &sources[i + k] {
                            Source::Layer(_, h) | Source::Placed(_, h, _) => h,
                            _ => continue,
                        };
                        if got != want {
                            let b = b0 + (i + k) as u64;
                            return Err(StoreError::Corrupt {
                                layer: layer.id,
                                block: b,
                            });
                        }
                    }
                    i = j;
                }
            }
        }
        Ok(())
    }
}

impl Source {
    /// The depth of the layer whose data file holds the block, for sources read from one.
    fn depth(&self) -> Option<usize> {
        match self {
            Source::Layer(d, _) | Source::Placed(d, _, _) => Some(*d),
            Source::Pending(_) | Source::Zero => None,
        }
    }
}
