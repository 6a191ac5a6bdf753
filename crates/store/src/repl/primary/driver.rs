//! The driver task: owns one volume's `Primary` machine, feeds it requests, replica
//! messages and the time, and performs its actions in order (the local copy in seq
//! order, frames to the links, completions, missed-region records).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tessera_blockstore::{Export, Store};
use tessera_replication::primary::{Primary, PrimaryAction, PrimaryInput, ReplicaId, RequestId};
use tessera_replication::replica::Op;
use tessera_replication::wire::{self, ReplyError, VolumeName};
use tessera_store_admin::ReplicaState;
use tokio::sync::mpsc;

use super::super::catchup::{Final, Shared};
use super::super::quic::ReplEndpoint;
use super::super::recent::MAX_PENDING;
use super::super::replica::reply_error;
use super::local::{Finished, Local};
use super::missed::append_synced;
use super::{Done, ForwardError, Input, Peer, TICK};

pub(super) struct Driver {
    pub(super) machine: Primary,
    pub(super) export: Arc<Export>,
    pub(super) store: Store,
    /// Snapshots taken from write streams on this store.
    pub(super) taken: super::super::snapshot::Taken,
    pub(super) volume: String,
    pub(super) start: Instant,
    pub(super) next_id: u64,
    pub(super) waiting: HashMap<RequestId, Done>,
    pub(super) links: HashMap<ReplicaId, mpsc::UnboundedSender<Vec<u8>>>,
    pub(super) missed_dir: PathBuf,
    pub(super) shared: Shared,
    pub(super) nodes: HashMap<ReplicaId, String>,
    pub(super) ep: Arc<ReplEndpoint>,
    pub(super) name: VolumeName,
    pub(super) peers: HashMap<ReplicaId, Peer>,
    /// Running catch-ups: the task and where to ask for its final pass.
    pub(super) catchups:
        HashMap<ReplicaId, (tokio::task::JoinHandle<()>, mpsc::UnboundedSender<Final>)>,
    pub(super) rate: Option<u64>,
    pub(super) fenced: Arc<std::sync::atomic::AtomicU64>,
    /// Per replica: makes its link open a new stream.
    pub(super) restarts: HashMap<ReplicaId, Arc<tokio::sync::Notify>>,
    /// The last changes applied to each copy on this store (`recent.rs`).
    pub(super) recent: super::super::recent::Recent,
    /// Client requests held while the machine has `MAX_PENDING` in flight, in order.
    pub(super) held: std::collections::VecDeque<(Op, Done)>,
    /// The in-sync replicas to reconcile with before the first request, and how long
    /// to wait for each (`reconcile.rs`).
    pub(super) reconcile_first: Option<(Vec<(ReplicaId, Peer)>, std::time::Duration)>,
    /// The local copy's writes running on the blocking pool (`local.rs`).
    pub(super) local: Local,
}

impl Drop for Driver {
    fn drop(&mut self) {
        for (t, _) in self.catchups.values() {
            t.abort();
        }
    }
}

