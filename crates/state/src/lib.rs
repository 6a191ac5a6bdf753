//! The cluster state, replicated by Raft (openraft 0.9): the durable log and vote in redb,
//! the state machine (tables of records) with snapshots, and the node-to-node transport.
//!
//! It stores and replicates; it does not decide what the records mean (the domain lives
//! in `tesserad`) nor who the members are (formation decides, then Raft membership
//! changes go through [`Node::raft`]).
//!
//! Modules, bottom up (each uses only those before it): [`types`] (commands, tables);
//! [`db`], [`log_store`], [`state_machine`] (storage); [`network`] (wire messages, join
//! authentication, the TLS transport and openraft's adapter over it); [`membership`]
//! (leader, join, removal); [`barrier`] (read index); `server` (answers peers); and
//! [`Node`] here, which starts them all.

#![forbid(unsafe_code)]

pub mod barrier;
pub mod ca_record;
pub mod db;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod once;
mod server;
pub mod state_machine;
pub mod types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft};

pub use barrier::BarrierError;
pub use db::DbError;
pub use membership::{LeaderError, MembershipError};
pub use network::TransportError;
pub use types::{Applied, Command, Require, Tables, TypeConfig};

type NodeId = u64;

/// How long one sending of a forwarded write waits for the leader's answer.
const FORWARD_TTL: Duration = Duration::from_secs(5);
/// How long a write whose answer was lost is sent again (from its first failure): a
/// leader's death is noticed within 1 s (the election timeout) and a new one elected in
/// about as much again.
pub const RESEND_FOR: Duration = Duration::from_secs(6);
/// The pause between two sendings.
const RESEND_PAUSE: Duration = Duration::from_millis(200);
/// How long a read barrier, or a write nothing of which has left the node yet, waits for
/// a leader when none is known or the one known does not answer: an election (the old
/// leader's death noticed, a new one voted in) takes about 1-2 s, and a request that waits
/// it out is answered instead of refused. Without a quorum it fails after this long, well
/// inside a client's usual timeout.
pub const LEADER_WAIT: Duration = Duration::from_secs(3);

/// Whether a failed sending may have reached the leader (so that only sending it again
/// can tell what happened). A write refused before anything left this node (no leader
/// known) was not.
fn may_have_been_applied(e: &StateError) -> bool {
    !matches!(e, StateError::NoLeader(_)) && resendable(e)
}

/// Whether sending a write again can change the outcome: not when the request cannot be
/// made (encoding, this node's TLS) or the local Raft failed (stopping, fatal).
fn resendable(e: &StateError) -> bool {
    match e {
        StateError::NoLeader(_) => true,
        StateError::Forward(t) => !matches!(
            t,
            TransportError::Encode(_)
                | TransportError::Pki(_)
                | TransportError::ForgedAnswer { .. }
        ),
        _ => false,
    }
}

