//! A layer's two files: sparse data at logical offsets, and the checksum table.
//!
//! Only the checkpoint and recovery write data here, after the WAL holding it is durable;
//! fills write their markers directly (see `store/write.rs` for why that is safe).

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::catalog::LayerId;
use crate::error::{Result, StoreError};
use crate::format::{BlockEntry, FillKind, BLOCK, BLOCK_SIZE, SUM_LEN};

/// The open files of one layer.
#[derive(Debug)]
pub struct LayerFiles {
    /// The layer's id.
    pub id: LayerId,
    data: File,
    sums: File,
    data_path: PathBuf,
}

fn paths(dir: &Path, id: LayerId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{id:016x}.data")),
        dir.join(format!("{id:016x}.sums")),
    )
}

impl LayerFiles {
    /// Opens the files of layer `id` under `dir`.
    ///
    /// With `create`, missing files are created (a new layer). Without it, a missing file
    /// is an error naming it: a layer the catalog lists must never come back empty, which
    /// would serve its blocks as zeroes or as those of the layer below.
    pub fn open(dir: &Path, id: LayerId, create: bool) -> Result<LayerFiles> {
        let (data_path, sums_path) = paths(dir, id);
        let open = |p: &Path, what: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .open(p)
                .map_err(|e| {
                    let context = if e.kind() == std::io::ErrorKind::NotFound {
                        format!(
                            "opening {} ({what} of layer {id}, which the catalog lists; \
                             it is not recreated empty)",
                            p.display()
                        )
                    } else {
                        format!("opening {}", p.display())
                    };
                    StoreError::io(context, e)
                })
        };
        Ok(LayerFiles {
            id,
            data: open(&data_path, "data file")?,
            sums: open(&sums_path, "checksum table")?,
            data_path,
        })
    }

    /// Removes the files of layer `id`. Missing files are not an error.
    pub fn remove(dir: &Path, id: LayerId) -> Result<()> {
        let (d, s) = paths(dir, id);
        for p in [d, s] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("removing {}", p.display()), e)),
            }
        }
        Ok(())
    }

    /// Reads the checksum entries of blocks `first..first+n`.
    pub fn read_entries(&self, first: u64, n: usize) -> Result<Vec<BlockEntry>> {
        let mut raw = vec![0u8; n * SUM_LEN];
        read_at_or_zero(&self.sums, &mut raw, first * SUM_LEN as u64)
            .map_err(|e| self.err("reading checksums of", e))?;
        Ok(raw
            .chunks_exact(SUM_LEN)
            .map(|c| {
                let mut e = [0u8; SUM_LEN];
                e.copy_from_slice(c);
                BlockEntry::decode(&e)
            })
            .collect())
    }

    /// Writes raw checksum entries starting at block `first`.
    pub fn write_entries(&self, first: u64, raw: &[u8]) -> Result<()> {
        self.sums
            .write_all_at(raw, first * SUM_LEN as u64)
            .map_err(|e| self.err("writing checksums of", e))
    }

    /// Sets blocks `first..first+n` to a fill marker.
    pub fn fill_entries(&self, first: u64, n: u64, kind: FillKind) -> Result<()> {
        let start = first * SUM_LEN as u64;
        let len = n * SUM_LEN as u64;
        if kind == FillKind::Absent && punch(&self.sums, start, len).is_ok() {
            return Ok(());
        }
        let mark = kind.entry().encode();
        let chunk: Vec<u8> = mark.iter().copied().cycle().take(64 * 1024).collect();
        let mut done = 0;
        while done < len {
            let step = (len - done).min(chunk.len() as u64) as usize;
            self.sums
                .write_all_at(&chunk[..step], start + done)
                .map_err(|e| self.err("writing checksums of", e))?;
            done += step as u64;
        }
        Ok(())
    }

    /// Reads whole blocks starting at `first` into `buf` (a multiple of the block size).
    pub fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        read_at_or_zero(&self.data, buf, first * BLOCK).map_err(|e| self.err("reading", e))
    }

    /// Writes whole blocks starting at `first`.
    pub fn write_blocks(&self, first: u64, buf: &[u8]) -> Result<()> {
        debug_assert_eq!(buf.len() % BLOCK_SIZE, 0);
        self.data
            .write_all_at(buf, first * BLOCK)
            .map_err(|e| self.err("writing", e))
    }

    /// Writes whole blocks starting at `first` from separate buffers, in one system call
    /// when they fit.
    pub fn write_blocks_vectored(&self, first: u64, blocks: &[&[u8]]) -> Result<()> {
        let slices: Vec<std::io::IoSlice<'_>> =
            blocks.iter().map(|b| std::io::IoSlice::new(b)).collect();
        crate::wal::write_all_vectored_at(&self.data, &slices, first * BLOCK)
            .map_err(|e| self.err("writing", e))
    }

    /// Frees the space of blocks `first..first+n` in the data file. Only space is affected:
    /// callers make sure the checksum table no longer points at these blocks.
    pub fn punch_blocks(&self, first: u64, n: u64) -> Result<()> {
        match punch(&self.data, first * BLOCK, n * BLOCK) {
            Ok(()) => Ok(()),
            // A filesystem without hole punching keeps the bytes; nothing reads them.
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(self.err("punching", std::io::Error::from(e))),
        }
    }

    /// Makes everything written to both files durable.
    pub fn sync(&self) -> Result<()> {
        self.data
            .sync_data()
            .and_then(|()| self.sums.sync_data())
            .map_err(|e| self.err("syncing", e))
    }

    /// Bytes of data actually allocated on disk (thin provisioning at work).
    pub fn allocated_bytes(&self) -> u64 {
        fs::metadata(&self.data_path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    /// Number of blocks the checksum table covers (entries past it are absent).
    pub fn table_blocks(&self) -> Result<u64> {
        let len = self
            .sums
            .metadata()
            .map_err(|e| self.err("inspecting", e))?
            .len();
        Ok(len.div_ceil(SUM_LEN as u64))
    }

    fn err(&self, what: &str, e: std::io::Error) -> StoreError {
        StoreError::io(format!("{what} layer {}", self.id), e)
    }
}

fn punch(f: &File, off: u64, len: u64) -> std::result::Result<(), nix::errno::Errno> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(nix::errno::Errno::EINVAL);
    };
    fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zero.
fn read_at_or_zero(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