impl Driver {
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        if let Some((in_sync, wait)) = self.reconcile_first.take() {
            self.reconcile(in_sync, wait).await;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (actions, catching_up) = tokio::select! {
                input = rx.recv() => match input {
                    None => return,
                    Some(Input::Reconfigure { config, catching_up, members, done }) => {
                        // A joining replica's last pass compares the local copy: every
                        // write on it first, and their missed regions recorded.
                        let mut actions = self.drain_local().await;
                        let (more, catching) = self.reconfigure(config, catching_up, members, done).await;
                        actions.extend(more);
                        (actions, catching)
                    }
                    Some(i) => (self.input(i), None),
                },
                Some(done) = self.local.next(), if !self.local.is_empty() => {
                    (self.local_done(done), None)
                }
                _ = tick.tick() => (self.machine.handle(self.start.elapsed(), PrimaryInput::Tick), None),
            };
            self.perform(actions).await;
            self.release_held().await;
            // The new configuration's catch-ups start only now: what a replica leaving the
            // in-sync set may lack is recorded by these actions, and a catch-up started
            // before found nothing recorded and reported the replica caught up while it
            // still lacked those writes (replication_restart saw the copy differ).
            if let Some(catching) = catching_up {
                self.catch_up(&catching);
            }
            if let Some(current) = self.fenced_generation() {
                self.fenced
                    .store(current, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// Gives the machine the held requests it has room for (`MAX_PENDING`).
    async fn release_held(&mut self) {
        while self.machine.pending() < MAX_PENDING {
            let Some((op, done)) = self.held.pop_front() else {
                return;
            };
            let id = RequestId(self.next_id);
            self.next_id += 1;
            self.waiting.insert(id, done);
            let actions = self
                .machine
                .handle(self.start.elapsed(), PrimaryInput::Request { id, op });
            self.perform(actions).await;
        }
    }

    fn input(&mut self, input: Input) -> Vec<PrimaryAction> {
        let now = self.start.elapsed();
        match input {
            // The bound keeps what a failover may leave unsettled within the window
            // every copy remembers (`recent.rs`).
            Input::Request { op, done }
                if !self.held.is_empty() || self.machine.pending() >= MAX_PENDING =>
            {
                self.held.push_back((op, done));
                Vec::new()
            }
            Input::Request { op, done } => {
                let id = RequestId(self.next_id);
                self.next_id += 1;
                self.waiting.insert(id, done);
                self.machine.handle(now, PrimaryInput::Request { id, op })
            }
            Input::Connected { from, tx } => {
                self.links.insert(from, tx);
                self.machine.handle(now, PrimaryInput::Connected(from))
            }
            Input::Disconnected { from } => {
                self.links.remove(&from);
                self.machine.handle(now, PrimaryInput::Disconnected(from))
            }
            Input::Received { from, msg } => self
                .machine
                .handle(now, PrimaryInput::Received { from, msg }),
            Input::Reconfigure { done, .. } => {
                // Handled by `reconfigure` (it waits for catch-ups).
                let _ = done.send(Err("internal: reconfiguration out of order".into()));
                Vec::new()
            }
        }
    }

    /// Performs `actions` in order; local applies and their reports may bring more.
    pub(super) async fn perform(&mut self, actions: Vec<PrimaryAction>) {
        let mut queue = std::collections::VecDeque::from(actions);
        // Missed regions reach the catch-ups only once the batch's local applies are
        // done: a region taken by a catch-up pass before the write it records is on the
        // local copy compares equal (both copies still old) and is forgotten, and the
        // replica never gets that write (seen: a rejoined copy lacking the last writes).
        let mut recorded = Vec::new();
        self.perform_queue(&mut queue, &mut recorded).await;
        let mut ready = self.local.defer(recorded);
        ready.extend(self.local.ready());
        let mut missed = self.shared.missed.lock();
        for (replica, region) in ready {
            missed.entry(replica).or_default().recorded.insert(region);
        }
    }

    /// Gives the machine a finished local apply's outcome.
    fn local_done(&mut self, (id, result): Finished) -> Vec<PrimaryAction> {
        self.machine
            .handle(self.start.elapsed(), PrimaryInput::LocalDone { id, result })
    }

    /// Waits for every local apply running; returns what the machine made of them.
    async fn drain_local(&mut self) -> Vec<PrimaryAction> {
        let mut actions = Vec::new();
        while let Some(done) = self.local.next().await {
            actions.extend(self.local_done(done));
        }
        actions
    }

    async fn perform_queue(
        &mut self,
        queue: &mut std::collections::VecDeque<PrimaryAction>,
        recorded: &mut Vec<(ReplicaId, tessera_replication::regions::Region)>,
    ) {
        while let Some(action) = queue.pop_front() {
            match action {
                PrimaryAction::ApplyLocal { id, op } => {
                    // What must finish first: the running writes it overlaps (or room on
                    // the pool); for a flush, snapshot or resize, every one.
                    let region = concurrent_region(&op);
                    let mut earlier = Vec::new();
                    match region {
                        Some(r) => {
                            while self.local.must_wait(r, !quick(&op)) {
                                match self.local.next().await {
                                    Some(done) => earlier.extend(self.local_done(done)),
                                    None => break,
                                }
                            }
                        }
                        None => earlier.extend(self.drain_local().await),
                    }
                    self.recent.note(&self.volume, &op);
                    let export = self.export.clone();
                    let local = (self.store.clone(), self.volume.clone());
                    let taken = self.taken.clone();
                    let result = if let (Some(r), false) = (region, quick(&op)) {
                        // Alongside the others; its outcome comes back through `run`.
                        self.local
                            .start(id, r, move || apply_local(&export, op, &local, &taken));
                        for (i, a) in earlier.into_iter().enumerate() {
                            queue.insert(i, a);
                        }
                        continue;
                    } else if quick(&op) {
                        // Page-cache work of a few µs, as the NBD server does for a copy of
                        // one: a trip to the blocking pool and back cost more than the
                        // write (4K QD1 latency).
                        apply_local(&export, op, &local, &taken)
                    } else {
                        tokio::task::spawn_blocking(move || {
                            apply_local(&export, op, &local, &taken)
                        })
                        .await
                        .unwrap_or_else(|e| Err(ReplyError::Io(e.to_string())))
                    };
                    earlier.extend(self.local_done((id, result)));
                    for (i, a) in earlier.into_iter().enumerate() {
                        queue.insert(i, a);
                    }
                }
                PrimaryAction::Send { to, msg } => {
                    if let Some(tx) = self.links.get(&to) {
                        match wire::encode(&msg) {
                            Ok(frame) => {
                                let _ = tx.send(frame);
                            }
                            Err(e) => {
                                tracing::error!(volume = %self.volume, error = %e, "could not encode a replication message")
                            }
                        }
                    }
                }
                PrimaryAction::Complete { id, result } => {
                    if let Some(done) = self.waiting.remove(&id) {
                        done.send(result.map_err(ForwardError::Request));
                    }
                }
                PrimaryAction::RequestRemoval {
                    replica,
                    generation,
                } => {
                    tracing::error!(volume = %self.volume, replica = replica.0, %generation,
                        "a replica did not answer in time: the primary completes nothing until the cluster removes it from the in-sync set (set_replication with a newer generation)");
                    self.shared.states.lock().insert(
                        replica,
                        ReplicaState::Failed {
                            reason: format!(
                                "it did not acknowledge a request within the timeout or refused one, in generation {generation}"
                            ),
                        },
                    );
                }
                PrimaryAction::RecordMissed { replica, region } => {
                    recorded.push((replica, region));
                    let missed = self.missed_dir.clone();
                    let file = self.missed_file(replica);
                    let line = format!("{} {}\n", region.offset, region.len);
                    let written =
                        tokio::task::spawn_blocking(move || append_synced(&missed, &file, &line))
                            .await;
                    if !matches!(written, Ok(Ok(()))) {
                        // Without the record, completing later writes could lose what the
                        // replica missed: stop completing anything.
                        tracing::error!(volume = %self.volume, replica = replica.0,
                            "could not record a missed region durably; the primary stops");
                        self.waiting.clear();
                        return;
                    }
                }
                PrimaryAction::ForgetMissed { replica } => {
                    self.shared.missed.lock().remove(&replica);
                    let file = self.missed_file(replica);
                    let _ = std::fs::remove_file(file);
                }
                PrimaryAction::Disconnect { replica, reason } => {
                    tracing::warn!(volume = %self.volume, replica = replica.0, reason, "closing a replica's stream");
                    self.links.remove(&replica);
                }
            }
        }
    }
}

/// Writes up to this size without FUA are applied on the driver's own task: they only
/// reach the page cache. Larger ones (checksumming takes a while), flushes and anything
/// with FUA go to the blocking pool.
pub(in super::super) const QUICK_WRITE_MAX: usize = 64 << 10;

/// The bytes a write, zeroes or trim changes: those may be applied alongside others.
fn concurrent_region(op: &Op) -> Option<tessera_replication::regions::Region> {
    match op {
        Op::Write { .. } | Op::WriteZeroes { .. } | Op::Trim { .. } => {
            tessera_replication::primary::op_region(op)
        }
        Op::Flush | Op::Snapshot { .. } | Op::Resize { .. } => None,
    }
}

/// True for an op cheap enough to run on an async worker (see [`QUICK_WRITE_MAX`]).
pub(in super::super) fn quick(op: &Op) -> bool {
    matches!(op, Op::Write { fua: false, data, .. } if data.len() <= QUICK_WRITE_MAX)
}

fn apply_local(
    export: &Export,
    op: Op,
    (store, volume): &(Store, String),
    taken: &super::super::snapshot::Taken,
) -> Result<(), ReplyError> {
    let r = match op {
        Op::Write { offset, fua, data } => export.write_owned(offset, data, fua),
        Op::WriteZeroes { offset, len } => export.write_zeroes(offset, len, false, false),
        Op::Trim { offset, len } => export.trim(offset, len, false),
        Op::Flush => export.flush(),
        // Flushed first, as on the replicas: the snapshot's content is durable.
        Op::Snapshot { name, size } => export
            .flush()
            .and_then(|()| super::super::snapshot::take(store, export, volume, &name, size, taken)),
        Op::Resize { size } => super::super::resize::grow(store, volume, size),
    };
    r.map_err(|e| reply_error(&e))
}
