//! Recovery at open: replays every WAL segment a crash left into the layer files (writes
//! are idempotent, so a replay after a partial checkpoint is harmless), makes them durable,
//! punches the space under replayed fills, and removes layer files the catalog does not
//! know.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::checkpoint::punch_markers;
use crate::catalog::{Catalog, LayerId};
use crate::error::{Result, StoreError};
use crate::format::{block_hash, BlockEntry, FillKind, RecordKind, BLOCK_SIZE, SUM_LEN};
use crate::layer::LayerFiles;
use crate::wal::{self, SegmentEnd};

/// Removes layer files the catalog does not know (left by a crash mid-create or delete).
pub(super) fn remove_stray_layers(layer_dir: &Path, cat: &Catalog) -> Result<()> {
    let rd = fs::read_dir(layer_dir)
        .map_err(|e| StoreError::io(format!("listing {}", layer_dir.display()), e))?;
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(stem) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".data").or_else(|| n.strip_suffix(".sums")))
        else {
            continue;
        };
        if let Ok(id) = u64::from_str_radix(stem, 16) {
            if !cat.layers.contains_key(&id) {
                tracing::info!(
                    layer = id,
                    "removing files of a layer the catalog does not know"
                );
                LayerFiles::remove(layer_dir, id)?;
            }
        }
    }
    Ok(())
}

/// One version of a block that a placed record touched, in log order.
enum Version {
    /// A placed write's checksum: current if the data in place matches it.
    Placed([u8; SUM_LEN]),
    /// A logged write, with its data.
    Logged([u8; SUM_LEN], Vec<u8>),
    /// A fill.
    Fill(FillKind),
}

