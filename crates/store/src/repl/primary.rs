//! The primary's shell: a volume this store serves as primary forwards every write,
//! zeroes, trim and flush through `tessera-replication`'s `Primary` state machine to its
//! replicas over QUIC, and the NBD request is answered only when the machine completes
//! it (the local copy and every in-sync replica have it; for FLUSH/FUA, durably).
//!
//! One driver task per volume owns the machine and performs its actions in order. The
//! local copy is written in seq order, like the replicas', so every copy applies the
//! same stream. One link task per replica keeps a QUIC connection with one stream open,
//! reconnecting after a loss. A request not completed within the replica timeout plus a
//! margin fails with EIO: with no cluster to remove a silent replica from the in-sync
//! set (a later slice), the primary stops completing and its clients get errors, never
//! an acknowledgement the replicas do not back.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tessera_blockstore::{Export, Store};
use tessera_replication::primary::{
    Config, Primary, PrimaryAction, PrimaryInput, ReplicaId, RequestError, RequestId, Timing,
};
use tessera_replication::regions::{Region, RegionSet};
use tessera_replication::replica::Op;
use tessera_replication::wire::{self, Decoder, Generation, Message, ReplyError, VolumeName};
use tessera_store_admin::ReplicaState;
use tokio::sync::mpsc;

use super::catchup::{CatchUp, Final, Missed, Shared};
use super::quic::ReplEndpoint;
use super::replica::reply_error;

/// How often the driver gives the machine the time (timeouts, resends).
const TICK: Duration = Duration::from_millis(100);
/// Pause between attempts to reach a replica.
const RECONNECT: Duration = Duration::from_millis(300);
/// What a client waits beyond the replica timeout before its request fails.
const WAIT_MARGIN: Duration = Duration::from_secs(1);
/// Longest a replica's last catch-up pass may hold requests before it rejoins.
const FINAL_WAIT: Duration = Duration::from_secs(30);

/// A replica as the primary knows it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Node id (its certificate's name).
    pub node: String,
    /// Replication address.
    pub addr: SocketAddr,
}

/// Why a replicated request failed, for the NBD reply.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The state machine refused or failed it.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// No completion within the bound.
    #[error("no completion within {0:?}: a replica did not answer (it is not removed from the in-sync set automatically yet)")]
    TimedOut(Duration),
    /// The primary stopped (its role changed) before completing it.
    #[error("the volume's primary stopped")]
    Stopped,
}

type Done = std::sync::mpsc::Sender<Result<(), ForwardError>>;

enum Input {
    Request {
        op: Op,
        done: Done,
    },
    Connected {
        from: ReplicaId,
        tx: mpsc::UnboundedSender<Vec<u8>>,
    },
    Disconnected {
        from: ReplicaId,
    },
    Received {
        from: ReplicaId,
        msg: Message,
    },
    Reconfigure {
        config: Config,
        /// The out-of-sync replicas to catch up in the background.
        catching_up: BTreeSet<ReplicaId>,
        done: std::sync::mpsc::Sender<Result<(), String>>,
    },
}

