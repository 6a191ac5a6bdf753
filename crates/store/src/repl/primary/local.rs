//! The primary's local copy, applied like a replica's: writes, zeroes and trims that
//! touch different bytes run at once on the blocking pool (one at a time, each 1 MiB
//! overwrite waited for the block store's record sync in turn), while the machine still
//! completes requests in seq order. A write waits for the earlier ones it overlaps, so
//! overlapping writes land in seq order; a flush, snapshot or resize waits for every
//! earlier one, so a flush covers them all.
//!
//! Missed regions recorded for out-of-sync replicas reach their catch-ups only once the
//! local applies started before them are done: a region compared before its write is on
//! the local copy compares equal and is forgotten (`driver.rs`).

use std::collections::{BTreeMap, VecDeque};

use tessera_replication::primary::{ReplicaId, RequestId};
use tessera_replication::regions::Region;
use tessera_replication::wire::ReplyError;
use tokio::task::JoinSet;

/// Most local writes on the blocking pool at once (more wait for one to finish).
const MAX_RUNNING: usize = 16;

/// A local apply that finished: its request and outcome.
pub(super) type Finished = (RequestId, Result<(), ReplyError>);

#[derive(Default)]
pub(super) struct Local {
    tasks: JoinSet<(u64, RequestId, Result<(), ReplyError>)>,
    /// The applies running, by the order they started in, with the bytes they change.
    running: BTreeMap<u64, Region>,
    started: u64,
    /// Missed regions to publish once every apply started before them is done: (the last
    /// apply started when they were recorded, the regions).
    deferred: VecDeque<(u64, Vec<(ReplicaId, Region)>)>,
}

impl Local {
    /// True when nothing runs.
    pub(super) fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// True when a write of `region` must wait: it overlaps a running one, or the pool
    /// has no room for it (`pooled`).
    pub(super) fn must_wait(&self, region: Region, pooled: bool) -> bool {
        if pooled && self.running.len() >= MAX_RUNNING {
            return true;
        }
        let end = region.offset + region.len;
        self.running
            .values()
            .any(|r| r.offset < end && region.offset < r.offset + r.len)
    }

    /// Runs `apply` of request `id`, changing `region`, on the blocking pool.
    pub(super) fn start(
        &mut self,
        id: RequestId,
        region: Region,
        apply: impl FnOnce() -> Result<(), ReplyError> + Send + 'static,
    ) {
        self.started += 1;
        let n = self.started;
        self.running.insert(n, region);
        self.tasks.spawn_blocking(move || (n, id, apply()));
    }

    /// The next apply to finish (`None` when nothing runs). Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<Finished> {
        let joined = self.tasks.join_next().await?;
        Some(match joined {
            Ok((n, id, result)) => {
                self.running.remove(&n);
                (id, result)
            }
            Err(e) => {
                // A panic on the pool: the copy's state is unknown; the machine stops
                // on a failed local apply. Its slot cannot be named, so none is freed
                // until every apply is done (`running` is cleared then).
                if self.tasks.is_empty() {
                    self.running.clear();
                }
                (
                    RequestId(0),
                    Err(ReplyError::Io(format!("local apply failed: {e}"))),
                )
            }
        })
    }

    /// Missed regions recorded by a batch of actions: those that may be published now
    /// (no apply started before them still runs); the rest wait for [`Local::ready`].
    pub(super) fn defer(&mut self, recorded: Vec<(ReplicaId, Region)>) -> Vec<(ReplicaId, Region)> {
        if recorded.is_empty() {
            return Vec::new();
        }
        if self.running.is_empty() && self.deferred.is_empty() {
            return recorded;
        }
        self.deferred.push_back((self.started, recorded));
        self.ready()
    }

    /// The deferred regions whose earlier applies are all done, in the order recorded.
    pub(super) fn ready(&mut self) -> Vec<(ReplicaId, Region)> {
        let oldest = self.running.keys().next().copied();
        let mut out = Vec::new();
        while let Some((last, _)) = self.deferred.front() {
            if oldest.is_some_and(|o| o <= *last) {
                break;
            }
            if let Some((_, regions)) = self.deferred.pop_front() {
                out.extend(regions);
            }
        }
        out
    }
}
