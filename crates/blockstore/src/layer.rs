//! A layer's files: sparse data at logical offsets, the checksum table, and the zero
//! ranges; an in-memory copy of table and ranges answers every lookup, so a 4 KiB read
//! costs one data read.
//!
//! Only the checkpoint and recovery write data here, after the WAL holding it is durable;
//! fills write their table entries and ranges directly (see `store/write.rs` for why that
//! is safe).
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
//! ## Zero ranges
//!
//! A trim over a backing layer makes blocks read as zeroes. Instead of a 32-byte zero
//! marker per block (8 GiB of table for a 1 TiB trim) the range is recorded once in the
//! layer's `<id>.zeros` log (`zero_log`), held in memory as a set of ranges. A block reads
//! as: its table entry when the table holds one (data or zero marker), else *zero* inside
//! a zero range, else *absent*. So a later write of the block wins over the range without
//! touching it, and the fill itself must replace the table entries inside its range:
//!
//! - *zero fill*: the range is appended to the log, then the entries the table holds in
//!   it are overwritten with zero markers. They are not punched out at once: a hole that
//!   reached the disk before its range did would read, after a crash, as the backing
//!   layer's data. A later [`LayerFiles::sync`] (which makes the range durable) punches
//!   out table pages left holding only markers covered by ranges. A fill over many stored
//!   entries syncs the log instead and punches them out directly.
//! - *absent fill*: the range is removed from the zero ranges (a `Clear` record, synced
//!   before the table is punched when the table holds entries there), then the table is
//!   punched as before.
//! - *absent entries written* inside a zero range: those blocks are cleared the same way.
//!
//! Every outcome of a crash reads each block as before or after the unsynced change. A
//! layer older than zero-range files has none; the directory marker (`zero_log`) tells
//! such a layer from one whose file was lost.
//!
//! Concurrency: readers run on many threads without store locks; chunks and ranges sit
//! behind one `RwLock`, so an entry is always read whole (never half of a concurrent
//! write) and a write of several entries is seen all at once. Writers to one layer are
//! serialised by a mutex (which also owns the zero-range log) held across the file write
//! and the memory update, so the files and memory receive the changes in the same order.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};
use parking_lot::Mutex;

use crate::catalog::LayerId;
use crate::error::{Result, StoreError};
use crate::format::{BlockEntry, FillKind, BLOCK, BLOCK_SIZE, SUM_LEN};

mod ranges;
mod table;
mod zero_log;

use ranges::RangeSet;
use table::{Table, CHUNK_BLOCKS, CHUNK_BYTES};
use zero_log::{DirState, Op, ZeroLog};

/// Blocks one step of a large fill covers: memory is updated step by step, so readers of
/// the layer are never held off for a whole-volume fill.
const FILL_STEP_BLOCKS: u64 = 2048;

/// Stored entries a zero fill may replace with markers; past this many held chunks it
/// syncs the zero-range log once and punches the entries out instead.
const MARK_AT_MOST_CHUNKS: usize = 64;

/// What writers of one layer's table hold, under its writer lock.
#[derive(Debug)]
struct Writer {
    /// The layer's zero-range log.
    log: ZeroLog,
    /// Chunks in which a zero fill wrote markers: once a sync made the ranges durable,
    /// those still reading as a hole are punched out of the table.
    marked: BTreeSet<u64>,
}

/// The open files of one layer, with its checksum table and zero ranges in memory.
#[derive(Debug)]
pub struct LayerFiles {
    /// The layer's id.
    pub id: LayerId,
    data: File,
    sums: File,
    data_path: PathBuf,
    /// The checksum table and zero ranges: what `read_entries` answers from.
    table: Table,
    /// Held by writers of the table across the file writes and the memory update.
    writer: Mutex<Writer>,
}

fn paths(dir: &Path, id: LayerId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{id:016x}.data")),
        dir.join(format!("{id:016x}.sums")),
    )
}

/// Why opening a file of a layer failed, naming it.
fn open_error(p: &Path, what: &str, id: LayerId, e: std::io::Error) -> StoreError {
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
}

