//! Repair of a block whose data fails its checksum, with bytes from another copy (a
//! replica's): written in place only when they hash to the checksum this store already
//! holds for the block, so what is repaired is exactly what was written here, and bytes
//! from anywhere else (a stale or lying copy) are refused without touching anything.
//!
//! The block is repaired in the layer that holds it, wherever it lies in the chain: a
//! bad block of a snapshot's layer is repaired for the volume, the snapshot and every
//! clone reading it at once, since their checksums name the same bytes.

use std::sync::Arc;

use super::read::Source;
use super::Store;
use crate::error::Result;
use crate::format::{block_hash, BLOCK_SIZE};
use crate::layer::LayerFiles;

/// What [`crate::Export::repair_block`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRepair {
    /// The bytes match the block's checksum: written in place and synced.
    Rewritten,
    /// The block reads well (rewritten since, or being rewritten right now by a write):
    /// nothing was written.
    NotNeeded,
    /// The bytes do not match the checksum this store holds for the block: nothing was
    /// written.
    Mismatch,
}

impl Store {
    /// Repairs block `block` of `chain` with `data` (one block), see [`BlockRepair`].
    ///
    /// Holds `layer_writes` for writing from looking the block's source up to writing its
    /// data: neither the checkpoint nor a placed write changes a layer's data meanwhile,
    /// so the checksum compared is the one the block still has when the bytes land.
    pub(super) fn repair_chain(
        &self,
        chain: &[Arc<LayerFiles>],
        block: u64,
        data: &[u8],
    ) -> Result<BlockRepair> {
        let changing = self.inner.layer_writes.write();
        let sources = self.resolve(chain, block, 1)?;
        let (depth, want) = match sources.first() {
            Some(Source::Layer(depth, want)) => (*depth, *want),
            // A placed write still holding its gate is waiting for `layer_writes` to put
            // newer data there: that write repairs the block.
            Some(Source::Placed(depth, want, gate)) => match gate.try_read() {
                Some(_open) => (*depth, *want),
                None => return Ok(BlockRepair::NotNeeded),
            },
            // Read from the pending-write map or as zeroes: no layer data is read.
            _ => return Ok(BlockRepair::NotNeeded),
        };
        if block_hash(data) != want {
            return Ok(BlockRepair::Mismatch);
        }
        let layer = &chain[depth];
        let mut current = vec![0u8; BLOCK_SIZE];
        layer.read_blocks(block, &mut current)?;
        if block_hash(&current) == want {
            return Ok(BlockRepair::NotNeeded);
        }
        layer.write_blocks(block, data)?;
        drop(changing);
        // Durable, so a crash does not bring the bad bytes back; a failed sync is sticky
        // like every other (the repaired bytes may be lost, the checksum still guards).
        self.inner.synced(|| layer.sync())?;
        tracing::warn!(
            layer = layer.id,
            block,
            "rewrote a block that failed its checksum with another copy's bytes"
        );
        Ok(BlockRepair::Rewritten)
    }
}