/// Replays every WAL segment into the layer files, makes them durable and deletes the
/// segments. Returns the number for the next segment.
///
/// Logged writes and fills are replayed in log order (idempotent). Blocks that a placed
/// write touched are settled after, newest version first: a placed version counts only if
/// the data in place matches its checksum (a flush syncs placed data before the log, so
/// every flushed placed write matches); otherwise the write was never flushed and the
/// version before it stands. See `docs/storage.md`, "Large writes".
///
/// A bad record that a completed flush covered (its segment was sealed, or a durable flush
/// marker lies beyond it) is damage, not a crash: recovery refuses, naming it, unless
/// `accept_damage` (the operator's explicit override) says to drop it and what follows.
pub(super) fn recover(
    wal_dir: &Path,
    layers: &HashMap<LayerId, Arc<LayerFiles>>,
    accept_damage: bool,
) -> Result<u64> {
    let segs = wal::list_segments(wal_dir)?;
    let Some(last) = segs.last().copied() else {
        return Ok(1);
    };
    // Pass 1: which blocks did placed writes touch, and what did the table say of them?
    let mut touched: HashMap<(LayerId, u64), Vec<Version>> = HashMap::new();
    scan(wal_dir, &segs, accept_damage, false, |rec| {
        if rec.header.kind == RecordKind::Placed {
            for b in 0..u64::from(rec.header.nblocks) {
                touched
                    .entry((rec.header.layer, rec.header.first_block + b))
                    .or_default();
            }
        }
        Ok(())
    })?;
    let mut before: HashMap<(LayerId, u64), BlockEntry> = HashMap::new();
    for &(layer, b) in touched.keys() {
        if let Some(files) = layers.get(&layer) {
            let e = files
                .read_entries(b, 1)?
                .first()
                .copied()
                .unwrap_or(BlockEntry::Absent);
            before.insert((layer, b), e);
        }
    }
    // Pass 2: replay, keeping the versions of touched blocks aside.
    let mut punches = Vec::new();
    let mut records = 0u64;
    scan(wal_dir, &segs, accept_damage, true, |rec| {
        let h = rec.header;
        if matches!(h.kind, RecordKind::Seal | RecordKind::Flushed) {
            return Ok(());
        }
        records += 1;
        let Some(files) = layers.get(&h.layer) else {
            return Ok(()); // the layer was deleted after this write
        };
        let n = u64::from(h.nblocks);
        match h.kind {
            RecordKind::Data => {
                let mut i = 0u64;
                while i < n {
                    let key = (h.layer, h.first_block + i);
                    if let Some(versions) = touched.get_mut(&key) {
                        let (lo, hi) = (i as usize * BLOCK_SIZE, (i as usize + 1) * BLOCK_SIZE);
                        let sum = &rec.hashes[i as usize * SUM_LEN..(i as usize + 1) * SUM_LEN];
                        versions.push(Version::Logged(to_sum(sum), rec.data[lo..hi].to_vec()));
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < n && !touched.contains_key(&(h.layer, h.first_block + j)) {
                        j += 1;
                    }
                    let (lo, hi) = (i as usize, j as usize);
                    files.write_blocks(
                        h.first_block + i,
                        &rec.data[lo * BLOCK_SIZE..hi * BLOCK_SIZE],
                    )?;
                    files.write_entries(
                        h.first_block + i,
                        &rec.hashes[lo * SUM_LEN..hi * SUM_LEN],
                    )?;
                    i = j;
                }
                Ok(())
            }
            RecordKind::Fill(kind) => {
                files.fill_entries(h.first_block, n, kind)?;
                punches.push((h.layer, h.first_block, n));
                let range = h.first_block..h.first_block + n;
                for ((l, b), versions) in touched.iter_mut() {
                    if *l == h.layer && range.contains(b) {
                        versions.push(Version::Fill(kind));
                    }
                }
                Ok(())
            }
            RecordKind::Placed => {
                for (i, sum) in rec.hashes.chunks_exact(SUM_LEN).enumerate() {
                    if let Some(versions) = touched.get_mut(&(h.layer, h.first_block + i as u64)) {
                        versions.push(Version::Placed(to_sum(sum)));
                    }
                }
                Ok(())
            }
            RecordKind::Seal | RecordKind::Flushed => Ok(()),
        }
    })?;
    settle(layers, touched, &before)?;
    for files in layers.values() {
        files.sync()?;
    }
    for (layer, first, count) in punches {
        if let Some(files) = layers.get(&layer) {
            punch_markers(files, first, count, |_| false)?;
        }
    }
    wal::remove_segments(wal_dir, &segs)?;
    if records > 0 {
        tracing::info!(
            records,
            segments = segs.len(),
            "replayed the write-ahead log"
        );
    }
    Ok(last + 1)
}

fn to_sum(raw: &[u8]) -> [u8; SUM_LEN] {
    let mut s = [0u8; SUM_LEN];
    s.copy_from_slice(raw);
    s
}

/// Decides the content of every block a placed write touched: the newest version whose
/// data is there (placed) or can be put there (logged, fill); failing all, what the
/// table said before the replay, even when the data does not match it (then the block
/// reads as an I/O error: see below).
fn settle(
    layers: &HashMap<LayerId, Arc<LayerFiles>>,
    touched: HashMap<(LayerId, u64), Vec<Version>>,
    before: &HashMap<(LayerId, u64), BlockEntry>,
) -> Result<()> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    for ((layer, b), versions) in touched {
        let Some(files) = layers.get(&layer) else {
            continue;
        };
        files.read_blocks(b, &mut buf)?;
        let in_place = block_hash(&buf);
        let mut entry = None;
        for v in versions.iter().rev() {
            match v {
                Version::Placed(h) if *h == in_place => {
                    entry = Some(BlockEntry::Data(*h));
                }
                Version::Placed(_) => continue,
                Version::Logged(h, data) => {
                    files.write_blocks(b, data)?;
                    entry = Some(BlockEntry::Data(*h));
                }
                Version::Fill(kind) => entry = Some(kind.entry()),
            }
            break;
        }
        let entry = match (entry, before.get(&(layer, b))) {
            (Some(e), _) => e,
            (None, Some(BlockEntry::Data(h))) if *h != in_place => {
                // The bytes in place are neither a logged version nor what the table
                // names: an unflushed overwrite in place was torn inside the block (a
                // disk writes 512-byte sectors), and the version before it is partly
                // gone. They may be older than a flushed write (finding 4 in
                // docs/power-loss.md), so they are never served as the block's content:
                // the table keeps its entry and reads fail the checksum (EIO) until the
                // block is written again or repaired from a replica. Scrub lists it.
                tracing::error!(
                    layer,
                    block = b,
                    "after the crash the block matches none of its versions (an overwrite \
                     cut short); it reads as an I/O error until rewritten or repaired"
                );
                BlockEntry::Data(*h)
            }
            (None, Some(e)) => *e,
            (None, None) => BlockEntry::Absent,
        };
        files.write_entries(b, &entry.encode())?;
    }
    Ok(())
}

