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

use parking_lot::Mutex;

use super::pending::{BlockKey, Pending};
use super::Inner;
use crate::catalog::LayerId;
use crate::error::{Result, StoreError};
use crate::format::{BlockEntry, SUM_LEN};
use crate::hooks::Point;
use crate::layer::LayerFiles;

/// A fill whose data space is to be punched at the next checkpoint.
#[derive(Clone, Copy)]
pub(super) struct PunchLater {
    pub(super) seg: u64,
    pub(super) layer: LayerId,
    pub(super) first: u64,
    pub(super) count: u64,
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
        let Some(sealed) = self.wal.rotate()? else {
            return Ok(());
        };
        let _apply = self.apply.write();
        let todo = self.pending.logged_upto(sealed);
        let layers = self.layers.read().clone();
        let mut touched = {
            let _changing = self.layer_writes.write();
            copy_into_layers(&todo, &layers)?
        };
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
        for files in touched.values() {
            self.at(Point::SyncLayer(files.id))?;
            files.sync()?;
        }
        for p in &punches {
            if let Some(files) = layers.get(&p.layer) {
                let _changing = self.layer_writes.write();
                punch_markers(files, p.first, p.count)?;
            }
        }
        self.punches.lock().retain(|p| p.seg > sealed);
        self.pending.retire(&todo);
        self.at(Point::RemoveWal(sealed))?;
        self.wal.remove_upto(sealed)?;
        tracing::debug!(sealed, blocks = todo.len(), "checkpoint done");
        Ok(())
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

/// Writes the blocks of `todo` (sorted) and their checksums into their layer files, not
/// yet synced. Returns the layers it wrote to.
fn copy_into_layers(
    todo: &[(BlockKey, Pending)],
    layers: &HashMap<LayerId, Arc<LayerFiles>>,
) -> Result<HashMap<LayerId, Arc<LayerFiles>>> {
    let mut touched: HashMap<LayerId, Arc<LayerFiles>> = HashMap::new();
    let mut i = 0;
    while i < todo.len() {
        // Coalesce consecutive blocks of one layer into one write each for data and sums.
        let (layer, first) = todo[i].0;
        let mut j = i + 1;
        while j < todo.len() && todo[j].0 == (layer, first + (j - i) as u64) && j - i < 1024 {
            j += 1;
        }
        if let Some(files) = layers.get(&layer) {
            let data: Vec<&[u8]> = todo[i..j].iter().map(|(_, p)| p.block()).collect();
            let mut sums = Vec::with_capacity((j - i) * SUM_LEN);
            for (_, p) in &todo[i..j] {
                sums.extend_from_slice(&p.hash);
            }
            files.write_blocks_vectored(first, &data)?;
            files.write_entries(first, &sums)?;
            touched.insert(layer, files.clone());
        }
        i = j;
    }
    Ok(touched)
}

/// Punches the data of blocks in the range whose durable checksum entry is a marker.
pub(super) fn punch_markers(files: &LayerFiles, first: u64, count: u64) -> Result<()> {
    let mut b = first;
    let end = first + count;
    while b < end {
        let n = (end - b).min(65536);
        let entries = files.read_entries(b, n as usize)?;
        let mut i = 0;
        while i < entries.len() {
            if matches!(entries[i], BlockEntry::Data(_)) {
                i += 1;
                continue;
            }
            let start = i;
            while i < entries.len() && !matches!(entries[i], BlockEntry::Data(_)) {
                i += 1;
            }
            files.punch_blocks(b + start as u64, (i - start) as u64)?;
        }
        b += n;
    }
    Ok(())
}
