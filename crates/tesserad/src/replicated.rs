//! After formation: this node's Raft member of the cluster state, its registration in the
//! `nodes` table, and what the status socket reports about it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_cluster::identity::NodeId;
use tessera_state::{Command, Node};

/// The Raft id of a node: the first 64 bits of its node id.
pub fn raft_id(id: &NodeId) -> u64 {
    id.0.get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

/// Raft traffic uses the port after the management port.
pub fn raft_addr(management: SocketAddr) -> SocketAddr {
    SocketAddr::new(management.ip(), management.port().wrapping_add(1))
}

/// The key join requests are signed with, derived from the join secret.
pub fn join_key(secret: &str) -> [u8; 32] {
    blake3::derive_key("tessera raft join v1", secret.as_bytes())
}

/// Starts this node's Raft member; the bootstrapping node also founds the cluster with
/// `founders` (Raft id -> Raft address).
pub async fn start(
    me: &NodeId,
    management: SocketAddr,
    data_dir: &Path,
    key: [u8; 32],
    founders: Option<BTreeMap<u64, SocketAddr>>,
) -> anyhow::Result<Arc<Node>> {
    let node = Node::start(
        raft_id(me),
        raft_addr(management),
        &data_dir.join("state"),
        Some(key),
    )
    .await?;
    if let Some(members) = founders {
        node.initialize(members).await?;
        tracing::info!("Raft cluster initialized");
    }
    Ok(Arc::new(node))
}

/// Records this node in the replicated `nodes` table (address, NBD address, latest
/// metrics), retrying until a leader takes it, then refreshes the metrics every 10 s.
pub fn register(
    node: Arc<Node>,
    me: NodeId,
    management: SocketAddr,
    nbd: Option<SocketAddr>,
    metrics: crate::metrics::Metrics,
) {
    tokio::spawn(async move {
        let mut registered = false;
        loop {
            let m = metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let cmd = Command::Put {
                table: "nodes".into(),
                key: me.0.clone(),
                value: json!({
                    "address": management.to_string(),
                    "raft_id": raft_id(&me),
                    "nbd": nbd.map(|a| a.to_string()),
                    "metrics": m,
                }),
            };
            match node.write(cmd).await {
                Ok(a) => {
                    if !registered {
                        tracing::info!(index = a.index, "registered in the cluster state");
                        registered = true;
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registration not accepted yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    });
}

/// The status document of this node.
pub fn status(me: &NodeId, cluster_id: Option<&str>, node: Option<&Node>) -> serde_json::Value {
    let mut v = json!({
        "node_id": me.0,
        "raft_id": raft_id(me),
        "cluster_id": cluster_id,
    });
    if let Some(n) = node {
        let m = n.raft.metrics().borrow().clone();
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        v["leader"] = json!(m.current_leader);
        v["term"] = json!(m.current_term);
        v["voters"] = json!(voters);
        v["nodes"] = n
            .state
            .read(|t| json!(t.get("nodes").cloned().unwrap_or_default()));
    }
    v
}

/// Asks the members at `via` (management addresses) to add this node, until one does.
pub async fn join(
    me: &NodeId,
    management: SocketAddr,
    via: &[SocketAddr],
    key: [u8; 32],
) -> anyhow::Result<()> {
    let my_addr = raft_addr(management).to_string();
    let mut last = String::from("no member address heard");
    for attempt in 0..20 {
        for v in via {
            match tessera_state::network::request_join(
                &raft_addr(*v).to_string(),
                &key,
                raft_id(me),
                &my_addr,
            )
            .await
            {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        tracing::debug!(attempt, error = %last, "join not accepted yet");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("could not join the cluster: {last}")
}
