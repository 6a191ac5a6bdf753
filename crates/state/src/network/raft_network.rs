//! openraft's view of the network: a client per peer that carries Raft's own RPCs
//! (append, vote, snapshot) over the [`Transport`].

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
use openraft::BasicNode;

use super::rpc::Rpc;
use super::transport::Transport;
use super::NodeId;
use crate::types::TypeConfig;

/// Makes clients for peers by their advertised address.
#[derive(Clone, Default)]
pub struct Network {
    /// How to reach them.
    pub transport: Transport,
}

/// A client for one peer.
pub struct Peer {
    target: NodeId,
    addr: String,
    transport: Transport,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
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
            let _: SocketAddr = self
                .addr
                .parse()
                .map_err(|e: std::net::AddrParseError| RPCError::Network(NetworkError::new(&e)))?;
            let line = self
                .transport
                .line(self.target, &self.addr, &rpc)
                .await
                .map_err(|e| unreachable(&e))?;
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