/// Reads the records of `segs` in order, calling `apply` for each valid one, and stops
/// where a crash cut the log (see docs/storage.md, "Sealing a segment" and "A bad record
/// in the log").
fn scan(
    wal_dir: &Path,
    segs: &[u64],
    accept_damage: bool,
    report: bool,
    mut apply: impl FnMut(wal::ReadRecord) -> Result<()>,
) -> Result<()> {
    for (i, &seg) in segs.iter().enumerate() {
        let end = wal::replay_segment(wal_dir, seg, &mut apply)?;
        let seal = match segs.get(i + 1) {
            Some(&next) => wal::seal_of(wal_dir, next, seg)?,
            None => None,
        };
        let (offset, reason, stale) = match end {
            SegmentEnd::Clean => continue,
            SegmentEnd::Stale { offset } => (offset, "end of records".to_string(), true),
            SegmentEnd::Torn { offset, reason } => (offset, reason, false),
        };
        // A sealed segment's records end where its seal record says (0: the file's end).
        let sealed = match seal {
            Some(len) if len != 0 && offset >= len => continue,
            Some(_) => true,
            None => false,
        };
        // The segment was synced whole before its seal was written, or a flush that
        // completed later says the record was durable: damage, not a crash.
        let flushed = if sealed {
            None
        } else {
            wal::flushed_beyond(wal_dir, seg, offset, &segs[i + 1..])?
        };
        if stale && flushed.is_none() && !sealed {
            // The segment's records end where a reused file's earlier ones begin.
            if segs.get(i + 1).is_some() {
                if report {
                    tracing::warn!(segment = seg, offset, later = segs.len() - i - 1, "WAL segment ends unsealed (crash during a rotation); later segments are dropped");
                }
                break;
            }
            continue;
        }
        if sealed || flushed.is_some() {
            let layer = wal::layer_at(wal_dir, seg, offset).map_or_else(
                || "unknown (header unreadable)".to_string(),
                |l| l.to_string(),
            );
            let why = if sealed {
                "the segment was synced whole (its seal record follows)".to_string()
            } else {
                let (fs, fo) = flushed.unwrap_or_default();
                format!("a flush completed after it (up to segment {fs} offset {fo})")
            };
            let what = format!(
                "WAL segment {seg} is damaged at offset {offset} ({reason}; layer {layer}), and {why}: \
                 acknowledged, flushed writes from there on would be lost"
            );
            if !accept_damage {
                return Err(StoreError::DamagedLog(format!(
                    "{what}; refusing to start. Restore the data directory from a replica or \
                     backup, or start with --accept-wal-damage to drop them"
                )));
            }
            tracing::error!(segment = seg, offset, layer = %layer, "{what}; dropping them as the operator asked (--accept-wal-damage)");
            break;
        }
        if segs.get(i + 1).is_some() {
            // A crash while a rotation synced this segment: no flush completed after
            // the rotation (a flush waits for the seal), so nothing from here on was
            // flushed, and no checkpoint copied any of it (it waits for the seal too).
            if report {
                tracing::warn!(segment = seg, offset, %reason, later = segs.len() - i - 1, "WAL segment ends in an incomplete record and was never sealed (crash during a rotation); it and later segments are dropped from there");
            }
            break;
        }
        if report {
            tracing::warn!(segment = seg, offset, %reason, "WAL ends in an incomplete record (crash before flush); it is dropped");
        }
    }
    Ok(())
}
