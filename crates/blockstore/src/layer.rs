//! A layer's two files: sparse data at logical offsets, and the checksum table, of which
//! an in-memory copy answers every lookup so a 4 KiB read costs one data read.
//!
//! Only the checkpoint and recovery write data here, after the WAL holding it is durable;
//! fills write their markers directly (see `store/write.rs` for why that is safe).
//!
//! ## The in-memory table
//!
//! Each layer keeps its whole checksum table in memory, loaded at open and written
//! through: every change goes to the file first, then to memory, so memory never holds an
//! entry the file has not been given. Reads never touch the table file.
//!
//! Why a copy and not `mmap`: the crate has no `unsafe`, and a mapped sparse table would
//! raise SIGBUS when a store into one of its holes meets a full disk, a case the store
//! otherwise turns into ENOSPC (`store/space.rs`). Why not a page cache with eviction: it
//! would put a file read back on the read path under memory pressure, and the tables are
//! small next to the data they describe.
//!
//! Cost: 32 bytes per stored 4 KiB block, i.e. 8 MiB of memory per GiB of written volume
//! (0.8 %), loaded at open by reading the table's data regions (holes are skipped). The
//! table is kept in chunks of one table page (128 entries): a chunk of only *absent*
//! entries is not kept at all and a chunk of only *zero* markers costs no entry memory,
//! so a thin volume costs what it stores, not its size. Fine for the volumes of one node
//! today; a store holding many TiB would want a bounded cache instead.
//!
//! Concurrency: readers run on many threads without store locks; the chunk map sits
//! behind one `RwLock`, so an entry is always read whole (never half of a concurrent
//! write) and a write of several entries is seen all at once. Writers to one layer are
//! serialised by a mutex held across the file write and the memory update, so the file
//! and memory receive the changes in the same order.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};
use parking_lot::{Mutex, RwLock};

use crate::catalog::LayerId;
use crate::error::{Result, StoreError};
use crate::format::{BlockEntry, FillKind, BLOCK, BLOCK_SIZE, SUM_LEN};

/// Entries per chunk of the in-memory table: one 4 KiB page of the table file, the
/// granularity of its holes.
const CHUNK_BLOCKS: u64 = 128;
const CHUNK_BYTES: usize = CHUNK_BLOCKS as usize * SUM_LEN;
/// Blocks one step of a large fill covers: memory is updated step by step, so readers of
/// the layer are never held off for a whole-volume fill.
const FILL_STEP_BLOCKS: u64 = 2048;

/// One chunk of the in-memory table. A chunk of only absent entries is not stored.
enum Chunk {
    /// Every entry is the zero marker.
    Zero,
    /// The entries, as stored in the file.
    Entries(Box<[u8; CHUNK_BYTES]>),
}

impl Chunk {
    /// The chunk for these entries, or `None` when they are all absent.
    fn from_entries(e: Box<[u8; CHUNK_BYTES]>) -> Option<Chunk> {
        let absent = BlockEntry::Absent.encode();
        let zero = BlockEntry::Zero.encode();
        let all = |mark: &[u8; SUM_LEN]| e.chunks_exact(SUM_LEN).all(|c| c == mark);
        if all(&absent) {
            None
        } else if all(&zero) {
            Some(Chunk::Zero)
        } else {
            Some(Chunk::Entries(e))
        }
    }

    /// The entries of this chunk, materialised.
    fn into_entries(self) -> Box<[u8; CHUNK_BYTES]> {
        match self {
            Chunk::Zero => Box::new([0xff; CHUNK_BYTES]),
            Chunk::Entries(e) => e,
        }
    }

    fn entry(&self, i: usize) -> BlockEntry {
        match self {
            Chunk::Zero => BlockEntry::Zero,
            Chunk::Entries(e) => {
                let mut raw = [0u8; SUM_LEN];
                raw.copy_from_slice(&e[i * SUM_LEN..(i + 1) * SUM_LEN]);
                BlockEntry::decode(&raw)
            }
        }
    }
}

/// The in-memory copy of a checksum table: chunk number → chunk.
///
/// A `BTreeMap` rather than a vector so that memory follows what is stored, not the
/// highest block written (a 64 TiB thin volume written at its end costs one chunk).
#[derive(Default)]
struct Table {
    chunks: RwLock<BTreeMap<u64, Chunk>>,
}

/// The chunks that blocks `first..end` touch, each with the part of it they cover, as
/// (chunk, first block, end block).
fn chunk_spans(first: u64, end: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let c0 = first / CHUNK_BLOCKS;
    let c1 = end.div_ceil(CHUNK_BLOCKS);
    (c0..c1).map(move |c| {
        let base = c * CHUNK_BLOCKS;
        (c, first.max(base), end.min(base + CHUNK_BLOCKS))
    })
}