/// A running primary of one volume: where its NBD device submits requests.
pub struct PrimaryHandle {
    generation: std::sync::atomic::AtomicU64,
    /// Replica states, missed regions and catch-up counts, for `replication_status`.
    shared: Shared,
    tx: mpsc::UnboundedSender<Input>,
    wait: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    peers: Vec<(ReplicaId, Peer)>,
    fenced: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for PrimaryHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl PrimaryHandle {
    /// The generation it writes in.
    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Submits `op` and waits (blocking) for its completion, at most the bound.
    pub fn submit(&self, op: Op) -> Result<(), ForwardError> {
        let (done, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Input::Request { op, done })
            .map_err(|_| ForwardError::Stopped)?;
        let wait = || match rx.recv_timeout(self.wait) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(ForwardError::TimedOut(self.wait))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ForwardError::Stopped),
        };
        // The NBD server calls small writes on its async workers: let the runtime move
        // its other tasks (this driver's among them) elsewhere while this one waits.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    /// Gives the machine the next configuration (a newer generation, another in-sync
    /// set, replicas to catch up). A replica joining the in-sync set gets its last
    /// catch-up pass first, while requests wait. Blocking.
    pub fn reconfigure(
        &self,
        config: Config,
        catching_up: BTreeSet<ReplicaId>,
    ) -> Result<(), String> {
        let (done, rx) = std::sync::mpsc::channel();
        let generation = config.generation.0;
        self.tx
            .send(Input::Reconfigure {
                config,
                catching_up,
                done,
            })
            .map_err(|_| "the primary stopped".to_string())?;
        rx.recv_timeout(self.wait + FINAL_WAIT)
            .map_err(|_| "the primary did not take the configuration".to_string())??;
        self.generation
            .store(generation, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Each replica's node, address, state, missed bytes and catch-up (data, UDP)
    /// bytes sent, in id order.
    pub fn replica_states(&self) -> Vec<(Peer, ReplicaState, u64, (u64, u64))> {
        let states = self.shared.states.lock();
        let missed = self.shared.missed.lock();
        let counters = self.shared.counters.lock();
        self.peers
            .iter()
            .map(|(r, p)| {
                let state = states.get(r).cloned().unwrap_or(ReplicaState::OutOfSync {});
                let bytes = missed.get(r).map_or(0, Missed::bytes);
                let sent = counters.get(r).copied().unwrap_or_default();
                (p.clone(), state, bytes, sent)
            })
            .collect()
    }

    /// True once a replica answered with a newer generation: the generation it named.
    pub fn fenced_by(&self) -> Option<u64> {
        match self.fenced.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            g => Some(g),
        }
    }

    /// The ids of every replica it was started with.
    pub fn replica_ids(&self) -> std::collections::BTreeSet<ReplicaId> {
        self.peers.iter().map(|(r, _)| *r).collect()
    }

    /// The node of replica `r`, if it is one of this primary's.
    pub fn node_of(&self, r: ReplicaId) -> Option<String> {
        self.peers
            .iter()
            .find(|(id, _)| *id == r)
            .map(|(_, p)| p.node.clone())
    }

    /// The replica id of node `node`, if it is one of this primary's.
    pub fn replica_of(&self, node: &str) -> Option<ReplicaId> {
        self.peers
            .iter()
            .find(|(_, p)| p.node == node)
            .map(|(r, _)| *r)
    }
}

/// What a primary is started with.
pub struct PrimarySpec {
    /// The volume.
    pub volume: String,
    /// The generation it writes in (the local copy's already).
    pub generation: u64,
    /// Its in-sync replicas.
    pub peers: Vec<Peer>,
    /// Out-of-sync replicas to catch up.
    pub catching_up: Vec<Peer>,
    /// Catch-up bytes per second per replica (`None`: unbounded).
    pub rate: Option<u64>,
    /// How long a replica may leave a request unanswered.
    pub timeout: Duration,
    /// Snapshots taken from write streams on this store.
    pub taken: super::snapshot::Taken,
    /// Fewer than 2 copies in sync allowed (the cluster's audited operator override).
    pub operator_override: bool,
}

/// The primaries this store runs, by volume.
#[derive(Default)]
pub struct Primaries {
    by_volume: RwLock<HashMap<String, Arc<PrimaryHandle>>>,
}

impl Primaries {
    /// The primary of `volume`, if this store is it.
    pub fn get(&self, volume: &str) -> Option<Arc<PrimaryHandle>> {
        self.by_volume.read().get(volume).cloned()
    }

    /// Every primary, by volume.
    pub fn all(&self) -> Vec<(String, Arc<PrimaryHandle>)> {
        self.by_volume
            .read()
            .iter()
            .map(|(v, p)| (v.clone(), p.clone()))
            .collect()
    }

    /// Stops being the primary of `volume`: its pending requests fail.
    pub fn stop(&self, volume: &str) {
        self.by_volume.write().remove(volume);
    }

