//! A scrub on a replicated volume's copy (issue #8: "a scrub finds and repairs bit rot
//! from a good replica"): each bad block the block store's scrub found that a volume (or
//! snapshot) replicated here reads is repaired the way a client's read repairs it.
//! On the volume's primary (`primary/repair.rs`): from an in-sync replica, checked
//! against this copy's own checksum, counted and listed for the `volume.repaired` event.
//! On a replica (`replica/from_primary.rs`): from the primary, asked on the connection it
//! fenced this copy through, in this copy's generation, checked the same way; the
//! primary lists it for the event, naming this node.
//!
//! A client's read of a replica's copy (NBD on the replica's node) that meets a bad block
//! is repaired the same way before it is answered ([`Replication::read_repaired_on_replica`]).
//!
//! A bad block is repaired through a name whose read reaches it (a read that fails its
//! checksum there): a block shadowed by newer data in every volume and snapshot reading
//! its layer is read by nobody and stays listed as bad. A replica being caught up
//! repairs nothing here: its catch-up rewrites every block failing its checksum.

use std::time::Duration;

use tessera_blockstore::{Export, ScrubReport, StoreError, BLOCK, BLOCK_SIZE};
use tessera_replication::wire::RepairOutcome;

use super::Replication;

/// How long a replica waits for its primary's answer (which may first repair the
/// primary's own copy from the other replicas, each within the replica timeout).
const ASK_WAIT: Duration = Duration::from_secs(15);

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
    /// is the primary or a replica of and whose read reaches it; whether one did.
    fn repair_one(&self, names: &[String], offset: u64) -> bool {
        for name in names {
            let volume = name.split_once('@').map_or(name.as_str(), |(v, _)| v);
            let primary = self.primaries.get(volume);
            if primary.is_none() && !self.replicas.holds(volume) {
                continue;
            }
            let Ok(export) = self.store.open_export(name) else {
                continue;
            };
            let mut buf = vec![0u8; BLOCK_SIZE];
            match export.read_at(offset, &mut buf) {
                Err(StoreError::Corrupt { .. }) => {}
                // Not read through this name (shadowed), or failing otherwise.
                _ => continue,
            }
            let Some(p) = primary else {
                if self.repair_from_primary(name, offset) {
                    return true;
                }
                continue;
            };
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

    /// Repairs the bad block at `offset` of `name`, a replica's copy here, with its
    /// primary's bytes; whether the block reads well now.
    fn repair_from_primary(&self, name: &str, offset: u64) -> bool {
        match self
            .replicas
            .repair_from_primary(&self.runtime, name, offset, ASK_WAIT)
        {
            // Written meanwhile (`NotNeeded`): not bad any more either.
            Ok(r) => matches!(
                r.outcome,
                RepairOutcome::Rewritten | RepairOutcome::NotNeeded
            ),
            Err(e) => {
                tracing::warn!(export = %name, offset, error = %e,
                    "a bad block the scrub found on this replica could not be repaired");
                false
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` of `export`, a replica's copy here, repairing
    /// each block of the range that fails its checksum from the primary first. Blocking:
    /// called by the NBD server's read on an async worker, which lends its thread to the
    /// runtime meanwhile.
    pub fn read_repaired_on_replica(
        &self,
        export: &Export,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), String> {
        let on_worker = matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::MultiThread)
        );
        let mut repair = || {
            let first = offset / BLOCK;
            let end = (offset + buf.len() as u64).div_ceil(BLOCK);
            let bad = super::primary::bad_blocks(export, first, end).map_err(|e| e.to_string())?;
            for b in bad {
                self.replicas
                    .repair_from_primary(&self.runtime, export.name(), b * BLOCK, ASK_WAIT)
                    .map_err(|e| e.to_string())?;
            }
            export.read_at(offset, buf).map_err(|e| e.to_string())
        };
        if on_worker {
            tokio::task::block_in_place(repair)
        } else {
            repair()
        }
    }
}
