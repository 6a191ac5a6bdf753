//! Read barriers, batched: every caller waiting when a round starts shares that round
//! (one quorum confirmation on the leader, or one read-index request to it from a
//! follower), and a round always starts after its callers arrived, so each still reads
//! every write committed before it asked.

use std::time::Duration;

use openraft::Raft;
use tokio::sync::{mpsc, oneshot};

use crate::network::{leader, Leader, Transport};
use crate::types::TypeConfig;

type Waiter = oneshot::Sender<Result<u64, String>>;

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
    pub async fn get(&self) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| "this node is shutting down".to_string())?;
        rx.await
            .map_err(|_| "this node is shutting down".to_string())?
    }
}

async fn round(raft: &Raft<TypeConfig>, transport: &Transport) -> Result<u64, String> {
    match leader(raft)? {
        Leader::Me => {
            let read = raft
                .ensure_linearizable()
                .await
                .map_err(|e| e.to_string())?;
            Ok(read.map(|l| l.index).unwrap_or(0))
        }
        Leader::Other(id, addr) => {
            transport
                .read_index(id, &addr, Duration::from_secs(5))
                .await
        }
    }
}
