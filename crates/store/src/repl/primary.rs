//! The primary's shell: a volume this store serves as primary forwards every write,
//! zeroes, trim and flush through `tessera-replication`'s `Primary` state machine to its
//! replicas over QUIC, and the NBD request is answered only when the machine completes
//! it (the local copy and every in-sync replica have it; for FLUSH/FUA, durably).
//!
//! One driver task per volume owns the machine and performs its actions in order. The
//! local copy is written in seq order, like the replicas', so every copy applies the
//! same stream. One link task per replica keeps a QUIC connection with one stream open,
//! reconnecting after a loss. A replica that does not answer within the replica timeout,
//! or refuses a request, makes the primary stop completing until the cluster takes it out
//! of the in-sync set; requests wait for that (the cluster wait) and only then fail with
//! EIO, never with an acknowledgement the replicas do not back. On a link's connection
//! the replica may open streams of its own: a repair of its copy's bad block
//! (`serve_replica.rs`).

mod driver;
mod link;
mod local;
mod members;
mod missed;
mod reconcile;
mod reconfigure;
mod repair;
mod serve_replica;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tessera_blockstore::Store;
use tessera_replication::primary::{Config, Primary, ReplicaId, RequestError, Timing};
use tessera_replication::replica::Op;
use tessera_replication::wire::{Generation, Message, VolumeName};
use tessera_store_admin::ReplicaState;
use tokio::sync::mpsc;

use super::catchup::{Missed, Shared};
use super::quic::ReplEndpoint;
use driver::Driver;
pub(super) use driver::QUICK_WRITE_MAX;
use link::link;
pub use members::Change;
use members::Members;
pub(super) use missed::append_synced as append_missed;
use missed::{append_synced, load_missed, missed_path, whole};
pub(in crate::repl) use reconcile::Asker;
pub use repair::RepairError;
pub(crate) use repair::Repairs;
pub(in crate::repl) use repair::{bad_blocks, check_reply};
use serve_replica::ServeReplicas;

/// How often the driver gives the machine the time (timeouts, resends).
const TICK: Duration = Duration::from_millis(100);
/// Pause between attempts to reach a replica.
const RECONNECT: Duration = Duration::from_millis(300);
/// What a snapshot's admin call, and a reconfiguration, wait beyond the replica timeout.
const WAIT_MARGIN: Duration = Duration::from_secs(1);
/// How long, beyond the replica timeout, a request waits by default for the cluster to
/// take a failed replica out of the in-sync set before it fails: with tesserad's 10 s
/// replica timeout, 30 s in all, the VMM's own NBD request timeout.
pub const DEFAULT_CLUSTER_WAIT: Duration = Duration::from_secs(20);
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
    #[error("no completion within {0:?}: a replica failed and the cluster did not take it out of the in-sync set in that time")]
    TimedOut(Duration),
    /// The primary stopped (its role changed) before completing it.
    #[error("the volume's primary stopped")]
    Stopped,
}

/// Where a request's outcome goes: a blocked caller (admin calls) or an awaiting task
/// (NBD writes, which must not hold a thread while the replicas answer).
enum Done {
    Blocking(std::sync::mpsc::Sender<Result<(), ForwardError>>),
    Async(tokio::sync::oneshot::Sender<Result<(), ForwardError>>),
}

impl Done {
    fn send(self, result: Result<(), ForwardError>) {
        // A caller that gave up (timed out) no longer listens: nothing to tell.
        let _ = match self {
            Done::Blocking(tx) => tx.send(result).map_err(|_| ()),
            Done::Async(tx) => tx.send(result).map_err(|_| ()),
        };
    }
}

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
        /// Replicas added or dropped with this configuration.
        members: Members,
        done: std::sync::mpsc::Sender<Result<(), String>>,
    },
}

/// A running primary of one volume: where its NBD device submits requests.
pub struct PrimaryHandle {
    generation: std::sync::atomic::AtomicU64,
    /// Replica states, missed regions and catch-up counts, for `replication_status`.
    shared: Shared,
    tx: mpsc::UnboundedSender<Input>,
    /// What a client's request waits at most: the replica timeout and the cluster wait.
    wait: Duration,
    /// The replica timeout.
    timeout: Duration,
    /// The driver task.
    driver: tokio::task::JoinHandle<()>,
    /// Each replica's link task.
    links: parking_lot::Mutex<HashMap<ReplicaId, tokio::task::JoinHandle<()>>>,
    /// The replicas, in id order (ids are never reused: a replica added later gets the
    /// next one).
    peers: RwLock<Vec<(ReplicaId, Peer)>>,
    next_replica: std::sync::atomic::AtomicU64,
    ep: Arc<ReplEndpoint>,
    fenced: Arc<std::sync::atomic::AtomicU64>,
    /// Blocks of the local copy repaired from a replica (`repair.rs`), and of a
    /// replica's copy with this copy's bytes.
    pub(crate) repairs: repair::Repairs,
    /// What the links answer their replicas' repair streams with.
    serving: Arc<ServeReplicas>,
}