impl Table {
    /// Entries of blocks `first..first+n`.
    fn get(&self, first: u64, n: usize) -> Vec<BlockEntry> {
        let mut out = vec![BlockEntry::Absent; n];
        if n == 0 {
            return out;
        }
        let end = first.saturating_add(n as u64);
        let c0 = first / CHUNK_BLOCKS;
        let c1 = (end - 1) / CHUNK_BLOCKS;
        let chunks = self.chunks.read();
        for (&c, chunk) in chunks.range(c0..=c1) {
            let base = c * CHUNK_BLOCKS;
            for b in first.max(base)..end.min(base + CHUNK_BLOCKS) {
                out[(b - first) as usize] = chunk.entry((b - base) as usize);
            }
        }
        out
    }

    /// Applies `edit(entries, lo, hi)` to the chunks that blocks `first..end` touch,
    /// where `lo..hi` are the blocks of the range inside the chunk.
    fn edit(
        map: &mut BTreeMap<u64, Chunk>,
        first: u64,
        end: u64,
        mut edit: impl FnMut(&mut [u8; CHUNK_BYTES], u64, u64),
    ) {
        for (c, lo, hi) in chunk_spans(first, end) {
            let mut e = map
                .remove(&c)
                .map_or_else(|| Box::new([0u8; CHUNK_BYTES]), Chunk::into_entries);
            edit(&mut e, lo, hi);
            if let Some(chunk) = Chunk::from_entries(e) {
                map.insert(c, chunk);
            }
        }
    }

    /// Stores raw entries (a whole number of them) from block `first`.
    fn set(&self, first: u64, raw: &[u8]) {
        let end = first + (raw.len() / SUM_LEN) as u64;
        let mut map = self.chunks.write();
        Self::edit(&mut map, first, end, |e, lo, hi| {
            let base = lo - lo % CHUNK_BLOCKS;
            let src = &raw[((lo - first) as usize) * SUM_LEN..((hi - first) as usize) * SUM_LEN];
            e[((lo - base) as usize) * SUM_LEN..((hi - base) as usize) * SUM_LEN]
                .copy_from_slice(src);
        });
    }

    /// Sets blocks `first..end` to the marker of `kind`.
    fn fill(&self, first: u64, end: u64, kind: FillKind) {
        let mark = kind.entry().encode();
        let whole = |lo: u64, hi: u64| lo % CHUNK_BLOCKS == 0 && hi - lo == CHUNK_BLOCKS;
        if kind == FillKind::Absent {
            // Only chunks already held change: visit those rather than the whole range (a
            // trim of a whole volume), a batch per lock so readers get in between.
            let (mut from, stop) = (first / CHUNK_BLOCKS, end.div_ceil(CHUNK_BLOCKS));
            while from < stop {
                let mut map = self.chunks.write();
                let held: Vec<u64> = map.range(from..stop).map(|(c, _)| *c).take(1024).collect();
                let Some(&last) = held.last() else {
                    return;
                };
                for c in held {
                    let base = c * CHUNK_BLOCKS;
                    let (lo, hi) = (first.max(base), end.min(base + CHUNK_BLOCKS));
                    if whole(lo, hi) {
                        map.remove(&c);
                    } else {
                        Self::edit(&mut map, lo, hi, |e, lo, hi| mark_entries(e, lo, hi, &mark));
                    }
                }
                from = last + 1;
            }
            return;
        }
        let mut map = self.chunks.write();
        for (c, lo, hi) in chunk_spans(first, end) {
            if whole(lo, hi) {
                map.insert(c, Chunk::Zero);
            } else {
                Self::edit(&mut map, lo, hi, |e, lo, hi| mark_entries(e, lo, hi, &mark));
            }
        }
    }

    /// Bytes of entry memory held (zero-marker chunks and the map itself not counted).
    fn entry_bytes(&self) -> usize {
        self.chunks
            .read()
            .values()
            .filter(|c| matches!(c, Chunk::Entries(_)))
            .count()
            * CHUNK_BYTES
    }

    /// Reads the table file into memory, skipping its holes.
    fn load(sums: &File) -> std::io::Result<Table> {
        let len = sums.metadata()?.len();
        let mut map = BTreeMap::new();
        let mut buf = vec![0u8; 256 * CHUNK_BYTES];
        let mut pos = 0;
        while let Some((start, stop)) = next_data(sums, pos, len)? {
            // Holes are page-aligned; rounding out to whole chunks reads a little more
            // on a filesystem with smaller pages, never less.
            let mut off = start - start % CHUNK_BYTES as u64;
            while off < stop {
                let n = (stop - off).div_ceil(CHUNK_BYTES as u64).min(256) as usize;
                let part = &mut buf[..n * CHUNK_BYTES];
                read_at_or_zero(sums, part, off)?;
                for (i, raw) in part.chunks_exact(CHUNK_BYTES).enumerate() {
                    let mut e = Box::new([0u8; CHUNK_BYTES]);
                    e.copy_from_slice(raw);
                    if let Some(chunk) = Chunk::from_entries(e) {
                        map.insert(off / CHUNK_BYTES as u64 + i as u64, chunk);
                    }
                }
                off += (n * CHUNK_BYTES) as u64;
            }
            pos = off;
        }
        Ok(Table {
            chunks: RwLock::new(map),
        })
    }
}

