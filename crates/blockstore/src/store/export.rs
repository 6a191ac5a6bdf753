//! Exports: an open volume (read-write) or `volume@snapshot` (read-only), the handle the
//! NBD server and the VMM read and write through. It checks ranges and the volume's state,
//! then hands the I/O to the read and write paths.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLockReadGuard;

use super::read::Source;
use super::repair::BlockRepair;
use super::{block_range, Store, VolumeRuntime, VolumeState};
use crate::error::{Result, StoreError};
use crate::format::{BLOCK, BLOCK_SIZE};
use crate::layer::LayerFiles;

/// How a range reads, for NBD's `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data is stored.
    Data,
    /// Nothing stored; reads as zeroes.
    Hole,
}

/// One run of same-allocation bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Its allocation.
    pub allocation: Allocation,
}

/// Largest range one [`Export::extents`] call describes; callers ask again for more.
pub const MAX_EXTENT_QUERY: u64 = 1 << 30;

impl Store {
    /// Names of everything that can be exported: volumes and `volume@snapshot`s.
    pub fn list_exports(&self) -> Vec<(String, bool)> {
        let cat = self.inner.catalog.lock();
        let mut out = Vec::new();
        for (name, v) in &cat.volumes {
            out.push((name.clone(), false));
            for s in v.snapshots.keys() {
                out.push((format!("{name}@{s}"), true));
            }
        }
        out
    }

    /// Opens an export: `volume` (read-write) or `volume@snapshot` (read-only).
    pub fn open_export(&self, export: &str) -> Result<Export> {
        let cat = self.inner.catalog.lock();
        let target = match export.split_once('@') {
            None => {
                let state = self.runtime(export)?;
                Target::Volume(state)
            }
            Some((vol, snap)) => {
                let meta = cat
                    .volumes
                    .get(vol)
                    .and_then(|v| v.snapshots.get(snap))
                    .ok_or_else(|| StoreError::NotFound(format!("snapshot {export}")))?;
                let chain = cat
                    .chain(meta.layer)
                    .map_err(|reason| StoreError::BadCatalog {
                        path: self.cat_path().display().to_string(),
                        reason,
                    })?
                    .into_iter()
                    .map(|l| self.layer(l))
                    .collect::<Result<Vec<_>>>()?;
                Target::Snapshot {
                    chain,
                    size: meta.size,
                }
            }
        };
        *self
            .inner
            .open_exports
            .lock()
            .entry(export.to_string())
            .or_default() += 1;
        Ok(Export {
            store: self.clone(),
            name: export.to_string(),
            target,
            fence: AtomicU64::new(0),
        })
    }
}

/// What an export reads and writes: a live volume, or the frozen chain of a snapshot.
enum Target {
    Volume(Arc<VolumeState>),
    Snapshot {
        chain: Vec<Arc<LayerFiles>>,
        size: u64,
    },
}

/// An open volume or snapshot: what the NBD server and the VMM read and write through.
pub struct Export {
    store: Store,
    name: String,
    target: Target,
    /// The generation its writer holds (see `generation.rs`); 0: not bound.
    pub(super) fence: AtomicU64,
}

impl Drop for Export {
    fn drop(&mut self) {
        let mut open = self.store.inner.open_exports.lock();
        if let Some(n) = open.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.name);
            }
        }
    }
}

