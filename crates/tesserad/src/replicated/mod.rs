//! After formation: this node's Raft member of the cluster state, its registration in the
//! `nodes` table, and what the status socket reports about it. Beside it: the cluster CA's
//! record and the join key that seals it (`ca`), this node's TLS credentials
//! (`credentials`), what a failed write means for its caller (`write_failure`).

mod ca;
mod credentials;
pub mod names;
mod write_failure;

pub use ca::{join_key, legacy_join_key, publish_ca, reseal_ca};
pub use credentials::{api_tls, enroll, load_tls, mint, minted_ca};
pub use write_failure::{sync_failure, write_failure, WriteFailure};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_cluster::identity::NodeId;
use tessera_state::network::Tls;
use tessera_state::{Command, Node};

/// A node id that is not what an identity is made of (32 lowercase hex digits), so it
/// has no Raft id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("node id {0:?} is not 32 lowercase hexadecimal digits")]
pub struct BadNodeId(String);

/// The Raft id of a node: the first 64 bits of its node id. An id that does not parse is
/// an error rather than some fixed Raft id, which two such nodes would share.
pub fn raft_id(id: &NodeId) -> Result<u64, BadNodeId> {
    let hex = id.0.as_bytes();
    let well_formed = hex.len() == 32
        && hex
            .iter()
            .all(|&c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    well_formed
        .then(|| id.0.get(..16))
        .flatten()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| BadNodeId(id.0.clone()))
}

/// Raft traffic uses the port after the management port.
pub fn raft_addr(management: SocketAddr) -> SocketAddr {
    SocketAddr::new(management.ip(), management.port().wrapping_add(1))
}

/// Management addresses of the peers heard, by node id.
pub type Peers = Arc<std::sync::Mutex<BTreeMap<String, SocketAddr>>>;

/// Starts this node's Raft member (mutual TLS with `tls`); the bootstrapping node also
/// founds the cluster with `founders` (Raft id -> Raft address).
pub async fn start(
    me: &NodeId,
    management: SocketAddr,
    data_dir: &Path,
    key: [u8; 32],
    tls: Tls,
    founders: Option<BTreeMap<u64, SocketAddr>>,
) -> anyhow::Result<Arc<Node>> {
    let node = Node::start(
        raft_id(me)?,
        raft_addr(management),
        &data_dir.join("state"),
        Some(key),
        Some(tls),
    )
    .await?;
    if let Some(members) = founders {
        node.initialize(members).await?;
        tracing::info!("Raft cluster initialized");
    }
    Ok(Arc::new(node))
}

/// The name this node goes by: its seed's `node_name`, else the machine's host name, else
/// (no host name to be had) its id.
pub fn node_name(seed_name: Option<&str>, me: &NodeId) -> String {
    seed_name
        .map(String::from)
        .or_else(sysinfo::System::host_name)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| me.0.clone())
}

/// The name node `me` registers under now, wanting `base` ([`names::unique_name`] over
/// the `nodes` table as this node sees it), and the name its record holds today.
fn registered_name(node: &Node, me: &str, base: &str) -> (String, Option<String>) {
    let (recorded, others) = node.state.read(|t| {
        let mut recorded = None;
        let mut others = Vec::new();
        for (id, rec) in t.get("nodes").into_iter().flatten() {
            let name = rec["name"].as_str().unwrap_or_default().to_string();
            if id == me {
                recorded = Some(name);
            } else {
                others.push((id.clone(), name));
            }
        }
        (recorded, others)
    });
    let chosen = names::unique_name(base, me, recorded.as_deref(), &others);
    (chosen, recorded)
}