fn mark_entries(e: &mut [u8; CHUNK_BYTES], lo: u64, hi: u64, mark: &[u8; SUM_LEN]) {
    let base = lo - lo % CHUNK_BLOCKS;
    for b in lo..hi {
        let i = ((b - base) as usize) * SUM_LEN;
        e[i..i + SUM_LEN].copy_from_slice(mark);
    }
}

/// The next region of `f` at or after `pos` (below `len`) that may hold data, as
/// (start, end). Filesystems that cannot tell holes apart report the rest of the file.
fn next_data(f: &File, pos: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    if pos >= len {
        return Ok(None);
    }
    let Ok(at) = i64::try_from(pos) else {
        return Ok(None);
    };
    let start = match lseek(f.as_raw_fd(), at, Whence::SeekData) {
        Ok(s) => s,
        Err(Errno::ENXIO) => return Ok(None),
        Err(Errno::EINVAL) => return Ok(Some((pos, len))),
        Err(e) => return Err(e.into()),
    };
    let stop = match lseek(f.as_raw_fd(), start, Whence::SeekHole) {
        Ok(h) => h,
        Err(Errno::ENXIO) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (start, stop) = (start as u64, (stop as u64).min(len));
    Ok((start < stop).then_some((start, stop)))
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("chunks", &self.chunks.read().len())
            .finish()
    }
}

/// The open files of one layer, with its checksum table in memory.
#[derive(Debug)]
pub struct LayerFiles {
    /// The layer's id.
    pub id: LayerId,
    data: File,
    sums: File,
    data_path: PathBuf,
    /// The checksum table: what `read_entries` answers from.
    table: Table,
    /// Held by writers of the table across the file write and the memory update.
    table_writes: Mutex<()>,
}

fn paths(dir: &Path, id: LayerId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{id:016x}.data")),
        dir.join(format!("{id:016x}.sums")),
    )
}

impl LayerFiles {
    /// Opens the files of layer `id` under `dir` and loads its checksum table.
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
        let data = open(&data_path, "data file")?;
        let sums = open(&sums_path, "checksum table")?;
        let table = Table::load(&sums)
            .map_err(|e| StoreError::io(format!("loading {}", sums_path.display()), e))?;
        Ok(LayerFiles {
            id,
            data,
            sums,
            data_path,
            table,
            table_writes: Mutex::new(()),
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

    /// Reads the checksum entries of blocks `first..first+n` (from memory: no I/O).
    pub fn read_entries(&self, first: u64, n: usize) -> Result<Vec<BlockEntry>> {
        Ok(self.table.get(first, n))
    }

    /// Writes raw checksum entries (a whole number of them) starting at block `first`.
    pub fn write_entries(&self, first: u64, raw: &[u8]) -> Result<()> {
        if raw.len() % SUM_LEN != 0 {
            return Err(StoreError::Invalid {
                field: "checksum entries",
                reason: format!("{} bytes is not a whole number of entries", raw.len()),
            });
        }
        let _writing = self.table_writes.lock();
        let n = (raw.len() / SUM_LEN) as u64;
        if let Err(e) = self.sums.write_all_at(raw, first * SUM_LEN as u64) {
            self.reload(first, n);
            return Err(self.err("writing checksums of", e));
        }
        self.table.set(first, raw);
        Ok(())
    }

    /// Sets blocks `first..first+n` to a fill marker.
    pub fn fill_entries(&self, first: u64, n: u64, kind: FillKind) -> Result<()> {
        let _writing = self.table_writes.lock();
        let start = first * SUM_LEN as u64;
        let len = n * SUM_LEN as u64;
        if kind == FillKind::Absent && punch(&self.sums, start, len).is_ok() {
            self.table.fill(first, first + n, kind);
            return Ok(());
        }
        let mark = kind.entry().encode();
        let step_bytes = (FILL_STEP_BLOCKS as usize) * SUM_LEN;
        let chunk: Vec<u8> = mark.iter().copied().cycle().take(step_bytes).collect();
        let mut done = 0;
        while done < len {
            let step = (len - done).min(chunk.len() as u64) as usize;
            let b = first + done / SUM_LEN as u64;
            let blocks = (step / SUM_LEN) as u64;
            if let Err(e) = self.sums.write_all_at(&chunk[..step], start + done) {
                self.reload(b, blocks);
                return Err(self.err("writing checksums of", e));
            }
            self.table.fill(b, b + blocks, kind);
            done += step as u64;
        }
        Ok(())
    }

    /// After a failed table write, makes memory agree with whatever reached the file.
    fn reload(&self, first: u64, n: u64) {
        let mut raw = vec![0u8; (n as usize) * SUM_LEN];
        match read_at_or_zero(&self.sums, &mut raw, first * SUM_LEN as u64) {
            Ok(()) => self.table.set(first, &raw),
            Err(e) => tracing::warn!(
                layer = self.id,
                first,
                n,
                error = %e,
                "could not read back checksums after a failed write; memory keeps the old entries"
            ),
        }
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

    /// Bytes of memory the in-memory checksum table holds for entries.
    pub fn table_memory_bytes(&self) -> usize {
        self.table.entry_bytes()
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

#[cfg(test)]
mod tests;
