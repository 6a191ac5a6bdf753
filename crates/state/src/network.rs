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
}

/// Serves Raft RPCs for `raft` until the listener fails.
pub async fn serve(listener: TcpListener, raft: Raft<TypeConfig>) {
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            return;
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(sock, raft).await {
                tracing::debug!(%peer, error = %e, "Raft RPC failed");
            }
        });
    }
}

async fn handle(sock: TcpStream, raft: Raft<TypeConfig>) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut line = String::new();
    BufReader::new(r).take(MAX_RPC).read_line(&mut line).await?;
    let rpc: Rpc = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    let reply = match rpc {
        Rpc::Append(req) => serde_json::to_vec(&raft.append_entries(req).await),
        Rpc::Vote(req) => serde_json::to_vec(&raft.vote(req).await),
        Rpc::Snapshot(req) => serde_json::to_vec(&raft.install_snapshot(req).await),
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
    let go = async {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to the leader {addr}: {e}"))?;
        let (r, mut w) = sock.into_split();
        let mut body = serde_json::to_vec(&Rpc::Write(cmd)).map_err(|e| e.to_string())?;
        body.push(b'\n');
        w.write_all(&body).await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(r)
            .take(MAX_RPC)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str::<Result<Applied, String>>(&line).map_err(|e| e.to_string())?
    };
    tokio::time::timeout(ttl, go)
        .await
        .map_err(|_| format!("the leader {addr} did not answer in time"))?
}
