//! Scrub: reads every stored block of every layer and checks it against its checksum,
//! naming the volumes and snapshots whose reads reach each bad block.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Store;
use crate::catalog::LayerId;
use crate::error::Result;
use crate::format::{block_hash, BlockEntry, BLOCK, BLOCK_SIZE};

/// A block whose data does not match its checksum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    /// The layer holding it.
    pub layer: LayerId,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Volumes and snapshots whose reads can reach this block.
    pub affects: Vec<String>,
}

/// The result of a scrub.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScrubReport {
    /// Layers scanned.
    pub layers: u64,
    /// Data blocks verified.
    pub blocks_checked: u64,
    /// Every block that failed verification (and was not repaired, below).
    pub bad: Vec<BadBlock>,
    /// Bad blocks repaired from another copy after the scan (by `tessera-store`, for a
    /// replicated volume this store is the primary of); empty from the engine itself.
    #[serde(default)]
    pub repaired: Vec<BadBlock>,
}

impl Store {
    /// Reads and verifies every stored block of every layer.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let cat = self.inner.catalog.lock().clone();
        let mut owners: HashMap<LayerId, Vec<String>> = HashMap::new();
        for (name, v) in &cat.volumes {
            let roots = std::iter::once((name.clone(), v.top)).chain(
                v.snapshots
                    .iter()
                    .map(|(s, m)| (format!("{name}@{s}"), m.layer)),
            );
            for (who, root) in roots {
                for l in cat.chain(root).unwrap_or_default() {
                    owners.entry(l).or_default().push(who.clone());
                }
            }
        }
        let mut report = ScrubReport::default();
        for id in cat.layers.keys() {
            let files = self.layer(*id)?;
            report.layers += 1;
            let total = files.table_blocks()?;
            let mut first = 0;
            while first < total {
                let n = (total - first).min(1024);
                // The checkpoint writes a block's data and checksum one after the other;
                // scrubbing between the two would report a false mismatch.
                let _apply = self.inner.apply.read();
                let entries = files.read_entries(first, n as usize)?;
                let mut buf = vec![0u8; BLOCK_SIZE];
                for (i, e) in entries.iter().enumerate() {
                    if let BlockEntry::Data(h) = e {
                        let b = first + i as u64;
                        files.read_blocks(b, &mut buf)?;
                        report.blocks_checked += 1;
                        // A placed write may have put newer data in place whose checksum
                        // is still pending (checked when it reaches the table).
                        if block_hash(&buf) != *h && !self.inner.pending.contains(*id, b) {
                            tracing::error!(layer = id, block = b, "scrub found a corrupt block");
                            report.bad.push(BadBlock {
                                layer: *id,
                                offset: b * BLOCK,
                                affects: owners.get(id).cloned().unwrap_or_default(),
                            });
                        }
                    }
                }
                first += n;
            }
        }
        Ok(report)
    }
}
