//! The cluster state, replicated by Raft (openraft 0.9): the durable log and vote in redb,
//! the state machine (tables of records) with snapshots, and the node-to-node transport.
//!
//! It stores and replicates; it does not decide what the records mean (the domain lives
//! in `tesserad`) nor who the members are (formation decides, then Raft membership
//! changes go through [`Node::raft`]).

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); our helpers
// return the same type so `?` flows through them unchanged.
#![allow(clippy::result_large_err)]

pub mod barrier;
pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use openraft::{BasicNode, Config, Raft};

pub use types::{Applied, Command, Require, Tables, TypeConfig};

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database could not be opened.
    #[error("state database {0}: {1}")]
    Db(String, String),
    /// Raft refused to start.
    #[error("raft: {0}")]
    Raft(String),
    /// The RPC listener could not bind.
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Creates the database under a temporary name and renames it into place, so a crash
/// during creation never leaves a half-written database where a restart would find it.
fn create_atomically(dir: &Path, path: &Path) -> Result<(), StateError> {
    let err = |e: &dyn std::fmt::Display| StateError::Db(path.display().to_string(), e.to_string());
    let tmp = dir.join("state.redb.new");
    let _ = std::fs::remove_file(&tmp);
    {
        let db = Arc::new(redb::Database::create(&tmp).map_err(|e| err(&e))?);
        log_store::LogStore::new(db.clone()).map_err(|e| err(&e))?;
        state_machine::StateMachine::new(db).map_err(|e| err(&e))?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(&e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(&e))
}

/// redb's page cache (its default, 1 GiB, would let a node's memory grow with the
/// snapshots and log it writes; the state machine itself lives in memory anyway).
const CACHE_BYTES: usize = 32 << 20;

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
    ca: network::CaSlot,
    read_index: barrier::ReadIndex,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
        std::fs::create_dir_all(dir)
            .map_err(|e| StateError::Db(dir.display().to_string(), e.to_string()))?;
        let path = dir.join("state.redb");
        if !path.exists() {
            create_atomically(dir, &path)?;
        }
        let db = Arc::new(
            redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
                .map_err(|e| StateError::Db(path.display().to_string(), e.to_string()))?,
        );
        let log = log_store::LogStore::new(db.clone())
            .map_err(|e| StateError::Db(path.display().to_string(), e.to_string()))?;
        let sm = state_machine::StateMachine::new(db)
            .map_err(|e| StateError::Db(path.display().to_string(), e.to_string()))?;
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
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| StateError::Raft(e.to_string()))?,
        );
        let transport = network::Transport::new(tls.clone());
        let net = network::Network {
            transport: transport.clone(),
        };
        let raft = Raft::new(id, config, net, log, sm.clone())
            .await
            .map_err(|e| StateError::Raft(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| StateError::Bind(addr, e))?;
        let ca = network::CaSlot::default();
        let (read_index, batcher) = barrier::ReadIndex::start(raft.clone(), transport.clone());
        let ctx = Arc::new(network::ServeCtx {
            read_index: read_index.clone(),
            raft: raft.clone(),
            join_key,
            tls: tls.map(|t| t.server),
            transport: transport.clone(),
            ca: ca.clone(),
            sm: sm.reader(),
        });
        let server = tokio::spawn(network::serve(listener, ctx));
        Ok(Node {
            id,
            raft,
            state: sm,
            transport,
            ca,
            read_index,
            tasks: vec![server, batcher],
        })
    }

    /// Gives this node the cluster CA directly (the node that minted it, before the CA
    /// record is in the replicated state), so it can enroll the other founders.
    pub fn set_ca(&self, ca: tessera_pki::ClusterCa) {
        *self.ca.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca);
    }

    /// Removes member `id` from the cluster (voter or learner), through the leader. The
    /// removed node must not come back with its old state: wipe it, then let it join anew.
    pub async fn remove_member(&self, id: u64) -> Result<(), StateError> {
        network::remove(&self.raft, &self.transport, id)
            .await
            .map_err(StateError::Raft)
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
            .map_err(|e| StateError::Raft(e.to_string()))
    }

    /// Applies a command through Raft: directly on the leader, forwarded to it from a
    /// follower. Fails when there is no leader (no quorum) or it does not answer. When it
    /// returns, the local state machine has applied the command too (read-your-writes on
    /// this node).
    pub async fn write(&self, cmd: Command) -> Result<Applied, StateError> {
        use openraft::error::{ClientWriteError, RaftError};
        let applied = match self.raft.client_write(cmd.clone()).await {
            Ok(r) => r.data,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => match f.leader_node {
                Some(node) => self
                    .transport
                    .forward_write(
                        f.leader_id.unwrap_or_default(),
                        &node.addr,
                        cmd,
                        std::time::Duration::from_secs(5),
                    )
                    .await
                    .map_err(StateError::Raft)?,
                None => return Err(StateError::Raft("no leader elected (no quorum?)".into())),
            },
            Err(e) => return Err(StateError::Raft(e.to_string())),
        };
        self.wait_local(applied.index).await?;
        Ok(applied)
    }

    async fn wait_local(&self, index: u64) -> Result<(), StateError> {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.state.wait_applied(index),
        )
        .await
        .map_err(|_| StateError::Raft("this node is lagging behind the leader".into()))
    }

    /// A read barrier: when it returns, the local state machine holds every write
    /// committed before the call (the leader confirms its leadership and names its
    /// applied index; a follower asks the leader and waits to apply up to it).
    pub async fn sync(&self) -> Result<(), StateError> {
        let index = self.read_index.get().await.map_err(StateError::Raft)?;
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

    /// Stops Raft and the RPC server.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.raft.shutdown().await;
    }
}
