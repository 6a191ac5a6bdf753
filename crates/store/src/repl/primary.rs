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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tessera_blockstore::{Export, Store};
use tessera_replication::primary::{
    Config, Primary, PrimaryAction, PrimaryInput, ReplicaId, RequestError, RequestId, Timing,
};
use tessera_replication::replica::Op;
use tessera_replication::wire::{self, Decoder, Generation, Message, ReplyError, VolumeName};
use tessera_store_admin::ReplicaState;
use tokio::sync::mpsc;

use super::quic::ReplEndpoint;
use super::replica::reply_error;

/// How often the driver gives the machine the time (timeouts, resends).
const TICK: Duration = Duration::from_millis(100);
/// Pause between attempts to reach a replica.
const RECONNECT: Duration = Duration::from_millis(300);
/// What a client waits beyond the replica timeout before its request fails.
const WAIT_MARGIN: Duration = Duration::from_secs(1);

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
        done: std::sync::mpsc::Sender<Result<(), String>>,
    },
}

/// A running primary of one volume: where its NBD device submits requests.
pub struct PrimaryHandle {
    generation: std::sync::atomic::AtomicU64,
    /// Each replica's state as the driver last saw it, for `replication_status`.
    states: Arc<parking_lot::Mutex<HashMap<ReplicaId, ReplicaState>>>,
    tx: mpsc::UnboundedSender<Input>,
    wait: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    peers: Vec<(ReplicaId, Peer)>,
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
    /// set). Blocking.
    pub fn reconfigure(&self, config: Config) -> Result<(), String> {
        let (done, rx) = std::sync::mpsc::channel();
        let generation = config.generation.0;
        self.tx
            .send(Input::Reconfigure { config, done })
            .map_err(|_| "the primary stopped".to_string())?;
        rx.recv_timeout(self.wait)
            .map_err(|_| "the primary did not take the configuration".to_string())??;
        self.generation
            .store(generation, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Each replica's node, address and state, in id order.
    pub fn replica_states(&self) -> Vec<(Peer, ReplicaState)> {
        let states = self.states.lock();
        self.peers
            .iter()
            .map(|(r, p)| {
                let state = states.get(r).cloned().unwrap_or(ReplicaState::OutOfSync {});
                (p.clone(), state)
            })
            .collect()
    }

    /// The ids of every replica it was started with.
    pub fn replica_ids(&self) -> std::collections::BTreeSet<ReplicaId> {
        self.peers.iter().map(|(r, _)| *r).collect()
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
    /// How long a replica may leave a request unanswered.
    pub timeout: Duration,
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
            timeout,
        } = spec;
        let volume = volume.as_str();
        let name = VolumeName::new(volume).map_err(|e| e.to_string())?;
        let export = store.open_export(volume).map_err(|e| e.to_string())?;
        export.bind_generation(generation);
        let peers: Vec<(ReplicaId, Peer)> = peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| (ReplicaId(i as u64 + 1), p))
            .collect();
        let config = Config {
            generation: Generation(generation),
            replica_count: (peers.len() + 1).min(u8::MAX as usize) as u8,
            in_sync: peers.iter().map(|(r, _)| *r).collect(),
            out_of_sync: Default::default(),
            operator_override: false,
        };
        let timing = Timing {
            replica_timeout: timeout,
            retransmit_after: (timeout / 4).max(Duration::from_millis(100)),
        };
        let machine =
            Primary::new(name.clone(), export.size(), config, timing).map_err(|e| e.to_string())?;
        let states = Arc::new(parking_lot::Mutex::new(
            peers
                .iter()
                .map(|(r, _)| (*r, ReplicaState::InSync {}))
                .collect::<HashMap<_, _>>(),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (r, p) in &peers {
            tasks.push(tokio::spawn(link(ep.clone(), *r, p.clone(), tx.clone())));
        }
        let driver = Driver {
            machine,
            export: Arc::new(export),
            volume: volume.to_string(),
            start: Instant::now(),
            next_id: 1,
            waiting: HashMap::new(),
            links: HashMap::new(),
            missed_dir,
            states: states.clone(),
        };
        tasks.push(tokio::spawn(driver.run(rx)));
        let handle = Arc::new(PrimaryHandle {
            generation: std::sync::atomic::AtomicU64::new(generation),
            states,
            tx,
            wait: timeout + WAIT_MARGIN,
            tasks,
            peers,
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
    volume: String,
    start: Instant,
    next_id: u64,
    waiting: HashMap<RequestId, Done>,
    links: HashMap<ReplicaId, mpsc::UnboundedSender<Vec<u8>>>,
    missed_dir: PathBuf,
    states: Arc<parking_lot::Mutex<HashMap<ReplicaId, ReplicaState>>>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let actions = tokio::select! {
                input = rx.recv() => match input {
                    None => return,
                    Some(i) => self.input(i),
                },
                _ = tick.tick() => self.machine.handle(self.start.elapsed(), PrimaryInput::Tick),
            };
            self.perform(actions).await;
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
            Input::Reconfigure { config, done } => {
                // The local copy is fenced like a replica: it takes this primary's writes
                // only while no newer generation than the primary's own was accepted.
                let generation = config.generation.0;
                let (in_sync, out_of_sync) = (config.in_sync.clone(), config.out_of_sync.clone());
                match self.machine.reconfigure(now, config) {
                    Ok(actions) => {
                        self.export.bind_generation(generation);
                        let mut states = self.states.lock();
                        for r in in_sync {
                            states.insert(r, ReplicaState::InSync {});
                        }
                        for r in out_of_sync {
                            states.insert(r, ReplicaState::OutOfSync {});
                        }
                        drop(states);
                        let _ = done.send(Ok(()));
                        actions
                    }
                    Err(e) => {
                        let _ = done.send(Err(e.to_string()));
                        Vec::new()
                    }
                }
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
                    let result = tokio::task::spawn_blocking(move || apply_local(&export, op))
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
                    self.states.lock().insert(
                        replica,
                        ReplicaState::Failed {
                            reason: format!(
                                "it did not acknowledge a request within the timeout or refused one, in generation {generation}"
                            ),
                        },
                    );
                }
                PrimaryAction::RecordMissed { replica, region } => {
                    let missed = self.missed_dir.clone();
                    let file = missed.join(format!("{}.{}.missed", self.volume, replica.0));
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
                    let file = self
                        .missed_dir
                        .join(format!("{}.{}.missed", self.volume, replica.0));
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

fn apply_local(export: &Export, op: Op) -> Result<(), ReplyError> {
    let r = match op {
        Op::Write { offset, fua, data } => export.write_owned(offset, data, fua),
        Op::WriteZeroes { offset, len } => export.write_zeroes(offset, len, false, false),
        Op::Trim { offset, len } => export.trim(offset, len, false),
        Op::Flush => export.flush(),
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
            match recv.read(&mut buf[..want]).await {
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