/// Records this node in the replicated `nodes` table (name, address, NBD address, latest
/// metrics), retrying until a leader takes it, then refreshes the metrics every 10 s.
/// Its name is `name` unless another node holds it ([`names::unique_name`]); then the
/// record, an event and a warning say which it goes by.
pub fn register(
    node: Arc<Node>,
    me: NodeId,
    name: String,
    management: SocketAddr,
    nbd: Option<SocketAddr>,
    metrics: crate::metrics::Metrics,
    storage: Arc<crate::storage::Health>,
) -> Result<(), BadNodeId> {
    let my_raft_id = raft_id(&me)?;
    tokio::spawn(async move {
        let mut registered = false;
        loop {
            let m = metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (chosen, previous) = registered_name(&node, &me.0, &name);
            let mut ops = Vec::new();
            if chosen != name && previous.as_deref() != Some(chosen.as_str()) {
                let msg = format!(
                    "node name {name} is held by another node: this node ({}) goes by {chosen}",
                    me.0
                );
                tracing::warn!(wanted = %name, name = %chosen, "{msg}");
                ops.push(crate::tables::event_about_nodes(
                    "node.renamed",
                    &chosen,
                    "tesserad",
                    &msg,
                    vec![me.0.clone()],
                ));
            }
            ops.push(Command::Put {
                table: "nodes".into(),
                key: me.0.clone(),
                value: json!({
                    "name": chosen,
                    "address": management.to_string(),
                    "raft_id": my_raft_id,
                    "nbd": nbd.map(|a| a.to_string()),
                    "metrics": m,
                    "storage": storage.latest(),
                }),
            });
            let cmd = Command::Txn {
                require: vec![],
                ops,
            };
            match node.write(cmd).await {
                Ok(a) => {
                    if !registered {
                        tracing::info!(index = a.index, "registered in the cluster state");
                        registered = true;
                    }
                    // A change of the store's health is published at once.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        _ = storage.changed.notified() => {}
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registration not accepted yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    });
    Ok(())
}

/// The status document of this node (its Raft id null if its node id does not parse).
pub fn status(me: &NodeId, cluster_id: Option<&str>, node: Option<&Node>) -> serde_json::Value {
    let mut v = json!({
        "node_id": me.0,
        "raft_id": raft_id(me).ok(),
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

/// Asks the members at `via` (management addresses, with their node ids) to add this
/// node, until one does.
pub async fn join(
    node: &Node,
    me: &NodeId,
    management: SocketAddr,
    via: &[(NodeId, SocketAddr)],
    key: [u8; 32],
) -> anyhow::Result<()> {
    let my_addr = raft_addr(management).to_string();
    let my_raft_id = raft_id(me)?;
    let via = via
        .iter()
        .map(|(id, a)| Ok((raft_id(id)?, raft_addr(*a).to_string())))
        .collect::<Result<Vec<_>, BadNodeId>>()?;
    let mut last = String::from("no member address heard");
    for attempt in 0..20 {
        for (id, addr) in &via {
            match node
                .transport
                .request_join(*id, addr, &key, my_raft_id, &my_addr)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if crate::removed::says_removed(&e.to_string()) => {
                    anyhow::bail!("join refused: {e}")
                }
                Err(e) => last = e.to_string(),
            }
        }
        tracing::debug!(attempt, error = %last, "join not accepted yet");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("could not join the cluster: {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_names_the_node_before_the_host_does() {
        let me = NodeId("0123456789abcdef00112233445566ff".into());
        assert_eq!(node_name(Some("node2"), &me), "node2");
        assert!(!node_name(None, &me).is_empty());
    }

    #[test]
    fn a_node_id_gives_the_raft_id_of_its_first_64_bits() {
        let id = NodeId("0123456789abcdef00112233445566ff".into());
        assert_eq!(raft_id(&id), Ok(0x0123_4567_89ab_cdef));
    }

    #[test]
    fn a_node_id_that_does_not_parse_has_no_raft_id() {
        for bad in [
            "",
            "0123456789abcdef",                    // too short
            "0123456789abcdef00112233445566ff00",  // too long
            "0123456789abcdeg00112233445566ff",    // not hex
            "+123456789abcdef00112233445566ff",    // a sign from_str_radix would take
            "0123456789ABCDEF00112233445566FF",    // not as identities write it
            "0123456789abcdef0011223344556\u{e9}", // not ASCII
        ] {
            let id = NodeId(bad.into());
            assert_eq!(raft_id(&id), Err(BadNodeId(bad.into())), "{bad:?}");
        }
    }
}