impl Drop for PrimaryHandle {
    fn drop(&mut self) {
        self.driver.abort();
        for t in self.links.lock().values() {
            t.abort();
        }
    }
}

impl PrimaryHandle {
    /// The generation it writes in.
    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Submits a client's `op` and waits (blocking) for its completion: at most the
    /// replica timeout and then the cluster wait, so a replica that failed and that the
    /// cluster takes out of the in-sync set in that time costs the client a delay, not
    /// an error.
    pub fn submit(&self, op: Op) -> Result<(), ForwardError> {
        self.submit_within(op, self.wait)
    }

    /// What an admin call through the stream (a snapshot) waits: the replica timeout and
    /// a margin, not the cluster wait (its caller has its own timeout).
    pub fn admin_wait(&self) -> Duration {
        self.timeout + WAIT_MARGIN
    }

    /// Submits `op` and waits (blocking) at most `bound` for its completion.
    pub fn submit_within(&self, op: Op, bound: Duration) -> Result<(), ForwardError> {
        let (done, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Input::Request {
                op,
                done: Done::Blocking(done),
            })
            .map_err(|_| ForwardError::Stopped)?;
        let wait = || match rx.recv_timeout(bound) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(ForwardError::TimedOut(bound)),
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

    /// Submits a client's `op` and awaits its completion (at most the replica timeout and
    /// the cluster wait, as [`PrimaryHandle::submit`]) without holding a thread: the NBD
    /// server keeps reading the client's next requests meanwhile, so they pipeline.
    pub fn submit_async(
        &self,
        op: Op,
    ) -> impl std::future::Future<Output = Result<(), ForwardError>> + Send + 'static {
        let (done, rx) = tokio::sync::oneshot::channel();
        let sent = self.tx.send(Input::Request {
            op,
            done: Done::Async(done),
        });
        let bound = self.wait;
        async move {
            sent.map_err(|_| ForwardError::Stopped)?;
            match tokio::time::timeout(bound, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(ForwardError::Stopped),
                Err(_) => Err(ForwardError::TimedOut(bound)),
            }
        }
    }

    /// Gives the machine the next configuration (a newer generation, another in-sync
    /// set, replicas to catch up). A replica joining the in-sync set gets its last
    /// catch-up pass first, while requests wait. Blocking.
    fn reconfigure(
        &self,
        config: Config,
        catching_up: BTreeSet<ReplicaId>,
        members: Members,
    ) -> Result<(), String> {
        let (done, rx) = std::sync::mpsc::channel();
        let generation = config.generation.0;
        self.tx
            .send(Input::Reconfigure {
                config,
                catching_up,
                members,
                done,
            })
            .map_err(|_| "the primary stopped".to_string())?;
        rx.recv_timeout(self.timeout + WAIT_MARGIN + FINAL_WAIT)
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
            .read()
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
        self.peers.read().iter().map(|(r, _)| *r).collect()
    }

    /// The node of replica `r`, if it is one of this primary's.
    pub fn node_of(&self, r: ReplicaId) -> Option<String> {
        self.peers
            .read()
            .iter()
            .find(|(id, _)| *id == r)
            .map(|(_, p)| p.node.clone())
    }

