//! A snapshot smaller than its volume ([`Store::create_snapshot_sized`]): what a replica
//! that missed a snapshot taken before its volume grew needs to hold it at the size it
//! was taken at (issue #8, `tessera-store`'s catch-up).
//!
//! A snapshot's size is only where its reads stop: its frozen layers may hold data past
//! it. That data would show through a clone of the snapshot once the clone is grown
//! (clones start at the snapshot's size and only grow), where a snapshot taken at that
//! size reads zeroes (nothing was ever written past a volume's end). So a snapshot is
//! taken smaller than its volume only when everything past its size reads as zeroes
//! already (the caller trims it first); otherwise it is refused and nothing changes.

use std::sync::Arc;

use super::read::Source;
use super::Store;
use crate::error::{Result, StoreError};
use crate::format::{BLOCK, BLOCK_SIZE};
use crate::layer::LayerFiles;

/// Blocks whose sources are looked up at once.
const CHUNK: u64 = 4096;

impl Store {
    /// `size` when a snapshot of a volume of `current` bytes read through `chain` may be
    /// taken at `size` bytes (see the module comment); the volume's writes wait meanwhile
    /// (the caller holds its runtime for writing).
    pub(super) fn check_snapshot_size(
        &self,
        chain: &[Arc<LayerFiles>],
        size: u64,
        current: u64,
    ) -> Result<u64> {
        let invalid = |reason: String| StoreError::Invalid {
            field: "size",
            reason,
        };
        if size == 0 || size % BLOCK != 0 {
            return Err(invalid(format!(
                "a snapshot's size must be a positive multiple of {BLOCK} bytes, not {size}"
            )));
        }
        if size > current {
            return Err(invalid(format!(
                "a snapshot of {size} bytes of a volume of {current}: larger than the volume"
            )));
        }
        if let Some(at) = self.first_nonzero_block(chain, size / BLOCK, current / BLOCK)? {
            return Err(invalid(format!(
                "a snapshot of {size} bytes of a volume of {current}: the block at {} past that size holds data (trim what lies past the snapshot's size first)",
                at * BLOCK
            )));
        }
        Ok(size)
    }

    /// The first of blocks `first..end` of `chain` that does not read as zeroes.
    fn first_nonzero_block(
        &self,
        chain: &[Arc<LayerFiles>],
        first: u64,
        end: u64,
    ) -> Result<Option<u64>> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut at = first;
        while at < end {
            let n = (end - at).min(CHUNK);
            let sources = self.resolve(chain, at, n as usize)?;
            for (i, s) in sources.iter().enumerate() {
                if matches!(s, Source::Zero) {
                    continue;
                }
                // Stored data may still be zeroes (a write of zeroes): read it.
                let b = at + i as u64;
                self.read_chain(chain, b * BLOCK, &mut buf)?;
                if buf.iter().any(|x| *x != 0) {
                    return Ok(Some(b));
                }
            }
            at += n;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreError, StoreOptions, BLOCK};

    const MIB: u64 = 1 << 20;

    fn read(s: &Store, export: &str, offset: u64, len: u64) -> Vec<u8> {
        let e = s.open_export(export).unwrap();
        let mut buf = vec![0u8; len as usize];
        e.read_at(offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_snapshot_smaller_than_its_volume_reads_as_one_taken_at_that_size() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        s.create_volume("v", 2 * MIB).unwrap();
        let e = s.open_export("v").unwrap();
        e.write_at(0, &vec![7u8; MIB as usize], false).unwrap();
        e.write_at(MIB + 8 * BLOCK, &vec![9u8; 2 * BLOCK as usize], false)
            .unwrap();

        // Data past the size asked: refused, nothing taken.
        let err = s.create_snapshot_sized("v", "s", MIB).unwrap_err();
        assert!(
            matches!(&err, StoreError::Invalid { reason, .. } if reason.contains(&format!("{}", MIB + 8 * BLOCK))),
            "{err}"
        );
        for bad in [0, MIB + 1, 3 * MIB] {
            assert!(s.create_snapshot_sized("v", "s", bad).is_err(), "{bad}");
        }
        assert!(s.volume_info("v").unwrap().snapshots.is_empty());

        // Trimmed (and a block written as zeroes): taken at 1 MiB.
        e.trim(MIB, MIB, false).unwrap();
        e.write_at(MIB + 4 * BLOCK, &vec![0u8; BLOCK as usize], false)
            .unwrap();
        let info = s.create_snapshot_sized("v", "s", MIB).unwrap();
        assert_eq!(info.size, MIB);
        assert_eq!(s.volume_info("v").unwrap().snapshots[0].size, MIB);
        assert_eq!(s.open_export("v@s").unwrap().size(), MIB);
        assert_eq!(read(&s, "v@s", 0, MIB), vec![7u8; MIB as usize]);

        // The volume keeps its size and takes writes past the snapshot's end; a clone of
        // the snapshot grown to 2 MiB reads zeroes past 1 MiB, not the volume's data.
        e.write_at(MIB, &vec![5u8; MIB as usize], false).unwrap();
        assert_eq!(e.size(), 2 * MIB);
        s.clone_snapshot("v", "s", "c").unwrap();
        s.resize_volume("c", 2 * MIB).unwrap();
        assert_eq!(read(&s, "c", 0, MIB), vec![7u8; MIB as usize]);
        assert_eq!(read(&s, "c", MIB, MIB), vec![0u8; MIB as usize]);
        assert_eq!(read(&s, "v", MIB, MIB), vec![5u8; MIB as usize]);

        // After a restart (the catalog holds the size).
        drop(e);
        drop(s);
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.open_export("v@s").unwrap().size(), MIB);
        assert_eq!(read(&s, "v@s", 0, MIB), vec![7u8; MIB as usize]);
    }
}
