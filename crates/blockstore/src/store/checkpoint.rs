//! The checkpoint: seals the active WAL segment, copies the pending blocks of sealed
//! segments into their layer files, syncs them, punches the data space under durable fill
//! markers and deletes the sealed segments. Its locks (`apply`, `layer_writes`) and what
//! they exclude are described in `docs/storage.md`, "Concurrency". A background thread runs it when the log grows
//! past a segment, when space runs short, at an interval, and once more when the store is
//! dropped.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::pending::{BlockKey, Content, Fate, Pending, PendingWrites, CHUNK};
use super::Inner;
use crate::catalog::LayerId;
use crate::error::{Result, StoreError};
use crate::format::{BlockEntry, SUM_LEN};
use crate::hooks::Point;
use crate::layer::LayerFiles;

/// A fill whose data space is to be punched at the next checkpoint. Until that
/// checkpoint has synced the fill's markers, they may not be durable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct PunchLater {
    /// The segment of the fill's record ([`PunchLater::UNLOGGED`] while it is logged).
    pub(super) seg: u64,
    pub(super) layer: LayerId,
    pub(super) first: u64,
    pub(super) count: u64,
}

impl PunchLater {
    /// The segment of a fill whose record is being logged: no checkpoint takes it.
    pub(super) const UNLOGGED: u64 = u64::MAX;
}

/// The background checkpoint thread; dropping it stops the thread and checkpoints once
/// more.
pub(super) struct Background {
    inner: Weak<Inner>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Background {
    /// Starts the checkpoint thread of `inner`.
    pub(super) fn start(inner: &Arc<Inner>) -> Result<Background> {
        let weak = Arc::downgrade(inner);
        let bg_weak = weak.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || checkpoint_loop(bg_weak))
            .map_err(|e| StoreError::io("starting the checkpoint thread", e))?;
        Ok(Background {
            inner: weak,
            handle: Mutex::new(Some(handle)),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.stop.store(true, Ordering::SeqCst);
            *inner.wake.0.lock() = true;
            inner.wake.1.notify_all();
        }
        if let Some(h) = self.handle.lock().take() {
            let _ = h.join();
        }
        if let Some(inner) = self.inner.upgrade() {
            if let Err(e) = inner.checkpoint() {
                tracing::error!(error = %e, "final checkpoint failed; the WAL will be replayed on start");
            }
        }
    }
}

fn checkpoint_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let interval = inner.opts.checkpoint_interval;
        {
            let mut woken = inner.wake.0.lock();
            if !*woken {
                inner.wake.1.wait_for(&mut woken, interval);
            }
            *woken = false;
        }
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        if inner.wal.active_len() > 0 {
            if let Err(e) = inner.checkpoint() {
                tracing::error!(error = %e, "checkpoint failed; the WAL keeps the data and it is retried");
            }
        }
        drop(inner);
    }
}