    /// The replica id of node `node`, if it is one of this primary's.
    pub fn replica_of(&self, node: &str) -> Option<ReplicaId> {
        self.peers
            .read()
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
    /// Of `catching_up`, the nodes whose copy is new: compared over the whole volume.
    pub rebuilding: Vec<String>,
    /// Out-of-sync replicas not caught up now: what they miss is recorded.
    pub out_of_sync: Vec<Peer>,
    /// Catch-up bytes per second per replica (`None`: unbounded).
    pub rate: Option<u64>,
    /// How long a replica may leave a request unanswered.
    pub timeout: Duration,
    /// How long beyond `timeout` a client's request waits for the cluster's answer to a
    /// failed replica.
    pub cluster_wait: Duration,
    /// Snapshots taken from write streams on this store.
    pub taken: super::snapshot::Taken,
    /// Fewer than 2 copies in sync allowed (the cluster's audited operator override).
    pub operator_override: bool,
    /// The last changes applied to each copy on this store.
    pub recent: super::recent::Recent,
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
            rebuilding,
            out_of_sync,
            rate,
            timeout,
            cluster_wait,
            taken,
            operator_override,
            recent,
        } = spec;
        let volume = volume.as_str();
        let name = VolumeName::new(volume).map_err(|e| e.to_string())?;
        let export = store.open_export(volume).map_err(|e| e.to_string())?;
        export.bind_generation(generation);
        // Ids in order: the in-sync replicas, those to catch up, the others out of sync.
        let counts = (peers.len(), catching_up.len());
        let peers: Vec<(ReplicaId, Peer)> = peers
            .into_iter()
            .chain(catching_up)
            .chain(out_of_sync)
            .enumerate()
            .map(|(i, p)| (ReplicaId(i as u64 + 1), p))
            .collect();
        let ids: Vec<ReplicaId> = peers.iter().map(|(r, _)| *r).collect();
        let in_sync = &ids[..counts.0];
        let catching = &ids[counts.0..counts.0 + counts.1];
        let lagging = &ids[counts.0..];
        let config = Config {
            generation: Generation(generation),
            replica_count: (peers.len() + 1).min(3) as u8,
            in_sync: in_sync.iter().copied().collect(),
            out_of_sync: lagging.iter().copied().collect(),
            operator_override,
        };
        let timing = Timing {
            replica_timeout: timeout,
            retransmit_after: (timeout / 4).max(Duration::from_millis(100)),
        };
        let machine =
            Primary::new(name.clone(), export.size(), config, timing).map_err(|e| e.to_string())?;
        let shared = Shared::default();
        let repairs = shared.repairs.clone();
        for r in in_sync {
            shared.states.lock().insert(*r, ReplicaState::InSync {});
        }
        let nodes: HashMap<ReplicaId, String> =
            peers.iter().map(|(r, p)| (*r, p.node.clone())).collect();
        // What the out-of-sync replicas missed, from the durable records; a replica
        // without one (new, or its record lost) is compared over the whole volume, and so
        // is a new copy (`rebuilding`), whatever was recorded for its node before.
        for r in lagging {
            shared.states.lock().insert(*r, ReplicaState::OutOfSync {});
            let file = missed_path(&missed_dir, volume, &nodes[r]);
            let fresh = catching.contains(r) && rebuilding.contains(&nodes[r]);
            let recorded = match load_missed(&file).filter(|_| !fresh) {
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
        let serving = ServeReplicas::new(store.clone(), name.clone());
        let mut links = HashMap::new();
        let mut restarts = HashMap::new();
        for (r, p) in &peers {
            let restart = Arc::new(tokio::sync::Notify::new());
            restarts.insert(*r, restart.clone());
            links.insert(
                *r,
                tokio::spawn(link(
                    ep.clone(),
                    *r,
                    p.clone(),
                    tx.clone(),
                    restart,
                    serving.clone(),
                )),
            );
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
            ep: ep.clone(),
            name,
            peers: peers.iter().cloned().collect(),
            catchups: HashMap::new(),
            rate,
            fenced: fenced.clone(),
            restarts,
            recent,
            held: std::collections::VecDeque::new(),
            reconcile_first: Some((peers[..counts.0].to_vec(), timeout + WAIT_MARGIN)),
            local: local::Local::default(),
        };
        driver.catch_up(&catching.iter().copied().collect());
        let driver = tokio::spawn(driver.run(rx));
        let handle = Arc::new(PrimaryHandle {
            generation: std::sync::atomic::AtomicU64::new(generation),
            shared,
            tx,
            wait: timeout + cluster_wait,
            timeout,
            driver,
            links: parking_lot::Mutex::new(links),
            next_replica: std::sync::atomic::AtomicU64::new(peers.len() as u64 + 1),
            peers: RwLock::new(peers),
            ep,
            fenced,
            repairs,
            serving: serving.clone(),
        });
        // Set once: `serving` is new here.
        let _ = serving.handle.set(Arc::downgrade(&handle));
        tracing::info!(volume, generation, replicas = ?handle.peers.read().iter().map(|(_, p)| p.node.clone()).collect::<Vec<_>>(),
            "serving as the volume's primary");
        self.by_volume
            .write()
            .insert(volume.to_string(), handle.clone());
        Ok(handle)
    }
}
