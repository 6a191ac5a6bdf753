//! Read barriers, batched: every caller waiting when a round starts shares that round
//! (one quorum confirmation on the leader, or one read-index request to it from a
//! follower), and a round always starts after its callers arrived, so each still reads
//! every write committed before it asked.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::{BasicNode, Raft};
use tokio::sync::{mpsc, oneshot};

use crate::membership::{leader, Leader, LeaderError};
use crate::network::{Transport, TransportError};
use crate::types::TypeConfig;

type NodeId = u64;

/// Why a read barrier could not be set. Clone: one round answers all its callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BarrierError {
    /// The node is stopping.
    #[error("this node is shutting down")]
    ShuttingDown,
    /// No leader to ask.
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// This node leads but could not confirm it with a quorum.
    #[error(transparent)]
    Unconfirmed(Box<RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>>),
    /// Asking the leader failed, or the leader refused (its reason is the message).
    #[error(transparent)]
    AskingLeader(Arc<TransportError>),
}

type Waiter = oneshot::Sender<Result<u64, BarrierError>>;

/// A handle to the batching task of one node.
#[derive(Clone)]
pub struct ReadIndex {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl ReadIndex {
    /// Starts the batching task of the node running `raft`.
    pub fn start(
        raft: Raft<TypeConfig>,
        transport: Transport,
    ) -> (ReadIndex, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(w) = rx.try_recv() {
                    batch.push(w);
                }
                let r = round(&raft, &transport).await;
                for w in batch {
                    let _ = w.send(r.clone());
                }
            }
        });
        (ReadIndex { tx }, task)
    }

    /// The log index a read starting now must see.
    pub async fn get(&self) -> Result<u64, BarrierError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| BarrierError::ShuttingDown)?;
        rx.await.map_err(|_| BarrierError::ShuttingDown)?
    }
}

async fn round(raft: &Raft<TypeConfig>, transport: &Transport) -> Result<u64, BarrierError> {
    match leader(raft)? {
        Leader::Me => {
            let read = raft
                .ensure_linearizable()
                .await
                .map_err(|e| BarrierError::Unconfirmed(Box::new(e)))?;
            Ok(read.map(|l| l.index).unwrap_or(0))
        }
        Leader::Other(id, addr) => transport
            .read_index(id, &addr, Duration::from_secs(5))
            .await
            .map_err(|e| BarrierError::AskingLeader(Arc::new(e))),
    }
}
