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
use crate::format::RecordKind;
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

/// Replays every WAL segment into the layer files, makes them durable and deletes the
/// segments. Returns the number for the next segment.
pub(super) fn recover(wal_dir: &Path, layers: &HashMap<LayerId, Arc<LayerFiles>>) -> Result<u64> {
    let segs = wal::list_segments(wal_dir)?;
    let Some(last) = segs.last().copied() else {
        return Ok(1);
    };
    let mut punches = Vec::new();
    let mut records = 0u64;
    for (i, &seg) in segs.iter().enumerate() {
        let end = wal::replay_segment(wal_dir, seg, |rec| {
            let h = rec.header;
            if h.kind == RecordKind::Seal {
                return Ok(());
            }
            records += 1;
            let Some(files) = layers.get(&h.layer) else {
                return Ok(()); // the layer was deleted after this write
            };
            match h.kind {
                RecordKind::Data => {
                    files.write_blocks(h.first_block, &rec.data)?;
                    files.write_entries(h.first_block, &rec.hashes)
                }
                RecordKind::Fill(kind) => {
                    files.fill_entries(h.first_block, u64::from(h.nblocks), kind)?;
                    punches.push((h.layer, h.first_block, u64::from(h.nblocks)));
                    Ok(())
                }
                RecordKind::Seal => Ok(()),
            }
        })?;
        let SegmentEnd::Torn { offset, reason } = end else {
            continue;
        };
        if let Some(&next) = segs.get(i + 1) {
            if wal::holds_seal_of(wal_dir, next, seg)? {
                // The segment was synced whole before its seal was written: this is
                // damage, not a crash. Refuse to guess which writes to drop.
                return Err(StoreError::Io {
                    context: format!(
                        "WAL segment {seg} (sealed) is damaged at offset {offset}: {reason}; \
                         refusing to start without it"
                    ),
                    source: std::io::Error::from_raw_os_error(nix::libc::EIO),
                });
            }
            // A crash while a rotation synced this segment: no flush completed after
            // the rotation (a flush waits for the seal), so nothing from here on was
            // flushed, and no checkpoint copied any of it (it waits for the seal too).
            tracing::warn!(segment = seg, offset, %reason, later = segs.len() - i - 1, "WAL segment ends in an incomplete record and was never sealed (crash during a rotation); it and later segments are dropped from there");
            break;
        }
        tracing::warn!(segment = seg, offset, %reason, "WAL ends in an incomplete record (crash before flush); it is dropped");
    }
    for files in layers.values() {
        files.sync()?;
    }
    for (layer, first, count) in punches {
        if let Some(files) = layers.get(&layer) {
            punch_markers(files, first, count)?;
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
