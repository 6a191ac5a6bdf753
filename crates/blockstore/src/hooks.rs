//! Test points: named places in the engine where a unit test can pause a thread or make
//! the step fail, to replay a race or a failed system call deterministically.
//!
//! Without `cfg(test)` a [`Hooks`] is empty and [`Hooks::at`] compiles to nothing, so the
//! points cost nothing in the read and write paths of a real build.

use crate::catalog::LayerId;

/// A place in the engine a test can stop at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Point {
    /// A read found where each block comes from and is about to read layer data.
    ReadResolved,
    /// A fill's record is in the WAL; its pending blocks are forgotten.
    FillLogged,
    /// The checkpoint is about to sync the files of this layer.
    SyncLayer(LayerId),
    /// The checkpoint is about to sync the data file of this layer, whose placed data it
    /// is about to name in the checksum table.
    SyncPlacedData(LayerId),
    /// The checkpoint is about to delete the WAL segments up to this one.
    RemoveWal(u64),
    /// The WAL is about to sync the segment a rotation sealed.
    SealSync(u64),
    /// A placed write's record is in the WAL and its blocks are published; its data is
    /// not in place yet.
    PlacedLogged,
    /// The WAL is about to sync its active segment for a flush (or a placed overwrite).
    WalSync,
    /// A flush leading the log's sync is about to sync the active segment.
    LogSync,
    /// A placed write decided whether it overwrites data in place (and synced if so).
    PlacedDecided,
    /// A flush took the data files of placed writes and is about to sync them.
    FlushData,
    /// The checkpoint sealed the WAL segments up to this one and has not yet looked at
    /// the pending versions.
    CheckpointSealed(u64),
    /// The checkpoint chose the versions to copy and is about to change layer files.
    CheckpointChose,
    /// A merge of a layer into its child is about to copy its batch of this number (the
    /// first is 0); it holds no lock here.
    MergeBatch(u64),
    /// A merge copied everything and synced the child; holding the catalog and the
    /// volumes' runtimes, it is about to save the catalog that stops naming the layer.
    MergeCommit,
}

#[cfg(test)]
type Hook = std::sync::Arc<dyn Fn(Point) -> std::io::Result<()> + Send + Sync>;

/// The hook of one store or log, if a test set one.
#[derive(Default)]
pub(crate) struct Hooks {
    #[cfg(test)]
    hook: parking_lot::Mutex<Option<Hook>>,
}

impl Hooks {
    /// Runs the test's hook at `point`; an error it returns is the step's error.
    #[inline(always)]
    pub(crate) fn at(&self, point: Point) -> std::io::Result<()> {
        #[cfg(test)]
        {
            // Cloned out so a hook that blocks does not hold the lock.
            let hook = self.hook.lock().clone();
            if let Some(hook) = hook {
                return hook(point);
            }
        }
        let _ = point;
        Ok(())
    }

    /// Runs `hook` at every point from now on.
    #[cfg(test)]
    pub(crate) fn set(&self, hook: impl Fn(Point) -> std::io::Result<()> + Send + Sync + 'static) {
        *self.hook.lock() = Some(std::sync::Arc::new(hook));
    }
}

/// Pausing a thread at a point until the test lets it go.
#[cfg(test)]
pub(crate) mod pause {
    use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::{Hooks, Point};

    /// A thread stopped at a point: it waits until [`Paused::release`] (or the drop).
    pub(crate) struct Paused {
        reached: Receiver<Point>,
        go: Sender<()>,
    }

    /// Stops the first thread that reaches a point `which` accepts; later ones pass.
    pub(crate) fn first(
        hooks: &Hooks,
        which: impl Fn(Point) -> bool + Send + Sync + 'static,
    ) -> Paused {
        let (reached_tx, reached) = channel();
        let (go, go_rx) = channel::<()>();
        let armed = Mutex::new(Some((reached_tx, go_rx)));
        let armed = Arc::new(armed);
        hooks.set(move |p| {
            if which(p) {
                let taken = armed.lock().map(|mut a| a.take()).unwrap_or(None);
                if let Some((reached_tx, go_rx)) = taken {
                    let _ = reached_tx.send(p);
                    let _ = go_rx.recv();
                }
            }
            Ok(())
        });
        Paused { reached, go }
    }

    /// Points every hook call saw, in order, for tests that check what happened when.
    pub(crate) type Seen = Arc<Mutex<Vec<Point>>>;

    /// Like [`first`] for several points at once (the `i`-th [`Paused`] stops the first
    /// thread reaching a point `which[i]` accepts), also recording every point reached.
    pub(crate) fn first_of_each<const N: usize>(
        hooks: &Hooks,
        which: [fn(Point) -> bool; N],
    ) -> ([Paused; N], Seen) {
        type Slot = Mutex<Option<(Sender<Point>, Receiver<()>)>>;
        type Armed = (fn(Point) -> bool, Slot);
        let mut armed: Vec<Armed> = Vec::new();
        let mut paused = Vec::new();
        for w in which {
            let (reached_tx, reached) = channel();
            let (go, go_rx) = channel::<()>();
            armed.push((w, Mutex::new(Some((reached_tx, go_rx)))));
            paused.push(Paused { reached, go });
        }
        let seen: Seen = Arc::default();
        let log = seen.clone();
        hooks.set(move |p| {
            if let Ok(mut l) = log.lock() {
                l.push(p);
            }
            for (w, slot) in &armed {
                if w(p) {
                    let taken = slot.lock().map(|mut a| a.take()).unwrap_or(None);
                    if let Some((reached_tx, go_rx)) = taken {
                        let _ = reached_tx.send(p);
                        let _ = go_rx.recv();
                    }
                    break;
                }
            }
            Ok(())
        });
        match paused.try_into() {
            Ok(all) => (all, seen),
            Err(_) => unreachable!("one Paused per point"),
        }
    }

    impl Paused {
        /// Waits until a thread stopped at the point.
        pub(crate) fn reached(&self) -> Point {
            match self.reached.recv_timeout(Duration::from_secs(30)) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) => panic!("no thread reached the point"),
                Err(RecvTimeoutError::Disconnected) => panic!("the hook is gone"),
            }
        }

        /// Lets the stopped thread go on.
        pub(crate) fn release(&self) {
            let _ = self.go.send(());
        }
    }

    impl Drop for Paused {
        fn drop(&mut self) {
            self.release();
        }
    }
}