impl Inner {
    pub(super) fn checkpoint(&self) -> Result<()> {
        let _one = self.checkpointing.lock();
        // Sealing syncs the WAL segment; that happens before `apply` is taken, so trims do
        // not wait for it. Fills logged meanwhile land in the next segment.
        let started = Instant::now();
        let Some(sealed) = self.wal.rotate()? else {
            return Ok(());
        };
        let sealed_at = started.elapsed();
        self.at(Point::CheckpointSealed(sealed))?;
        // A sync that failed may have lost dirty pages; a later one succeeding proves
        // nothing about them, so the log stays until the next start replays it.
        self.check_synced()?;
        let _apply = self.apply.write();
        let todo = self.pending.logged_upto(sealed);
        // A placed version's checksum goes into the table only once its data is in place.
        // Waited for before `layer_writes`: the writer takes that lock for its write.
        let mut last: Option<&Arc<parking_lot::RwLock<()>>> = None;
        for (_, p) in &todo {
            if let Content::Placed { gate, .. } = &p.content {
                if !last.is_some_and(|l| Arc::ptr_eq(l, gate)) {
                    drop(gate.read());
                    last = Some(gate);
                }
            }
        }
        self.at(Point::CheckpointChose)?;
        let chosen_at = started.elapsed();
        let layers = self.layers.read().clone();
        // A placed version's checksum goes into the table only once its data is durable,
        // not just in place: the table page may reach the disk before the data page (a
        // power cut after the entry write, before the sync below), and then the entry
        // replaces what the table durably said before (a flushed trim's marker, say) with
        // a checksum the data does not match. Recovery would find neither that version
        // nor the one before it (power-loss finding 4, docs/power-loss.md). The writer
        // put the data in place before its gate opened (waited for above).
        for id in placed_layers(&todo) {
            if let Some(files) = layers.get(&id) {
                self.synced(|| {
                    self.at(Point::SyncPlacedData(id))?;
                    files.sync_data()
                })?;
            }
        }
        let data_synced_at = started.elapsed();
        // `layer_writes` is held a slice at a time (each block's fate and copy under one
        // hold), so placed writers waiting to put their data in place, and reads retrying
        // after a mismatch, wait for one slice, not for the whole checkpoint.
        let mut touched = HashMap::new();
        for slice in todo.chunks(CHUNK) {
            let _changing = self.layer_writes.write();
            copy_into_layers(slice, &layers, &self.pending, &mut touched)?;
        }
        // Punches leave the queue only once done (fills cannot add any while `apply` is
        // held). A checkpoint that fails keeps them, so the next one still syncs their
        // markers before it deletes the segment holding their fill records, and frees the
        // space.
        let punches: Vec<PunchLater> = self
            .punches
            .lock()
            .iter()
            .filter(|p| p.seg <= sealed)
            .copied()
            .collect();
        for p in &punches {
            if let Some(files) = layers.get(&p.layer) {
                touched.insert(p.layer, files.clone());
            }
        }
        let copied_at = started.elapsed();
        for files in touched.values() {
            self.synced(|| {
                self.at(Point::SyncLayer(files.id))?;
                files.sync()
            })?;
        }
        for p in &punches {
            if let Some(files) = layers.get(&p.layer) {
                let _changing = self.layer_writes.write();
                // A placed write after the trim has its data in place while the table
                // still holds the marker: its blocks are not punched.
                let placed = self.pending.placed_among(p.layer, p.first, p.count);
                punch_markers(files, p.first, p.count, |b| placed.contains(&b))?;
            }
        }
        // The versions in the segments about to go may have been replaced by newer ones
        // logged after them, unsynced: the newer records must be durable before the older
        // ones go, or a crash loses both (a logged version skipped because a placed write
        // replaced it: that placed data was synced above, its record is made durable here).
        let layers_synced_at = started.elapsed();
        self.sync_wal()?;
        self.punches.lock().retain(|p| p.seg > sealed);
        self.pending.retire(&todo);
        self.at(Point::RemoveWal(sealed))?;
        self.wal.remove_upto(sealed)?;
        self.pending.drop_shadows_upto(sealed);
        // Where a checkpoint's time goes (milliseconds since it started, at the end of each
        // step): what a writer stalled behind one waited for.
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(
            sealed,
            blocks = todo.len(),
            sealed_ms = ms(sealed_at),
            chosen_ms = ms(chosen_at),
            data_synced_ms = ms(data_synced_at),
            copied_ms = ms(copied_at),
            layers_synced_ms = ms(layers_synced_at),
            done_ms = ms(started.elapsed()),
            "checkpoint done"
        );
        Ok(())
    }

    /// Whether a fill whose markers may not be durable yet covers any of blocks
    /// `first..first+n` of `layer` (a queued punch: it leaves the queue only after the
    /// checkpoint synced the markers).
    pub(super) fn fill_not_durable(&self, layer: LayerId, first: u64, n: u64) -> bool {
        self.punches
            .lock()
            .iter()
            .any(|p| p.layer == layer && p.first < first + n && first < p.first + p.count)
    }

    /// Wakes the checkpoint thread.
    pub(super) fn wake_checkpoint(&self) {
        let mut w = self.wake.0.lock();
        if !*w {
            *w = true;
            self.wake.1.notify_one();
        }
    }

