//! FLUSH (and FUA): every acknowledged write made durable, with the flushes of the moment
//! sharing the work (group commit).
//!
//! A flush syncs the data files that took placed writes since the last flush, then the
//! log. Only one flush at a time may do that: a flush that found the set of data files
//! emptied by another would otherwise return before that one's syncs, which cover its
//! writes, were done. So one flush *leads*; the flushes that come meanwhile wait for it
//! and then find themselves covered by the next leader, who is one of them: a leader
//! covers every flush that had begun when it started, since their writes were
//! acknowledged before they began, so before its syncs. Without this, N clients flushing
//! at once took N flushes one after another (each waking only when the one before it let
//! go of a lock); now they take two at most.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::Inner;
use crate::error::Result;
use crate::hooks::Point;
use crate::layer::LayerFiles;

/// The flushes of the moment.
#[derive(Default)]
pub(super) struct Flushes {
    /// Numbers the flushes in the order they begin.
    begun: AtomicU64,
    state: Mutex<FlushState>,
    /// Notified when a leader is done.
    done: Condvar,
}

#[derive(Default)]
struct FlushState {
    /// A flush is syncing.
    leading: bool,
    /// Every flush numbered up to this one is covered by a leader that succeeded.
    covered: u64,
    /// Flushes waiting for the leader (for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    waiting: usize,
}

/// The leading flush; when it is done (or failed), the waiting ones are woken.
struct Lead<'a>(&'a Flushes);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.0.state.lock().leading = false;
        self.0.done.notify_all();
    }
}

impl Inner {
    /// Makes every write acknowledged before this call durable.
    pub(super) fn flush(&self) -> Result<()> {
        self.check_synced()?;
        let f = &self.flushes;
        let me = f.begun.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let mut st = f.state.lock();
            loop {
                if st.covered >= me {
                    // A sync may have failed since: then nothing is called durable.
                    return self.check_synced();
                }
                if !st.leading {
                    st.leading = true;
                    break;
                }
                st.waiting += 1;
                f.done.wait(&mut st);
                st.waiting -= 1;
            }
        }
        let _lead = Lead(f);
        // Every flush begun so far: their writes were acknowledged before they began, so
        // the syncs below, which start after this, cover them.
        let upto = f.begun.load(Ordering::SeqCst);
        self.sync_placed_and_log()?;
        let mut st = f.state.lock();
        st.covered = st.covered.max(upto);
        Ok(())
    }

    /// The data files that took placed writes, then the log (whose records name their
    /// hashes).
    fn sync_placed_and_log(&self) -> Result<()> {
        let dirty: Vec<Arc<LayerFiles>> =
            self.placed_dirty.lock().drain().map(|(_, f)| f).collect();
        self.at(Point::FlushData)?;
        for files in &dirty {
            if let Err(e) = self.synced(|| files.sync()) {
                let mut back = self.placed_dirty.lock();
                for f in &dirty {
                    back.insert(f.id, f.clone());
                }
                return Err(e);
            }
        }
        self.sync_wal()
    }

    /// Flushes waiting for a leader (for tests).
    #[cfg(test)]
    pub(super) fn flushes_waiting(&self) -> usize {
        self.flushes.state.lock().waiting
    }
}
