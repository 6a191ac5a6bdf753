//! The Raft transport between nodes: one JSON request and one JSON reply per TCP
//! connection. (Mutual TLS with the cluster CA wraps this once `tesserad` holds node
//! certificates; see `tessera-pki`.)

use std::net::SocketAddr;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::types::{Applied, Command, TypeConfig};

type NodeId = u64;
/// Largest RPC accepted (snapshots are sent in chunks well below this).
const MAX_RPC: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
#[serde(tag = "rpc", content = "body", rename_all = "snake_case")]
enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write forwarded by a follower to the leader.
    Write(Command),
    /// A new node asking to become a voter, authenticated with the join key.
    Join(JoinRequest),
    /// A follower's read barrier: the leader confirms its leadership and answers the log
    /// index a read must see.
    ReadIndex,
}

/// A node's request to join the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Its Raft id.
    pub id: NodeId,
    /// Its Raft address.
    pub addr: String,
    /// Its clock, ms since the epoch (requests older than 30 s are refused).
    pub sent_ms: u64,
    /// blake3 keyed hash of id, address and time under the join key, hex.
    pub mac: String,
}

impl JoinRequest {
    fn tag(key: &[u8; 32], id: NodeId, addr: &str, sent_ms: u64) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(b"tessera join v1\0");
        h.update(&id.to_le_bytes());
        h.update(addr.as_bytes());
        h.update(b"\0");
        h.update(&sent_ms.to_le_bytes());
        h.finalize().to_hex().to_string()
    }

    /// A signed request.
    pub fn new(key: &[u8; 32], id: NodeId, addr: &str, sent_ms: u64) -> JoinRequest {
        JoinRequest {
            id,
            addr: addr.to_string(),
            sent_ms,
            mac: Self::tag(key, id, addr, sent_ms),
        }
    }

    /// Checks the signature and freshness.
    pub fn verify(&self, key: &[u8; 32], now_ms: u64) -> Result<(), String> {
        let want = blake3::Hash::from_hex(Self::tag(key, self.id, &self.addr, self.sent_ms))
            .map_err(|e| e.to_string())?;
        let got = blake3::Hash::from_hex(&self.mac)
            .map_err(|_| "malformed join signature".to_string())?;
        if want != got {
            return Err("join request failed authentication (different join secret?)".into());
        }
        if now_ms.abs_diff(self.sent_ms) > 30_000 {
            return Err("join request is stale".into());
        }
        Ok(())
    }
}

/// Serves Raft RPCs for `raft` until the listener fails. Join requests are accepted only
/// when signed with `join_key`.
pub async fn serve(listener: TcpListener, raft: Raft<TypeConfig>, join_key: Option<[u8; 32]>) {
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            return;
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(sock, raft, join_key).await {
                tracing::debug!(%peer, error = %e, "Raft RPC failed");
            }
        });
    }
}

async fn handle(
    sock: TcpStream,
    raft: Raft<TypeConfig>,
    join_key: Option<[u8; 32]>,
) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut line = String::new();
    BufReader::new(r).take(MAX_RPC).read_line(&mut line).await?;
    let rpc: Rpc = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    let reply = match rpc {
        Rpc::Append(req) => serde_json::to_vec(&raft.append_entries(req).await),
        Rpc::Vote(req) => serde_json::to_vec(&raft.vote(req).await),
        Rpc::Snapshot(req) => serde_json::to_vec(&raft.install_snapshot(req).await),
        Rpc::Join(req) => serde_json::to_vec(&join(&raft, join_key, req).await),
        Rpc::ReadIndex => {
            let res: Result<u64, String> = match raft.ensure_linearizable().await {
                Ok(l) => Ok(l.map(|l| l.index).unwrap_or(0)),
                Err(e) => Err(e.to_string()),
            };
            serde_json::to_vec(&res)
        }
        Rpc::Write(cmd) => {
            let res: Result<Applied, String> = raft
                .client_write(cmd)
                .await
                .map(|r| r.data)
                .map_err(|e| e.to_string());
            serde_json::to_vec(&res)
        }
    }
    .map_err(std::io::Error::other)?;
    w.write_all(&reply).await?;
    w.write_all(b"\n").await?;
    w.flush().await
}