    /// Wakes the checkpoint thread once the active segment reached its size.
    pub(super) fn maybe_wake_checkpoint(&self, wal_len: u64) {
        if wal_len >= self.opts.wal_segment_bytes {
            self.wake_checkpoint();
        }
    }
}

/// The layers of the placed versions in `todo`, each once.
fn placed_layers(todo: &[(BlockKey, Pending)]) -> Vec<LayerId> {
    let mut ids: Vec<LayerId> = todo
        .iter()
        .filter(|(_, p)| matches!(p.content, Content::Placed { .. }))
        .map(|((layer, _), _)| *layer)
        .collect();
    ids.dedup();
    ids
}

/// Writes the blocks of `todo` (sorted) and their checksums into their layer files, not
/// yet synced, and adds the layers it wrote to (or that must be synced) to `touched`.
///
/// A logged version is copied even when a newer logged one replaced it (the newer one's
/// record may be torn at a crash, and this one's segment is about to go), except when a
/// placed write replaced it and its data is in place: copying would overwrite that, so
/// the layer is only synced (making the placed data durable before the older record
/// goes). A placed version's checksum is written even when a newer version replaced it:
/// its record is about to go, and the newer one's data may never become durable; while
/// the newer one is pending, reads do not look at the table, and recovery compares what
/// is in place with the newer record (made durable before the segment goes).
fn copy_into_layers(
    todo: &[(BlockKey, Pending)],
    layers: &HashMap<LayerId, Arc<LayerFiles>>,
    pending: &PendingWrites,
    touched: &mut HashMap<LayerId, Arc<LayerFiles>>,
) -> Result<()> {
    // What to do with each version: write data and checksum, checksum only, or nothing.
    #[derive(Clone, Copy, PartialEq)]
    enum Act {
        Copy,
        SumOnly,
        Skip,
    }
    let acts: Vec<Act> = todo
        .iter()
        .zip(pending.fates(todo))
        .map(|((_, p), fate)| match (&p.content, fate) {
            (Content::Logged { .. }, Fate::PlacedOver) => Act::Skip,
            (Content::Logged { .. }, _) => Act::Copy,
            // Also when a newer placed version replaced it: its record is about to go,
            // and the newer one's data may never become durable (see `Content::Placed`).
            (Content::Placed { .. }, _) => Act::SumOnly,
        })
        .collect();
    let mut i = 0;
    while i < todo.len() {
        let (layer, first) = todo[i].0;
        let Some(files) = layers.get(&layer) else {
            i += 1;
            continue;
        };
        touched.insert(layer, files.clone());
        if acts[i] == Act::Skip {
            i += 1;
            continue;
        }
        // Coalesce consecutive blocks of one layer that get the same treatment.
        let mut j = i + 1;
        while j < todo.len()
            && todo[j].0 == (layer, first + (j - i) as u64)
            && acts[j] == acts[i]
            && j - i < 1024
        {
            j += 1;
        }
        if acts[i] == Act::Copy {
            let data: Vec<&[u8]> = todo[i..j].iter().filter_map(|(_, p)| p.block()).collect();
            files.write_blocks_vectored(first, &data)?;
        }
        let mut sums = Vec::with_capacity((j - i) * SUM_LEN);
        for (_, p) in &todo[i..j] {
            sums.extend_from_slice(&p.hash);
        }
        files.write_entries(first, &sums)?;
        i = j;
    }
    Ok(())
}

/// Punches the data of blocks in the range whose durable checksum entry is a marker,
/// except those for which `keep(block)` says their data is needed.
pub(super) fn punch_markers(
    files: &LayerFiles,
    first: u64,
    count: u64,
    keep: impl Fn(u64) -> bool,
) -> Result<()> {
    let mut b = first;
    let end = first + count;
    while b < end {
        let n = (end - b).min(65536);
        let entries = files.read_entries(b, n as usize)?;
        let mut i = 0;
        let holds = |i: usize| matches!(entries[i], BlockEntry::Data(_)) || keep(b + i as u64);
        while i < entries.len() {
            if holds(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < entries.len() && !holds(i) {
                i += 1;
            }
            files.punch_blocks(b + start as u64, (i - start) as u64)?;
        }
        b += n;
    }
    Ok(())
}