/// Opens (with `create`, first creates) the zero-range log of layer `id`, after giving
/// the layers of a directory that predates such logs theirs.
fn open_zero_log(dir: &Path, id: LayerId, create: bool) -> Result<(ZeroLog, RangeSet)> {
    let marker = zero_log::marker_path(dir);
    let state = zero_log::dir_state(dir)
        .map_err(|e| StoreError::io(format!("reading {}", marker.display()), e))?;
    if state == DirState::Upgrade {
        zero_log::upgrade_dir(dir, create.then_some(id)).map_err(|e| {
            StoreError::io(
                format!("adding zero-range files to the layers in {}", dir.display()),
                e,
            )
        })?;
    }
    let p = zero_log::path(dir, id);
    if create {
        let exists = p
            .try_exists()
            .map_err(|e| StoreError::io(format!("inspecting {}", p.display()), e))?;
        if !exists {
            zero_log::create(dir, id)
                .map_err(|e| StoreError::io(format!("creating {}", p.display()), e))?;
        }
    }
    ZeroLog::open(dir, id).map_err(|e| open_error(&p, "zero ranges", id, e))
}

impl LayerFiles {
    /// Opens the files of layer `id` under `dir` and loads its checksum table and zero
    /// ranges.
    ///
    /// With `create`, missing files are created (a new layer). Without it, a missing file
    /// is an error naming it: a layer the catalog lists must never come back empty, which
    /// would serve its blocks as zeroes or as those of the layer below. The one exception
    /// is the zero-range file of a layer created before such files existed: the first
    /// open in such a directory gives every layer there an empty one.
    pub fn open(dir: &Path, id: LayerId, create: bool) -> Result<LayerFiles> {
        let (data_path, sums_path) = paths(dir, id);
        let open = |p: &Path, what: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .open(p)
                .map_err(|e| open_error(p, what, id, e))
        };
        let data = open(&data_path, "data file")?;
        let sums = open(&sums_path, "checksum table")?;
        let (log, zeros) = open_zero_log(dir, id, create)?;
        let table = Table::load(&sums, zeros)
            .map_err(|e| StoreError::io(format!("loading {}", sums_path.display()), e))?;
        Ok(LayerFiles {
            id,
            data,
            sums,
            data_path,
            table,
            writer: Mutex::new(Writer {
                log,
                marked: BTreeSet::new(),
            }),
        })
    }

    /// Removes the files of layer `id`. Missing files are not an error.
    ///
    /// The zero-range file goes first: a crash part way leaves the data or table file,
    /// by which the next start finds and removes the rest.
    pub fn remove(dir: &Path, id: LayerId) -> Result<()> {
        zero_log::remove(dir, id).map_err(|e| {
            let p = zero_log::path(dir, id);
            StoreError::io(format!("removing {}", p.display()), e)
        })?;
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

    /// Reads the checksum entries of blocks `first..first+n` (from memory: no I/O). A
    /// block the table holds no entry for reads as [`BlockEntry::Zero`] inside a zero
    /// range.
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
        let mut w = self.writer.lock();
        let n = (raw.len() / SUM_LEN) as u64;
        self.clear_absent_in_ranges(&mut w, first, raw)?;
        if let Err(e) = self.sums.write_all_at(raw, first * SUM_LEN as u64) {
            self.reload(first, n);
            return Err(self.err("writing checksums of", e));
        }
        self.table.set(first, raw);
        Ok(())
    }

    /// Removes the blocks that `raw` (entries from block `first`) makes absent from the
    /// zero ranges, so they read as absent and not as zero.
    fn clear_absent_in_ranges(&self, w: &mut Writer, first: u64, raw: &[u8]) -> Result<()> {
        let end = first + (raw.len() / SUM_LEN) as u64;
        let absent = |b: u64| {
            let i = ((b - first) as usize) * SUM_LEN;
            raw[i..i + SUM_LEN].iter().all(|x| *x == 0)
        };
        let mut runs = Vec::new();
        for (lo, hi) in self.table.state.read().zeros.overlaps(first, end) {
            let mut b = lo;
            while b < hi {
                if !absent(b) {
                    b += 1;
                    continue;
                }
                let start = b;
                while b < hi && absent(b) {
                    b += 1;
                }
                runs.push((start, b));
            }
        }
        for &(lo, hi) in &runs {
            self.record(w, lo, hi, Op::Clear)?;
        }
        if runs.iter().any(|&(lo, hi)| self.table.holds_any(lo, hi)) {
            // A held entry replaced by a hole before its block left the ranges durably
            // would read as zero after a crash: neither what it was nor absent.
            w.log
                .sync_now()
                .map_err(|e| self.zeros_err("syncing zero ranges of", e))?;
        }
        Ok(())
    }

    /// Appends a zero-range record, then applies it to memory.
    fn record(&self, w: &mut Writer, first: u64, end: u64, op: Op) -> Result<()> {
        w.log
            .append(first, end - first, op)
            .map_err(|e| self.zeros_err("recording zero ranges of", e))?;
        zero_log::apply(&mut self.table.state.write().zeros, first, end - first, op);
        Ok(())
    }

    /// The parts of blocks `first..first+n` that read as zero through a zero range (the
    /// table holds no entry for them), as (first, end) in order: what a merge can copy as
    /// ranges with [`LayerFiles::zero_where_absent`] instead of block by block.
    pub fn zero_ranges(&self, first: u64, n: u64) -> Vec<(u64, u64)> {
        let end = first.saturating_add(n);
        let state = self.table.state.read();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |lo: u64, hi: u64| match out.last_mut() {
            Some(last) if last.1 == lo => last.1 = hi,
            _ if lo < hi => out.push((lo, hi)),
            _ => {}
        };
        for (lo, hi) in state.zeros.overlaps(first, end) {
            let mut at = lo;
            let chunks = state
                .chunks
                .range(lo / CHUNK_BLOCKS..hi.div_ceil(CHUNK_BLOCKS));
            for (&c, chunk) in chunks {
                let base = c * CHUNK_BLOCKS;
                for b in lo.max(base)..hi.min(base + CHUNK_BLOCKS) {
                    if chunk.entry((b - base) as usize) != BlockEntry::Absent {
                        push(at, b);
                        at = b + 1;
                    }
                }
            }
            push(at, hi);
        }
        out
    }

    /// Makes the blocks of `first..first+n` that the table holds no entry for read as
    /// zero (a zero range); blocks it holds keep their entries. One record, whatever the
    /// length. Durable with the next [`LayerFiles::sync`].
    pub fn zero_where_absent(&self, first: u64, n: u64) -> Result<()> {
        let end = first.saturating_add(n);
        let mut w = self.writer.lock();
        if self.table.state.read().zeros.covers(first, end) {
            return Ok(());
        }
        self.record(&mut w, first, end, Op::Zero)
    }

    /// Makes blocks `first..first+n` read as the entry of `kind`.
    pub fn fill_entries(&self, first: u64, n: u64, kind: FillKind) -> Result<()> {
        let end = first.checked_add(n).ok_or_else(|| StoreError::Invalid {
            field: "fill range",
            reason: format!("{first}+{n} overflows"),
        })?;
        let mut w = self.writer.lock();
        if n == 0 {
            return Ok(());
        }
        match kind {
            FillKind::Zero => self.fill_zero(&mut w, first, end),
            FillKind::Absent => self.fill_absent(&mut w, first, end),
        }
    }

    /// A zero fill: the range, then markers over (or a punch of) the entries the table
    /// holds in it, which would otherwise win over the range.
    fn fill_zero(&self, w: &mut Writer, first: u64, end: u64) -> Result<()> {
        if !self.table.state.read().zeros.covers(first, end) {
            self.record(w, first, end, Op::Zero)?;
        }
        let held = self.table.held(0, first, end, MARK_AT_MOST_CHUNKS + 1);
        if held.is_empty() {
            return Ok(());
        }
        if held.len() > MARK_AT_MOST_CHUNKS {
            // Markers would rewrite the table here; one sync of the small log lets the
            // entries go at once, their space with them.
            w.log
                .sync_now()
                .map_err(|e| self.zeros_err("syncing zero ranges of", e))?;
            let (start, len) = (first * SUM_LEN as u64, (end - first) * SUM_LEN as u64);
            if punch(&self.sums, start, len).is_ok() {
                self.table.fill(first, end, FillKind::Absent);
                return Ok(());
            }
        }
        let mark = BlockEntry::Zero.encode();
        let whole: Vec<u8> = mark.iter().copied().cycle().take(CHUNK_BYTES).collect();
        let mut from = 0;
        loop {
            let held = self.table.held(from, first, end, 1024);
            let Some(&(last, _)) = held.last() else {
                return Ok(());
            };
            for (c, only_markers) in held {
                let base = c * CHUNK_BLOCKS;
                let (lo, hi) = (first.max(base), end.min(base + CHUNK_BLOCKS));
                if !only_markers {
                    let bytes = &whole[..((hi - lo) as usize) * SUM_LEN];
                    if let Err(e) = self.sums.write_all_at(bytes, lo * SUM_LEN as u64) {
                        self.reload(lo, hi - lo);
                        return Err(self.err("writing checksums of", e));
                    }
                    self.table.fill(lo, hi, FillKind::Zero);
                }
                w.marked.insert(c);
            }
            from = last + 1;
        }
    }

    /// An absent fill: the blocks leave the zero ranges, then the table entries are
    /// punched out (or, where the filesystem cannot punch, overwritten as absent).
    fn fill_absent(&self, w: &mut Writer, first: u64, end: u64) -> Result<()> {
        if self.table.state.read().zeros.intersects(first, end) {
            self.record(w, first, end, Op::Clear)?;
            if self.table.holds_any(first, end) {
                // See `clear_absent_in_ranges`.
                w.log
                    .sync_now()
                    .map_err(|e| self.zeros_err("syncing zero ranges of", e))?;
            }
        }
        let start = first * SUM_LEN as u64;
        let len = (end - first) * SUM_LEN as u64;
        if punch(&self.sums, start, len).is_ok() {
            self.table.fill(first, end, FillKind::Absent);
            return Ok(());
        }
        let mark = FillKind::Absent.entry().encode();
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
            self.table.fill(b, b + blocks, FillKind::Absent);
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

    /// Makes the data file durable (not the table or the zero ranges): for data that
    /// table entries about to be written will name.
    pub fn sync_data(&self) -> Result<()> {
        self.data
            .sync_data()
            .map_err(|e| self.err("syncing data of", e))
    }

    /// Makes everything written to the layer's files durable: data, zero ranges, table.
    ///
    /// Then, if no zero range was recorded meanwhile (so every range is durable), punches
    /// out the table pages that zero fills left holding only markers covered by ranges.
    /// A zero-range log grown well past the ranges it holds is rewritten first.
    pub fn sync(&self) -> Result<()> {
        self.data
            .sync_data()
            .map_err(|e| self.err("syncing data of", e))?;
        let (zeros, appended) = {
            let mut w = self.writer.lock();
            if let Some(why) = w.log.failed() {
                let e = std::io::Error::other(why.to_string());
                return Err(self.zeros_err("syncing zero ranges of", e));
            }
            let grown = {
                let state = self.table.state.read();
                w.log
                    .wants_rewrite(&state.zeros)
                    .then(|| state.zeros.clone())
            };
            if let Some(ranges) = grown {
                w.log
                    .rewrite(&ranges)
                    .map_err(|e| self.zeros_err("rewriting zero ranges of", e))?;
            }
            (w.log.file(), w.log.appended())
        };
        if let Err(e) = zeros.sync_data() {
            let e = self.writer.lock().log.fail(e);
            return Err(self.zeros_err("syncing zero ranges of", e));
        }
        self.sums
            .sync_data()
            .map_err(|e| self.err("syncing checksums of", e))?;
        self.punch_marked(appended);
        Ok(())
    }

    /// Punches out of the table the chunks marked by zero fills that now read as a hole
    /// would, provided no zero-range record came in since `appended` (so the ranges in
    /// memory are the durable ones). Only space is at stake: failures are logged.
    fn punch_marked(&self, appended: u64) {
        let mut w = self.writer.lock();
        if w.marked.is_empty() || w.log.appended() != appended {
            return;
        }
        for c in std::mem::take(&mut w.marked) {
            if !self.table.reads_as_hole(c) {
                continue;
            }
            let off = c * CHUNK_BYTES as u64;
            match punch(&self.sums, off, CHUNK_BYTES as u64) {
                Ok(()) => {
                    self.table.state.write().chunks.remove(&c);
                }
                Err(nix::errno::Errno::EOPNOTSUPP) => return,
                Err(e) => {
                    tracing::warn!(
                        layer = self.id,
                        chunk = c,
                        error = %e,
                        "could not punch zero markers out of the checksum table; they stay"
                    );
                    return;
                }
            }
        }
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

    /// Number of blocks the checksum table and zero ranges cover (entries past it are
    /// absent).
    pub fn table_blocks(&self) -> Result<u64> {
        let len = self
            .sums
            .metadata()
            .map_err(|e| self.err("inspecting", e))?
            .len();
        let ranges_end = self.table.state.read().zeros.end();
        Ok(len.div_ceil(SUM_LEN as u64).max(ranges_end))
    }

    fn err(&self, what: &str, e: std::io::Error) -> StoreError {
        StoreError::io(format!("{what} layer {}", self.id), e)
    }

    fn zeros_err(&self, what: &str, e: std::io::Error) -> StoreError {
        StoreError::io(
            format!("{what} layer {} ({:016x}.zeros)", self.id, self.id),
            e,
        )
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
#[cfg(test)]
mod zero_tests;