/// Why a node could not start, or could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database could not be opened or created.
    #[error("state database {}: {source}", path.display())]
    Db {
        /// The state directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: DbError,
    },
    /// The Raft configuration is invalid.
    #[error("raft: {0}")]
    Config(#[from] openraft::ConfigError),
    /// Raft refused to start.
    #[error("raft: {0}")]
    Start(Box<Fatal<NodeId>>),
    /// The RPC listener could not bind.
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// Founding the cluster failed.
    #[error("raft: {0}")]
    Initialize(Box<RaftError<NodeId, InitializeError<NodeId, BasicNode>>>),
    /// The leader did not apply the write.
    #[error("raft: {0}")]
    Write(Box<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>),
    /// No leader to take the write.
    #[error("raft: {0}")]
    NoLeader(LeaderError),
    /// Forwarding the write to the leader failed, or the leader refused it.
    #[error("raft: {0}")]
    Forward(#[source] TransportError),
    /// The leader applied the write (or named the index to read at) but this node did not
    /// catch up in time.
    #[error("raft: this node is lagging behind the leader")]
    Lagging,
    /// The read barrier failed.
    #[error("raft: {0}")]
    Barrier(#[from] BarrierError),
    /// A membership change was refused or failed.
    #[error("raft: {0}")]
    Membership(#[from] MembershipError),
}

impl StateError {
    fn db(path: &Path, source: impl Into<DbError>) -> StateError {
        StateError::Db {
            path: path.to_path_buf(),
            source: source.into(),
        }
    }
}

/// How long [`Node::shutdown`] waits for Raft's background tasks to let go of the
/// database.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// A running Raft member.
pub struct Node {
    /// This node's Raft id.
    pub id: u64,
    /// The Raft handle (writes, membership, metrics).
    pub raft: Raft<TypeConfig>,
    /// The local state machine (reads).
    pub state: state_machine::StateMachine,
    /// How it reaches other members.
    pub transport: network::Transport,
    ca: server::CaSlot,
    join_key: Option<[u8; 32]>,
    read_index: barrier::ReadIndex,
    write_ids: once::Ids,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Fires once the database is closed.
    db_closed: db::Closed,
}

impl Node {
    /// Opens the state in `dir/state.redb` and serves Raft RPCs on `addr`; join and
    /// enrollment requests signed with `join_key` are accepted. With `tls`, all traffic to
    /// and from other members is mutual TLS.
    pub async fn start(
        id: u64,
        addr: SocketAddr,
        dir: &Path,
        join_key: Option<[u8; 32]>,
        tls: Option<network::Tls>,
    ) -> Result<Node, StateError> {
        let (db, db_closed) = db::open(dir).map_err(|e| StateError::db(dir, e))?;
        let log = log_store::LogStore::new(db.clone()).map_err(|e| StateError::db(dir, e))?;
        let sm = state_machine::StateMachine::new(db).map_err(|e| StateError::db(dir, e))?;
        let config = Config {
            cluster_name: "tessera".into(),
            // openraft also uses the heartbeat interval as the timeout of an append: under
            // load a larger batch must fit in it, or replication backs off for 0.5 s.
            heartbeat_interval: 200,
            max_payload_entries: 128,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            // Snapshots encode the whole state; take them less often, at a different log
            // count on each node (all nodes at the same index would stall the whole
            // cluster at once: appends time out and replication backs off), and keep
            // enough log after one that a follower lagging under load catches up from the
            // log rather than by a snapshot transfer.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(8_000 + id % 4_000),
            max_in_snapshot_log_to_keep: 10_000,
            ..Default::default()
        };
        let config = Arc::new(config.validate()?);
        let transport = network::Transport::new(tls.clone());
        let net = network::Network {
            transport: transport.clone(),
        };
        let raft = Raft::new(id, config, net, log, sm.clone())
            .await
            .map_err(|e| StateError::Start(Box::new(e)))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| StateError::Bind(addr, e))?;
        let ca = server::CaSlot::default();
        let (read_index, batcher) = barrier::ReadIndex::start(raft.clone(), transport.clone());
        let ctx = Arc::new(server::ServeCtx {
            read_index: read_index.clone(),
            raft: raft.clone(),
            join_key,
            tls: tls.map(|t| t.server),
            transport: transport.clone(),
            ca: ca.clone(),
            sm: sm.reader(),
        });
        let server = tokio::spawn(server::serve(listener, ctx));
        Ok(Node {
            id,
            raft,
            state: sm,
            transport,
            ca,
            join_key,
            read_index,
            write_ids: once::Ids::new(id),
            tasks: vec![server, batcher],
            db_closed,
        })
    }

    /// Gives this node the cluster CA directly (the node that minted it, before the CA
    /// record is in the replicated state), so it can enroll the other founders.
    pub fn set_ca(&self, ca: tessera_pki::ClusterCa) {
        *self.ca.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca);
    }

    /// The cluster CA with its private key: the one given by [`Node::set_ca`], else opened
    /// from its sealed record in the replicated state (once per process: the key
    /// derivation is slow on purpose). `None` while the state has no CA record yet.
    pub fn cluster_ca(&self) -> Result<Option<tessera_pki::ClusterCa>, ca_record::CaRecordError> {
        server::ca_from(&self.ca, &self.state.reader(), self.join_key.as_ref())
    }

    /// The CA's record for the replicated state, its key sealed with this node's join
    /// secret for cluster `cluster`.
    pub fn ca_record(
        &self,
        ca: &tessera_pki::ClusterCa,
        cluster: &str,
    ) -> Result<serde_json::Value, ca_record::CaRecordError> {
        let key = self.join_key.ok_or(ca_record::CaRecordError::NoSecret)?;
        Ok(ca_record::to_record(ca, &key, cluster)?)
    }

    /// Removes member `id` from the cluster (voter or learner), through the leader. The
    /// removed node must not come back with its old state: wipe it, then let it join anew.
    pub async fn remove_member(&self, id: u64) -> Result<(), StateError> {
        Ok(membership::remove(&self.raft, &self.transport, id).await?)
    }

    /// Whether `id` is in the membership this node knows (voter or learner). After a
    /// removal this node applied, `false`: a retried removal can go on from there.
    pub fn is_member(&self, id: u64) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
    }

    /// Founds the cluster with these members (only the bootstrapping node calls this, once).
    pub async fn initialize(&self, members: BTreeMap<u64, SocketAddr>) -> Result<(), StateError> {
        let nodes: BTreeMap<u64, BasicNode> = members
            .into_iter()
            .map(|(id, a)| {
                (
                    id,
                    BasicNode {
                        addr: a.to_string(),
                    },
                )
            })
            .collect();
        self.raft
            .initialize(nodes)
            .await
            .map_err(|e| StateError::Initialize(Box::new(e)))
    }

    /// Applies a command through Raft, once: directly on the leader, forwarded to it from
    /// a follower. A write whose answer was lost (the leader stopped, a connection broke,
    /// no answer in time) is sent again, to whichever member leads by then, for up to
    /// [`RESEND_FOR`]: it carries an id that makes a second sending change nothing
    /// ([`once`]). A write asked while no leader is known (an election under way) waits
    /// for one for up to [`LEADER_WAIT`]. Fails when no leader took it within those times
    /// (no quorum); the error then says whether it may have been applied (an earlier
    /// sending may have reached a leader) or not (nothing left this node). When it returns, the
    /// local state machine has applied the command too (read-your-writes on this node).
    pub async fn write(&self, cmd: Command) -> Result<Applied, StateError> {
        let id = self.write_ids.next();
        let cmd = once::wrap(&id, network::now_ms(), cmd);
        let mut resend_until = None;
        // The first failed sending that may have reached a leader: a later "no leader"
        // does not undo it, so the caller is told of it if nothing settles the write.
        let mut maybe_applied: Option<StateError> = None;
        let applied = loop {
            let ttl = resend_until.map_or(FORWARD_TTL, |until: tokio::time::Instant| {
                until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .clamp(RESEND_PAUSE, FORWARD_TTL)
            });
            let e = match self.send_write(&cmd, ttl).await {
                Ok(applied) => break once::settle(&id, applied),
                Err(e) => e,
            };
            let now = tokio::time::Instant::now();
            if maybe_applied.is_none() && may_have_been_applied(&e) {
                // From the first sending that may have reached a leader: RESEND_FOR.
                let resend = now + RESEND_FOR;
                resend_until = Some(resend_until.map_or(resend, |u| u.max(resend)));
            }
            let until = *resend_until.get_or_insert(now + LEADER_WAIT);
            if !resendable(&e) || now + RESEND_PAUSE >= until {
                return Err(match maybe_applied {
                    Some(first) if matches!(e, StateError::NoLeader(_)) => first,
                    _ => e,
                });
            }
            if let StateError::NoLeader(_) = e {
                tracing::debug!(id, "no leader known for a write; waiting for one");
                self.leader_known(until).await;
                continue;
            }
            tracing::debug!(id, error = %e, "the write's answer was lost; sending it again");
            if maybe_applied.is_none() && may_have_been_applied(&e) {
                maybe_applied = Some(e);
            }
            tokio::time::sleep(RESEND_PAUSE).await;
        };
        self.wait_local(applied.index).await?;
        Ok(applied)
    }

    /// One sending of a write: to the local Raft if it leads, else forwarded to the leader
    /// it knows.
    async fn send_write(&self, cmd: &Command, ttl: Duration) -> Result<Applied, StateError> {
        match self.raft.client_write(cmd.clone()).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => match f.leader_node {
                Some(node) => self
                    .transport
                    .forward_write(
                        f.leader_id.unwrap_or_default(),
                        &node.addr,
                        cmd.clone(),
                        ttl,
                    )
                    .await
                    .map_err(StateError::Forward),
                None => Err(StateError::NoLeader(LeaderError::NoLeader)),
            },
            Err(e) => Err(StateError::Write(Box::new(e))),
        }
    }

    /// Waits until this node knows a leader (it may be itself), at most until `until`.
    /// One it knows already but cannot reach by name (not yet in the membership this
    /// node has) gets a pause instead, so the caller does not spin.
    async fn leader_known(&self, until: tokio::time::Instant) {
        let mut metrics = self.raft.metrics();
        if metrics.borrow().current_leader.is_some() {
            tokio::time::sleep_until(until.min(tokio::time::Instant::now() + RESEND_PAUSE)).await;
            return;
        }
        let known = metrics.wait_for(|m| m.current_leader.is_some());
        // Either way the caller tries again: a leader, or its time is up.
        let _ = tokio::time::timeout_at(until, known).await;
    }

    async fn wait_local(&self, index: u64) -> Result<(), StateError> {
        tokio::time::timeout(Duration::from_secs(5), self.state.wait_applied(index))
            .await
            .map_err(|_| StateError::Lagging)
    }

    /// A read barrier: when it returns, the local state machine holds every write
    /// committed before the call (the leader confirms its leadership and names its
    /// applied index; a follower asks the leader and waits to apply up to it). While no
    /// leader is known, or the one known does not answer or cannot confirm its
    /// leadership (an election under way), it tries again for up to [`LEADER_WAIT`].
    pub async fn sync(&self) -> Result<(), StateError> {
        let until = tokio::time::Instant::now() + LEADER_WAIT;
        let index = loop {
            let e = match self.read_index.get().await {
                Ok(index) => break index,
                Err(e) => e,
            };
            if matches!(e, BarrierError::ShuttingDown)
                || tokio::time::Instant::now() + RESEND_PAUSE >= until
            {
                return Err(e.into());
            }
            tracing::debug!(error = %e, "read barrier failed; trying again");
            match e {
                BarrierError::Leader(LeaderError::NoLeader) => self.leader_known(until).await,
                _ => tokio::time::sleep(RESEND_PAUSE).await,
            }
        };
        self.wait_local(index).await
    }

    /// Reads one record as of now (linearizable). Use it when a miss in the local copy
    /// may just be lag.
    pub async fn read_linearizable(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<serde_json::Value>, StateError> {
        self.sync().await?;
        Ok(self
            .state
            .read(|t| t.get(table).and_then(|t| t.get(key)).cloned()))
    }

    /// Stops Raft and the RPC server. When it returns, the database is closed, so the
    /// node can be started again from the same directory.
    pub async fn shutdown(self) {
        let Node {
            raft,
            state,
            tasks,
            db_closed,
            ..
        } = self;
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = raft.shutdown().await;
        drop(state);
        // openraft's shutdown waits for its core task only: the state machine worker,
        // replication streams and a snapshot being built still hold the database until
        // they notice, and a restart opening it before it is closed would find it locked.
        if tokio::time::timeout(RELEASE_WAIT, db_closed).await.is_err() {
            tracing::warn!("Raft's tasks still hold the state database after shutdown");
        }
    }
}
