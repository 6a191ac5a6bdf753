//! Read barriers, batched: every caller waiting when a round starts shares that round
//! (one quorum confirmation on the leader, or one read-index request to it from a
//! follower), and a round always starts after its callers arrived, so each still reads
//! every write committed before it asked.

use std::time::Duration;

use openraft::Raft;
use tokio::sync::{mpsc, oneshot};

use crate::network::Transport;
use crate::types::TypeConfig;

type Waiter = oneshot::Sender<Result<u64, String>>;

/// A handle to the batching task of one node.
#[derive(Clone)]
pub struct ReadIndex {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl ReadIndex {
    /// Starts the batching task for node `id`.
    pub fn start(
        id: u64,
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
                let r = round(id, &raft, &transport).await;
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

async fn round(id: u64, raft: &Raft<TypeConfig>, transport: &Transport) -> Result<u64, String> {
    let m = raft.metrics().borrow().clone();
    if m.current_leader == Some(id) {
        let read = raft
            .ensure_linearizable()
            .await
            .map_err(|e| e.to_string())?;
        return Ok(read.map(|l| l.index).unwrap_or(0));
    }
    let leader_id = m.current_leader.ok_or("no leader elected (no quorum?)")?;
    let leader = m
        .membership_config
        .membership()
        .get_node(&leader_id)
        .cloned()
        .ok_or("the leader is not a member?")?;
    transport
        .read_index(leader_id, &leader.addr, Duration::from_secs(5))
        .await
}