/// Makes clients for peers by their advertised address.
#[derive(Clone, Default)]
pub struct Network;

/// A client for one peer.
pub struct Peer {
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
        }
    }
}

impl Peer {
    async fn call<T, E>(&self, rpc: Rpc, ttl: Duration) -> Result<T, RPCError<NodeId, BasicNode, E>>
    where
        T: serde::de::DeserializeOwned,
        E: serde::de::DeserializeOwned + std::error::Error,
    {
        let go = async {
            let addr: SocketAddr = self
                .addr
                .parse()
                .map_err(|e: std::net::AddrParseError| RPCError::Network(NetworkError::new(&e)))?;
            let sock = TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(&e))?;
            let (r, mut w) = sock.into_split();
            let mut body =
                serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            body.push(b'\n');
            w.write_all(&body).await.map_err(|e| unreachable(&e))?;
            let mut line = String::new();
            BufReader::new(r)
                .take(MAX_RPC)
                .read_line(&mut line)
                .await
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            let res: Result<T, E> = serde_json::from_str(&line)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
        };
        match tokio::time::timeout(ttl, go).await {
            Ok(r) => r,
            Err(e) => Err(unreachable(&e)),
        }
    }
}

fn unreachable<X: std::error::Error, E: std::error::Error + 'static>(
    e: &E,
) -> RPCError<NodeId, BasicNode, X> {
    RPCError::Unreachable(Unreachable::new(e))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Append(rpc), option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot(rpc), option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote(rpc), option.hard_ttl()).await
    }
}

/// Sends a write to the leader at `addr` (a follower forwarding a client's write).
pub async fn forward_write(addr: &str, cmd: Command, ttl: Duration) -> Result<Applied, String> {
    send::<Result<Applied, String>>(addr, &Rpc::Write(cmd), ttl).await?
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Adds an authenticated node as a learner, then as a voter; a follower forwards the
/// request to the leader.
async fn join(
    raft: &Raft<TypeConfig>,
    key: Option<[u8; 32]>,
    req: JoinRequest,
) -> Result<(), String> {
    let key = key.ok_or("this node does not accept join requests")?;
    req.verify(&key, now_ms())?;
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        let leader = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
            .ok_or("no leader to forward the join to")?;
        return send(&leader.addr, &Rpc::Join(req), Duration::from_secs(20)).await?;
    }
    raft.add_learner(
        req.id,
        BasicNode {
            addr: req.addr.clone(),
        },
        true,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut voters: std::collections::BTreeSet<NodeId> =
        m.membership_config.membership().voter_ids().collect();
    voters.insert(req.id);
    raft.change_membership(voters, false)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(id = req.id, addr = %req.addr, "added a voter");
    Ok(())
}

async fn send<T: serde::de::DeserializeOwned>(
    addr: &str,
    rpc: &Rpc,
    ttl: Duration,
) -> Result<T, String> {
    let go = async {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (r, mut w) = sock.into_split();
        let mut body = serde_json::to_vec(rpc).map_err(|e| e.to_string())?;
        body.push(b'\n');
        w.write_all(&body).await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(r)
            .take(MAX_RPC)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str::<T>(&line).map_err(|e| e.to_string())
    };
    tokio::time::timeout(ttl, go)
        .await
        .map_err(|_| format!("{addr} did not answer in time"))?
}

/// Asks the member at `addr` to add this node (Raft id `id`, address `my_addr`).
pub async fn request_join(
    addr: &str,
    key: &[u8; 32],
    id: NodeId,
    my_addr: &str,
) -> Result<(), String> {
    let req = JoinRequest::new(key, id, my_addr, now_ms());
    send::<Result<(), String>>(addr, &Rpc::Join(req), Duration::from_secs(30)).await?
}

/// Asks the leader at `addr` for the log index a linearizable read must see.
pub async fn read_index(addr: &str, ttl: Duration) -> Result<u64, String> {
    send::<Result<u64, String>>(addr, &Rpc::ReadIndex, ttl).await?
}
