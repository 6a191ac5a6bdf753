//! A scrub on a replicated volume's primary (issue #8: "a scrub finds and repairs bit rot
//! from a good replica"): each bad block the block store's scrub found that a volume (or
//! snapshot) this store is the primary of reads is repaired the way a client's read
//! repairs it (`primary/repair.rs`): from an in-sync replica, checked against this
//! copy's own checksum, counted and listed for the `volume.repaired` event.
//!
//! A bad block is repaired through a name whose read reaches it (a read that fails its
//! checksum there): a block shadowed by newer data in every volume and snapshot reading
//! its layer is read by nobody and stays listed as bad. A replica's store repairs
//! nothing here: it cannot ask its primary (the primary repairs a replica's block when
//! its own repair or a catch-up meets it).

use tessera_blockstore::{ScrubReport, StoreError, BLOCK_SIZE};

use super::Replication;

impl Replication {
    /// Repairs what it can of `report` (see the module comment): repaired blocks move
    /// from `bad` to `repaired`. Blocking (called on the admin op's blocking thread).
    pub fn repair_scrubbed(&self, mut report: ScrubReport) -> ScrubReport {
        let mut left = Vec::new();
        for bad in std::mem::take(&mut report.bad) {
            if self.repair_one(&bad.affects, bad.offset) {
                report.repaired.push(bad);
            } else {
                left.push(bad);
            }
        }
        report.bad = left;
        report
    }

    /// Repairs the bad block at `offset` through the first of `names` that this store
    /// is the primary of and whose read reaches it; whether one did.
    fn repair_one(&self, names: &[String], offset: u64) -> bool {
        for name in names {
            let volume = name.split_once('@').map_or(name.as_str(), |(v, _)| v);
            let Some(p) = self.primaries.get(volume) else {
                continue;
            };
            let Ok(export) = self.store.open_export(name) else {
                continue;
            };
            let mut buf = vec![0u8; BLOCK_SIZE];
            match export.read_at(offset, &mut buf) {
                Err(StoreError::Corrupt { .. }) => {}
                // Not read through this name (shadowed), or failing otherwise.
                _ => continue,
            }
            match p.read_repaired(&export, offset, &mut buf) {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(export = %name, offset, error = %e,
                        "a bad block the scrub found could not be repaired");
                }
            }
        }
        false
    }
}
