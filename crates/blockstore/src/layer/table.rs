//! The in-memory copy of a layer's checksum table and zero ranges (see the `layer`
//! module for why it exists and what it costs): chunks of one table page, loaded from the
//! table file's data regions, and the set of zero ranges, under one lock.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;

use parking_lot::RwLock;

use super::ranges::RangeSet;
use super::read_at_or_zero;
use crate::format::{BlockEntry, FillKind, SUM_LEN};

/// Entries per chunk of the in-memory table: one 4 KiB page of the table file, the
/// granularity of its holes.
pub(super) const CHUNK_BLOCKS: u64 = 128;
pub(super) const CHUNK_BYTES: usize = CHUNK_BLOCKS as usize * SUM_LEN;

/// One chunk of the in-memory table. A chunk of only absent entries is not stored.
pub(super) enum Chunk {
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

    pub(super) fn entry(&self, i: usize) -> BlockEntry {
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

/// What the in-memory table holds, under one lock so that a reader sees entries and
/// zero ranges of one moment.
///
/// Chunks sit in a `BTreeMap` rather than a vector so that memory follows what is
/// stored, not the highest block written (a 64 TiB thin volume written at its end costs
/// one chunk).
#[derive(Default)]
pub(super) struct State {
    /// Chunk number → chunk.
    pub(super) chunks: BTreeMap<u64, Chunk>,
    /// Blocks that read as zero where no chunk holds an entry for them.
    pub(super) zeros: RangeSet,
}

/// The in-memory copy of a checksum table and of the zero ranges.
#[derive(Default)]
pub(super) struct Table {
    pub(super) state: RwLock<State>,
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
    pub(super) fn get(&self, first: u64, n: usize) -> Vec<BlockEntry> {
        let mut out = vec![BlockEntry::Absent; n];
        if n == 0 {
            return out;
        }
        let end = first.saturating_add(n as u64);
        let c0 = first / CHUNK_BLOCKS;
        let c1 = (end - 1) / CHUNK_BLOCKS;
        let state = self.state.read();
        for (&c, chunk) in state.chunks.range(c0..=c1) {
            let base = c * CHUNK_BLOCKS;
            for b in first.max(base)..end.min(base + CHUNK_BLOCKS) {
                out[(b - first) as usize] = chunk.entry((b - base) as usize);
            }
        }
        for (lo, hi) in state.zeros.overlaps(first, end) {
            for e in &mut out[(lo - first) as usize..(hi - first) as usize] {
                if *e == BlockEntry::Absent {
                    *e = BlockEntry::Zero;
                }
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
    pub(super) fn set(&self, first: u64, raw: &[u8]) {
        let end = first + (raw.len() / SUM_LEN) as u64;
        let mut state = self.state.write();
        Self::edit(&mut state.chunks, first, end, |e, lo, hi| {
            let base = lo - lo % CHUNK_BLOCKS;
            let src = &raw[((lo - first) as usize) * SUM_LEN..((hi - first) as usize) * SUM_LEN];
            e[((lo - base) as usize) * SUM_LEN..((hi - base) as usize) * SUM_LEN]
                .copy_from_slice(src);
        });
    }

    /// Sets the entries of blocks `first..end` to the marker of `kind`.
    pub(super) fn fill(&self, first: u64, end: u64, kind: FillKind) {
        let mark = kind.entry().encode();
        let whole = |lo: u64, hi: u64| lo % CHUNK_BLOCKS == 0 && hi - lo == CHUNK_BLOCKS;
        if kind == FillKind::Absent {
            // Only chunks already held change: visit those rather than the whole range (a
            // trim of a whole volume), a batch per lock so readers get in between.
            let (mut from, stop) = (first / CHUNK_BLOCKS, end.div_ceil(CHUNK_BLOCKS));
            while from < stop {
                let mut state = self.state.write();
                let map = &mut state.chunks;
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
                        Self::edit(map, lo, hi, |e, lo, hi| mark_entries(e, lo, hi, &mark));
                    }
                }
                from = last + 1;
            }
            return;
        }
        let mut state = self.state.write();
        for (c, lo, hi) in chunk_spans(first, end) {
            if whole(lo, hi) {
                state.chunks.insert(c, Chunk::Zero);
            } else {
                Self::edit(&mut state.chunks, lo, hi, |e, lo, hi| {
                    mark_entries(e, lo, hi, &mark)
                });
            }
        }
    }

    /// Up to `limit` chunks held at or after chunk `from` among those that blocks
    /// `first..end` touch, each with whether it holds only zero markers.
    pub(super) fn held(&self, from: u64, first: u64, end: u64, limit: usize) -> Vec<(u64, bool)> {
        let stop = end.div_ceil(CHUNK_BLOCKS);
        let from = from.max(first / CHUNK_BLOCKS);
        if from >= stop {
            return Vec::new();
        }
        self.state
            .read()
            .chunks
            .range(from..stop)
            .take(limit)
            .map(|(c, chunk)| (*c, matches!(chunk, Chunk::Zero)))
            .collect()
    }

    /// Whether any entry of blocks `first..end` is held (not absent).
    pub(super) fn holds_any(&self, first: u64, end: u64) -> bool {
        let state = self.state.read();
        let (c0, c1) = (first / CHUNK_BLOCKS, end.div_ceil(CHUNK_BLOCKS));
        state.chunks.range(c0..c1).any(|(&c, chunk)| {
            let base = c * CHUNK_BLOCKS;
            (first.max(base)..end.min(base + CHUNK_BLOCKS))
                .any(|b| chunk.entry((b - base) as usize) != BlockEntry::Absent)
        })
    }

    /// Whether chunk `c` would read the same as a hole: every entry absent, or a zero
    /// marker inside a zero range.
    pub(super) fn reads_as_hole(&self, c: u64) -> bool {
        let state = self.state.read();
        let Some(chunk) = state.chunks.get(&c) else {
            return false;
        };
        let base = c * CHUNK_BLOCKS;
        (0..CHUNK_BLOCKS).all(|i| match chunk.entry(i as usize) {
            BlockEntry::Absent => true,
            BlockEntry::Zero => state.zeros.contains(base + i),
            BlockEntry::Data(_) => false,
        })
    }

    /// Bytes of entry memory held (zero-marker chunks and the map itself not counted).
    pub(super) fn entry_bytes(&self) -> usize {
        self.state
            .read()
            .chunks
            .values()
            .filter(|c| matches!(c, Chunk::Entries(_)))
            .count()
            * CHUNK_BYTES
    }

    /// Reads the table file into memory, skipping its holes, with the zero ranges read
    /// from the layer's log.
    pub(super) fn load(sums: &File, zeros: RangeSet) -> std::io::Result<Table> {
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
            state: RwLock::new(State { chunks: map, zeros }),
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
        let state = self.state.read();
        f.debug_struct("Table")
            .field("chunks", &state.chunks.len())
            .field("zero_ranges", &state.zeros.len())
            .finish()
    }
}
