//! Reading the log back at start: the records of a segment in order, where and why they
//! end, and the evidence (seal records, flush markers) that tells a crash's torn tail from
//! damage (docs/storage.md, "Sealing a segment" and "A bad record in the log").

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{seg_path, ReadRecord};
use crate::catalog::sync_dir;
use crate::error::{FormatError, Result, StoreError};
use crate::format::{RecordHeader, RecordKind, BLOCK_SIZE, SUM_LEN, WAL_HEADER_LEN};

/// Why reading a segment stopped.
#[derive(Debug)]
pub enum SegmentEnd {
    /// Every byte was a complete, valid record.
    Clean,
    /// An earlier use of the segment's file, or the zeros it was filled with ahead of
    /// its records, starts at this offset: the records end here.
    Stale {
        /// Where this segment's records end.
        offset: u64,
    },
    /// A record at this offset is incomplete or fails its checksum.
    Torn {
        /// Offset of the first bad record.
        offset: u64,
        /// What was wrong with it.
        reason: String,
    },
}

/// Reads the records of segment `seg` in order, calling `apply` for each valid one.
pub fn replay_segment(
    dir: &Path,
    seg: u64,
    mut apply: impl FnMut(ReadRecord) -> Result<()>,
) -> Result<SegmentEnd> {
    let p = seg_path(dir, seg);
    let f = File::open(&p).map_err(|e| StoreError::io(format!("opening {}", p.display()), e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io(format!("inspecting {}", p.display()), e))?
        .len();
    let mut off = 0u64;
    let torn = |offset: u64, reason: String| Ok(SegmentEnd::Torn { offset, reason });
    while off < len {
        let mut head = [0u8; WAL_HEADER_LEN];
        if off + WAL_HEADER_LEN as u64 > len {
            return torn(off, "truncated header".into());
        }
        f.read_exact_at(&mut head, off)
            .map_err(|e| StoreError::io(format!("reading {}", p.display()), e))?;
        // Zeros the file was filled with ahead of its records (`Wal::new_segment`).
        if head.iter().all(|b| *b == 0) {
            return Ok(SegmentEnd::Stale { offset: off });
        }
        let header = match RecordHeader::decode_unchecked(&head) {
            Ok(h) => h,
            Err(e) => return torn(off, e.to_string()),
        };
        if header.segment != seg {
            // A whole record of an earlier use of this file (segment files are reused)
            // marks the end of this segment's records.
            let stale = header.segment < seg && {
                let mut hashes = vec![0u8; header.hash_count() * SUM_LEN];
                f.read_exact_at(&mut hashes, off + WAL_HEADER_LEN as u64)
                    .is_ok()
                    && RecordHeader::verify(&head, &hashes).is_ok()
            };
            if stale {
                return Ok(SegmentEnd::Stale { offset: off });
            }
            return torn(off, format!("record names segment {}", header.segment));
        }
        let payload = header.payload_len() as u64;
        if off + WAL_HEADER_LEN as u64 + payload > len {
            return torn(off, "truncated payload".into());
        }
        let n = header.nblocks as usize;
        let mut hashes = vec![0u8; header.hash_count() * SUM_LEN];
        let mut data = Vec::new();
        let base = off + WAL_HEADER_LEN as u64;
        f.read_exact_at(&mut hashes, base)
            .map_err(|e| StoreError::io(format!("reading {}", p.display()), e))?;
        if header.kind == RecordKind::Data {
            data = vec![0u8; n * BLOCK_SIZE];
            f.read_exact_at(&mut data, base + hashes.len() as u64)
                .map_err(|e| StoreError::io(format!("reading {}", p.display()), e))?;
        }
        if let Err(e) = RecordHeader::verify(&head, &hashes) {
            return torn(off, e.to_string());
        }
        for (i, block) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            if crate::format::block_hash(block)[..] != hashes[i * SUM_LEN..(i + 1) * SUM_LEN] {
                return torn(off, FormatError::BadChecksum.to_string());
            }
        }
        apply(ReadRecord {
            header,
            hashes,
            data,
        })?;
        off += WAL_HEADER_LEN as u64 + payload;
    }
    Ok(SegmentEnd::Clean)
}

/// Looks past a bad record at `offset` of segment `seg` (and through the segments in
/// `later`) for a valid flush marker covering a position beyond it: proof that the bad
/// record had been durable when a flush completed, so it is damage, not a torn tail.
/// Returns the position the marker covers.
pub fn flushed_beyond(
    dir: &Path,
    seg: u64,
    offset: u64,
    later: &[u64],
) -> Result<Option<(u64, u64)>> {
    let covers = |h: &RecordHeader| {
        (h.kind == RecordKind::Flushed && (h.layer, h.first_block) > (seg, offset))
            .then_some((h.layer, h.first_block))
    };
    let p = seg_path(dir, seg);
    let buf = fs::read(&p).map_err(|e| StoreError::io(format!("reading {}", p.display()), e))?;
    // Records are not aligned to anything a torn write respects, so look at every offset
    // after the bad one: a marker is a bare header with its own checksum.
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let magic = crate::format::WAL_MAGIC.to_le_bytes();
    let mut o = start;
    while o + WAL_HEADER_LEN <= buf.len() {
        if buf[o..o + 4] == magic {
            let mut head = [0u8; WAL_HEADER_LEN];
            head.copy_from_slice(&buf[o..o + WAL_HEADER_LEN]);
            if let Ok(h) = RecordHeader::decode_unchecked(&head) {
                if h.segment == seg && RecordHeader::verify(&head, &[]).is_ok() {
                    if let Some(at) = covers(&h) {
                        return Ok(Some(at));
                    }
                }
            }
        }
        o += 1;
    }
    for &next in later {
        let mut found = None;
        replay_segment(dir, next, |rec| {
            if found.is_none() {
                found = covers(&rec.header);
            }
            Ok(())
        })?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The layer a (possibly damaged) record at `offset` of segment `seg` names, if its
/// header decodes.
pub fn layer_at(dir: &Path, seg: u64, offset: u64) -> Option<u64> {
    let f = File::open(seg_path(dir, seg)).ok()?;
    let mut head = [0u8; WAL_HEADER_LEN];
    f.read_exact_at(&mut head, offset).ok()?;
    let h = RecordHeader::decode_unchecked(&head).ok()?;
    matches!(
        h.kind,
        RecordKind::Data | RecordKind::Placed | RecordKind::Fill(_)
    )
    .then_some(h.layer)
}

/// Whether segment `seg` holds (before any bad record) the seal record of segment `sealed`:
/// proof that `sealed` was synced whole. Returns the sealed length the record gives (0:
/// the whole file).
pub fn seal_of(dir: &Path, seg: u64, sealed: u64) -> Result<Option<u64>> {
    let mut found = None;
    replay_segment(dir, seg, |rec| {
        if rec.header.kind == RecordKind::Seal && rec.header.first_block == sealed {
            found = Some(rec.header.layer);
        }
        Ok(())
    })?;
    Ok(found)
}

/// Deletes segment files, used after recovery applied them.
pub fn remove_segments(dir: &Path, segs: &[u64]) -> Result<()> {
    for seg in segs {
        let p = seg_path(dir, *seg);
        fs::remove_file(&p).map_err(|e| StoreError::io(format!("removing {}", p.display()), e))?;
    }
    sync_dir(dir)
}