impl Export {
    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        match &self.target {
            Target::Volume(v) => v.rt.read().size,
            Target::Snapshot { size, .. } => *size,
        }
    }

    /// The volume's generation, `None` for a snapshot.
    pub(super) fn volume_generation(&self) -> Option<u64> {
        match &self.target {
            Target::Volume(v) => Some(v.rt.read().generation),
            Target::Snapshot { .. } => None,
        }
    }

    /// Snapshots are read-only.
    pub fn read_only(&self) -> bool {
        matches!(self.target, Target::Snapshot { .. })
    }

    fn with_chain<T>(&self, f: impl FnOnce(&[Arc<LayerFiles>], u64) -> Result<T>) -> Result<T> {
        match &self.target {
            Target::Volume(v) => {
                let rt = v.rt.read();
                if rt.deleted {
                    return Err(StoreError::Gone(v.name.clone()));
                }
                f(&rt.chain, rt.size)
            }
            Target::Snapshot { chain, size } => f(chain, *size),
        }
    }

    fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                length: len,
                size,
            }),
        }
    }

    /// The volume's runtime, held for reading for the whole write, once the export is
    /// writable, the volume still exists and `offset..offset+len` lies inside it.
    fn writable(&self, offset: u64, len: u64) -> Result<RwLockReadGuard<'_, VolumeRuntime>> {
        let Target::Volume(v) = &self.target else {
            return Err(StoreError::ReadOnly);
        };
        let rt = v.rt.read();
        if rt.deleted {
            return Err(StoreError::Gone(v.name.clone()));
        }
        let held = self.fence.load(Ordering::Acquire);
        if held != 0 && rt.generation > held {
            return Err(StoreError::StaleGeneration {
                volume: v.name.clone(),
                held,
                current: rt.generation,
            });
        }
        Self::check_range(offset, len, rt.size)?;
        Ok(rt)
    }

    /// Reads `buf.len()` bytes at `offset`. A block failing its checksum fails the read.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.with_chain(|chain, size| {
            Self::check_range(offset, buf.len() as u64, size)?;
            self.store.read_chain(chain, offset, buf)
        })
    }

    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.write_owned(offset, data.to_vec(), fua)
    }

    /// Like [`Export::write_at`], taking the buffer: block-aligned writes are logged and
    /// published from it without another copy.
    pub fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        {
            let rt = self.writable(offset, data.len() as u64)?;
            if offset % BLOCK == 0 && data.len() % BLOCK_SIZE == 0 && !data.is_empty() {
                self.store.append_blocks(&rt, offset / BLOCK, data)?;
            } else {
                self.store.write_chain(&rt, offset, &data)?;
            }
        }
        if fua {
            self.store.flush()?;
        }
        Ok(())
    }

    /// Discards a range: it reads as zeroes afterwards and its space is freed.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.zero_range(offset, len, false, fua)
    }

    /// Writes zeroes over a range; with `allocate` the blocks are stored as data
    /// (NBD's NO_HOLE), otherwise they become holes.
    pub fn write_zeroes(&self, offset: u64, len: u64, allocate: bool, fua: bool) -> Result<()> {
        self.zero_range(offset, len, allocate, fua)
    }

    fn zero_range(&self, offset: u64, len: u64, allocate: bool, fua: bool) -> Result<()> {
        {
            let rt = self.writable(offset, len)?;
            let end = offset + len;
            let first_full = offset.div_ceil(BLOCK);
            let end_full = end / BLOCK;
            if allocate || first_full >= end_full {
                self.store.write_zero_data(&rt, offset, end)?;
            } else {
                if offset < first_full * BLOCK {
                    self.store
                        .write_zero_data(&rt, offset, first_full * BLOCK)?;
                }
                self.store.fill(&rt, first_full, end_full - first_full)?;
                if end > end_full * BLOCK {
                    self.store.write_zero_data(&rt, end_full * BLOCK, end)?;
                }
            }
        }
        if fua {
            self.store.flush()?;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable (on any export of this store).
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// Repairs the block at `offset` (block-aligned) with `data` (one block's bytes from
    /// another copy) if they hash to the checksum this store holds for it; see
    /// [`BlockRepair`]. Allowed on snapshots too: the bytes are the ones already promised.
    pub fn repair_block(&self, offset: u64, data: &[u8]) -> Result<BlockRepair> {
        if offset % BLOCK != 0 || data.len() != BLOCK_SIZE {
            return Err(StoreError::Invalid {
                field: "repair",
                reason: format!(
                    "a repair is one whole block: offset {offset}, {} bytes",
                    data.len()
                ),
            });
        }
        self.with_chain(|chain, size| {
            Self::check_range(offset, BLOCK, size)?;
            self.store.repair_chain(chain, offset / BLOCK, data)
        })
    }

    /// Describes how `offset..offset+len` is allocated, as runs starting at `offset`. May
    /// describe less than asked (at most [`MAX_EXTENT_QUERY`] bytes), never nothing.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.with_chain(|chain, size| {
            Self::check_range(offset, len, size)?;
            let len = len.min(MAX_EXTENT_QUERY);
            let (b0, b1) = block_range(offset, len);
            let sources = self.store.resolve(chain, b0, (b1 - b0) as usize)?;
            let mut out: Vec<Extent> = Vec::new();
            let end = offset + len;
            for (i, s) in sources.iter().enumerate() {
                let b = b0 + i as u64;
                let lo = (b * BLOCK).max(offset);
                let hi = ((b + 1) * BLOCK).min(end);
                let allocation = match s {
                    Source::Zero => Allocation::Hole,
                    _ => Allocation::Data,
                };
                match out.last_mut() {
                    Some(e) if e.allocation == allocation => e.length += hi - lo,
                    _ => out.push(Extent {
                        length: hi - lo,
                        allocation,
                    }),
                }
            }
            Ok(out)
        })
    }
}