    /// Starts the primary of `volume` in `generation` with `peers` in sync. The local
    /// copy must be at that generation already. Must run inside the tokio runtime.
    pub fn start(
        &self,
        ep: Arc<ReplEndpoint>,
        store: &Store,
        spec: PrimarySpec,
        missed_dir: PathBuf,
    ) -> Result<Arc<PrimaryHandle>, String> {
        let PrimarySpec {
            volume,
            generation,
            peers,
            catching_up,
            rate,
            timeout,
            taken,
            operator_override,
        } = spec;
        let in_sync_count = peers.len();
        let volume = volume.as_str();
        let name = VolumeName::new(volume).map_err(|e| e.to_string())?;
        let export = store.open_export(volume).map_err(|e| e.to_string())?;
        export.bind_generation(generation);
        let peers: Vec<(ReplicaId, Peer)> = peers
            .into_iter()
            .chain(catching_up)
            .enumerate()
            .map(|(i, p)| (ReplicaId(i as u64 + 1), p))
            .collect();
        let (in_sync, catching): (Vec<_>, Vec<_>) = peers
            .iter()
            .map(|(r, _)| *r)
            .partition(|r| r.0 as usize <= in_sync_count);
        let config = Config {
            generation: Generation(generation),
            replica_count: (peers.len() + 1).min(3) as u8,
            in_sync: in_sync.iter().copied().collect(),
            out_of_sync: catching.iter().copied().collect(),
            operator_override,
        };
        let timing = Timing {
            replica_timeout: timeout,
            retransmit_after: (timeout / 4).max(Duration::from_millis(100)),
        };
        let machine =
            Primary::new(name.clone(), export.size(), config, timing).map_err(|e| e.to_string())?;
        let shared = Shared::default();
        for r in &in_sync {
            shared.states.lock().insert(*r, ReplicaState::InSync {});
        }
        let nodes: HashMap<ReplicaId, String> =
            peers.iter().map(|(r, p)| (*r, p.node.clone())).collect();
        // What the catching-up replicas missed, from the durable records; a replica
        // without one (new, or its record lost) is compared over the whole volume.
        for r in &catching {
            shared.states.lock().insert(*r, ReplicaState::OutOfSync {});
            let file = missed_path(&missed_dir, volume, &nodes[r]);
            let recorded = match load_missed(&file) {
                Some(set) => set,
                None => {
                    // Recorded as such, so a restart of this primary does not take the
                    // later writes' record for all the replica lacks.
                    let line = format!("0 {}\n", export.size());
                    append_synced(&missed_dir, &file, &line)
                        .map_err(|e| format!("recording {}: {e}", file.display()))?;
                    whole(export.size())
                }
            };
            shared.missed.lock().entry(*r).or_default().recorded = recorded;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        let mut restarts = HashMap::new();
        for (r, p) in &peers {
            let restart = Arc::new(tokio::sync::Notify::new());
            restarts.insert(*r, restart.clone());
            tasks.push(tokio::spawn(link(
                ep.clone(),
                *r,
                p.clone(),
                tx.clone(),
                restart,
            )));
        }
        let fenced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut driver = Driver {
            machine,
            export: Arc::new(export),
            store: store.clone(),
            taken,
            volume: volume.to_string(),
            start: Instant::now(),
            next_id: 1,
            waiting: HashMap::new(),
            links: HashMap::new(),
            missed_dir,
            shared: shared.clone(),
            nodes,
            ep,
            name,
            peers: peers.iter().cloned().collect(),
            catchups: HashMap::new(),
            rate,
            fenced: fenced.clone(),
            restarts,
        };
        driver.catch_up(&catching.into_iter().collect());
        tasks.push(tokio::spawn(driver.run(rx)));
        let handle = Arc::new(PrimaryHandle {
            generation: std::sync::atomic::AtomicU64::new(generation),
            shared,
            tx,
            wait: timeout + WAIT_MARGIN,
            tasks,
            peers,
            fenced,
        });
        tracing::info!(volume, generation, replicas = ?handle.peers.iter().map(|(_, p)| &p.node).collect::<Vec<_>>(),
            "serving as the volume's primary");
        self.by_volume
            .write()
            .insert(volume.to_string(), handle.clone());
        Ok(handle)
    }
}

struct Driver {
    machine: Primary,
    export: Arc<Export>,
    store: Store,
    /// Snapshots taken from write streams on this store.
    taken: super::snapshot::Taken,
    volume: String,
    start: Instant,
    next_id: u64,
    waiting: HashMap<RequestId, Done>,
    links: HashMap<ReplicaId, mpsc::UnboundedSender<Vec<u8>>>,
    missed_dir: PathBuf,
    shared: Shared,
    nodes: HashMap<ReplicaId, String>,
    ep: Arc<ReplEndpoint>,
    name: VolumeName,
    peers: HashMap<ReplicaId, Peer>,
    /// Running catch-ups: the task and where to ask for its final pass.
    catchups: HashMap<ReplicaId, (tokio::task::JoinHandle<()>, mpsc::UnboundedSender<Final>)>,
    rate: Option<u64>,
    fenced: Arc<std::sync::atomic::AtomicU64>,
    /// Per replica: makes its link open a new stream.
    restarts: HashMap<ReplicaId, Arc<tokio::sync::Notify>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        for (t, _) in self.catchups.values() {
            t.abort();
        }
    }
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let actions = tokio::select! {
                input = rx.recv() => match input {
                    None => return,
                    Some(Input::Reconfigure { config, catching_up, done }) => {
                        self.reconfigure(config, catching_up, done).await
                    }
                    Some(i) => self.input(i),
                },
                _ = tick.tick() => self.machine.handle(self.start.elapsed(), PrimaryInput::Tick),
            };
            self.perform(actions).await;
            if let Some(current) = self.fenced_generation() {
                self.fenced
                    .store(current, std::sync::atomic::Ordering::Release);
            }
        }
    }

    fn input(&mut self, input: Input) -> Vec<PrimaryAction> {
        let now = self.start.elapsed();
        match input {
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
    async fn perform(&mut self, actions: Vec<PrimaryAction>) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                PrimaryAction::ApplyLocal { id, op } => {
                    let export = self.export.clone();
                    let local = (self.store.clone(), self.volume.clone());
                    let taken = self.taken.clone();
                    let result = tokio::task::spawn_blocking(move || {
                        apply_local(&export, op, &local, &taken)
                    })
                    .await
                    .unwrap_or_else(|e| Err(ReplyError::Io(e.to_string())));
                    let more = self
                        .machine
                        .handle(self.start.elapsed(), PrimaryInput::LocalDone { id, result });
                    for (i, a) in more.into_iter().enumerate() {
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
                        let _ = done.send(result.map_err(ForwardError::Request));
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
                    self.shared
                        .missed
                        .lock()
                        .entry(replica)
                        .or_default()
                        .recorded
                        .insert(region);
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

impl Driver {
    fn missed_file(&self, replica: ReplicaId) -> PathBuf {
        let node = self.nodes.get(&replica).map_or("unknown", String::as_str);
        missed_path(&self.missed_dir, &self.volume, node)
    }

    fn fenced_generation(&self) -> Option<u64> {
        self.machine.fenced_by().map(|g| g.0)
    }

    /// Takes the next configuration. Replicas joining the in-sync set get their last
    /// catch-up pass first; no request is taken meanwhile, so nothing they lack remains.
    async fn reconfigure(
        &mut self,
        config: Config,
        catching_up: BTreeSet<ReplicaId>,
        done: std::sync::mpsc::Sender<Result<(), String>>,
    ) -> Vec<PrimaryAction> {
        let joining: Vec<ReplicaId> = config
            .in_sync
            .difference(&self.machine.config().in_sync)
            .copied()
            .collect();
        for r in &joining {
            if let Err(e) = self.last_pass(*r).await {
                let _ = done.send(Err(e));
                return Vec::new();
            }
        }
        let (in_sync, out_of_sync) = (config.in_sync.clone(), config.out_of_sync.clone());
        let generation = config.generation.0;
        let now = self.start.elapsed();
        match self.machine.reconfigure(now, config) {
            Ok(actions) => {
                // The local copy is fenced like a replica: it takes this primary's writes
                // only while no newer generation than the primary's own was accepted.
                self.export.bind_generation(generation);
                {
                    let mut states = self.shared.states.lock();
                    for r in &in_sync {
                        states.insert(*r, ReplicaState::InSync {});
                    }
                    for r in &out_of_sync {
                        states.insert(*r, ReplicaState::OutOfSync {});
                    }
                }
                // A joining replica gets a new stream (the old one may be dead: a replica
                // killed without closing leaves it until QUIC's idle timeout); once it is
                // up the machine fences the replica and sends what is pending.
                for r in &joining {
                    self.links.remove(r);
                    if let Some(n) = self.restarts.get(r) {
                        n.notify_one();
                    }
                }
                // Newly out of sync: an empty record now, so a later catch-up examines
                // what it missed, not the whole volume.
                for r in &out_of_sync {
                    let fresh = !self.shared.missed.lock().contains_key(r);
                    if fresh {
                        self.shared.missed.lock().entry(*r).or_default();
                        let (dir, file) = (self.missed_dir.clone(), self.missed_file(*r));
                        let _ = tokio::task::spawn_blocking(move || append_synced(&dir, &file, ""))
                            .await;
                    }
                }
                self.catch_up(&catching_up);
                let _ = done.send(Ok(()));
                actions
            }
            Err(e) => {
                let _ = done.send(Err(e.to_string()));
                Vec::new()
            }
        }
    }

    /// Runs replica `r`'s final catch-up pass; a replica that missed something and has
    /// no catch-up running cannot join.
    async fn last_pass(&mut self, r: ReplicaId) -> Result<(), String> {
        let node = self.nodes.get(&r).cloned().unwrap_or_default();
        let Some((task, ctl)) = self.catchups.remove(&r) else {
            let missed = self.shared.missed.lock().get(&r).map_or(0, Missed::bytes);
            if missed > 0 {
                return Err(format!(
                    "replica {node} missed {missed} bytes and is not being caught up: list it in catching_up first"
                ));
            }
            return Ok(());
        };
        let (done, rx) = tokio::sync::oneshot::channel();
        let asked = ctl.send(Final { done }).is_ok();
        let outcome = match tokio::time::timeout(FINAL_WAIT, rx).await {
            Ok(Ok(r)) if asked => r,
            Ok(_) => Err(format!("the catch-up of replica {node} stopped")),
            Err(_) => Err(format!(
                "the last catch-up pass of replica {node} took more than {FINAL_WAIT:?}"
            )),
        };
        if outcome.is_err() {
            task.abort();
            self.shared.missed.lock().entry(r).or_default().give_back();
        }
        outcome
    }

    /// Catches up exactly the replicas in `catching` (in the current generation): the
    /// others' catch-ups stop, these start again.
    fn catch_up(&mut self, catching: &BTreeSet<ReplicaId>) {
        for (r, (task, _)) in self.catchups.drain() {
            task.abort();
            if let Some(m) = self.shared.missed.lock().get_mut(&r) {
                m.give_back();
            }
        }
        for r in catching {
            let Some(peer) = self.peers.get(r).cloned() else {
                continue;
            };
            let (ctl, rx) = mpsc::unbounded_channel();
            let task = CatchUp {
                ep: self.ep.clone(),
                replica: *r,
                peer,
                volume: self.name.clone(),
                generation: self.machine.generation().0,
                export: self.export.clone(),
                shared: self.shared.clone(),
                rate: self.rate,
            };
            self.catchups.insert(*r, (tokio::spawn(task.run(rx)), ctl));
        }
    }
}

/// `<data-dir>/replication/<volume>.<node>.missed`: by node id, which outlives a
/// primary (replica ids are positions in one configuration).
fn missed_path(dir: &std::path::Path, volume: &str, node: &str) -> PathBuf {
    dir.join(format!("{volume}.{node}.missed"))
}

/// A missed-region record (`offset len` lines); `None` when there is none. A line
/// that does not parse (a torn append) is skipped: the region it belonged to was not
/// acknowledged to anyone, since completions wait for the record to be synced.
fn load_missed(file: &std::path::Path) -> Option<RegionSet> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut set = RegionSet::new();
    for line in text.lines() {
        let mut it = line.split(' ').map(str::parse::<u64>);
        if let (Some(Ok(offset)), Some(Ok(len)), None) = (it.next(), it.next(), it.next()) {
            set.insert(Region { offset, len });
        }
    }
    Some(set)
}

/// The whole volume as one region.
fn whole(size: u64) -> RegionSet {
    let mut set = RegionSet::new();
    set.insert(Region {
        offset: 0,
        len: size,
    });
    set
}

fn apply_local(
    export: &Export,
    op: Op,
    (store, volume): &(Store, String),
    taken: &super::snapshot::Taken,
) -> Result<(), ReplyError> {
    let r = match op {
        Op::Write { offset, fua, data } => export.write_owned(offset, data, fua),
        Op::WriteZeroes { offset, len } => export.write_zeroes(offset, len, false, false),
        Op::Trim { offset, len } => export.trim(offset, len, false),
        Op::Flush => export.flush(),
        // Flushed first, as on the replicas: the snapshot's content is durable.
        Op::Snapshot { name } => export
            .flush()
            .and_then(|()| super::snapshot::take(store, volume, &name, taken)),
    };
    r.map_err(|e| reply_error(&e))
}

fn append_synced(dir: &std::path::Path, file: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    f.write_all(line.as_bytes())?;
    f.sync_data()
}

/// Keeps one stream to replica `r` open, feeding what it reads to the driver and
/// writing what the driver sends; reconnects after a loss.
async fn link(
    ep: Arc<ReplEndpoint>,
    r: ReplicaId,
    peer: Peer,
    driver: mpsc::UnboundedSender<Input>,
    restart: Arc<tokio::sync::Notify>,
) {
    let mut told = String::new();
    loop {
        let stream = match ep.connect(&peer.node, peer.addr).await {
            Ok(conn) => match conn.open_bi().await {
                Ok(s) => Ok((conn, s)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let (conn, (mut send, mut recv)) = match stream {
            Ok(s) => s,
            Err(e) => {
                if e != told {
                    tracing::warn!(node = %peer.node, addr = %peer.addr, error = %e, "cannot reach a replica; retrying");
                    told = e;
                }
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        told.clear();
        tracing::info!(node = %peer.node, addr = %peer.addr, "replica connected");
        let (tx, mut frames) = mpsc::unbounded_channel::<Vec<u8>>();
        if driver.send(Input::Connected { from: r, tx }).is_err() {
            return;
        }
        let writer = tokio::spawn(async move {
            while let Some(f) = frames.recv().await {
                if send.write_all(&f).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 256 << 10];
        let why = 'read: loop {
            loop {
                match decoder.next_message() {
                    Ok(Some(msg)) => {
                        if driver.send(Input::Received { from: r, msg }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => break 'read format!("bad frame from the replica: {e}"),
                }
            }
            let want = decoder.wants().clamp(1, buf.len());
            let read = tokio::select! {
                read = recv.read(&mut buf[..want]) => read,
                _ = restart.notified() => break "a new stream for the replica's rejoin".to_string(),
            };
            match read {
                Ok(Some(n)) => {
                    if let Err(e) = decoder.push(&buf[..n]) {
                        break format!("bad frame from the replica: {e}");
                    }
                }
                Ok(None) => break "the replica ended the stream".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        writer.abort();
        conn.close(0u32.into(), b"stream lost");
        tracing::warn!(node = %peer.node, reason = %why, "replica stream lost");
        if driver.send(Input::Disconnected { from: r }).is_err() {
            return;
        }
        tokio::time::sleep(RECONNECT).await;
    }
}
