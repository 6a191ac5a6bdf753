//! Replicated volumes, the cluster side (issue #8): where a volume's copies go
//! (`placement`), how its stores are told their roles (`roles`: the create and delete
//! steps the task runner hands here, and the per-node reconciler that keeps each store's
//! role equal to the cluster state), and what the leader changes when a copy's node fails
//! (`failover`: out of the in-sync set, or a new primary, each with a generation bump),
//! what it changes from the primary's store's reports (`resync`: a failed replica out,
//! a copy that is back caught up and in again), and moving the primary to a VM's node
//! (`moves`) or to a node whose store an export client writes through (`takeover`); a copy
//! away too long rebuilt on another node (`rebuild`), catch-ups and rebuilds followed as
//! tasks (`copy_tasks`), and the copies the cluster no longer counts deleted on their
//! stores (`orphans`), with the snapshots no record names (`leftover_snapshots`).
//!
//! The cluster state is the authority: a volume's primary, copies and generation are in
//! its `volumes/<name>` record; a generation is raised only by a compare-and-swap of that
//! record, always before a store hears of the configuration it fences for. The stores
//! replicate by themselves (`tessera-store`, docs/replication.md).

pub mod copy_tasks;
pub mod failover;
pub mod leftover_snapshots;
pub mod moves;
pub mod naming;
pub mod orphans;
pub mod placement;
pub mod rebuild;
pub mod repairs;
pub mod resync;
pub mod roles;
pub mod takeover;
#[cfg(test)]
mod test_volume;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tessera_state::Node;

use crate::records::table::NODES;
use crate::records::Volume;

/// The UDP port of each store's replication endpoint (`tessera-store --repl-quic`), on the
/// host of the node's NBD address: the seed names no other address for it.
pub const REPL_PORT: u16 = 7410;

/// How long a primary's store waits for a replica before it stops completing writes
/// (`set_replication`'s `timeout_ms`). Longer than the time the cluster takes to notice
/// a node down (3 s of silence) and remove its copy, so writes in flight then complete
/// under the new configuration instead of failing.
pub const REPLICA_TIMEOUT_MS: u64 = 10_000;

/// The local store's admin socket, once [`start`] ran.
static ADMIN_SOCKET: OnceLock<std::path::PathBuf> = OnceLock::new();

/// The management network's view of the peers, once the daemon has one.
static HEARD: OnceLock<crate::Heard> = OnceLock::new();
/// When this process started watching (a node not heard since then is down only after
/// [`crate::tasks::DOWN_NODE_GRACE`]).
static WATCHING: OnceLock<Instant> = OnceLock::new();

/// Lets placement and failover see which nodes are down.
pub fn watch_health(heard: crate::Heard) {
    let _ = HEARD.set(heard);
    let _ = WATCHING.set(Instant::now());
}

/// How node `id` is doing as the management network hears it, from `me`'s side.
pub fn liveness(me: &str, id: &str) -> Liveness {
    if id == me {
        return Liveness::Up;
    }
    let Some(heard) = HEARD.get() else {
        return Liveness::Unknown;
    };
    let quiet = heard
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .map(|t| t.elapsed());
    match (quiet, crate::health::state(quiet)) {
        (Some(_), "up") => Liveness::Up,
        (Some(_), "down") => Liveness::Down,
        (Some(_), _) => Liveness::Unknown,
        // Never heard: down only once this node has listened long enough.
        (None, _) => {
            let listened = WATCHING.get().map(Instant::elapsed).unwrap_or_default();
            if listened > crate::tasks::DOWN_NODE_GRACE {
                Liveness::Down
            } else {
                Liveness::Unknown
            }
        }
    }
}

/// How long node `id` has been down as `me` hears it (`None`: not down). A node never
/// heard since this process started listening is down for as long as it listened, once
/// that is past [`crate::tasks::DOWN_NODE_GRACE`].
pub fn away_for(me: &str, id: &str) -> Option<Duration> {
    if id == me {
        return None;
    }
    let heard = HEARD.get()?;
    let quiet = heard
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .map(|t| t.elapsed());
    match quiet {
        Some(q) => (crate::health::state(Some(q)) == "down").then_some(q),
        None => WATCHING
            .get()
            .map(Instant::elapsed)
            .filter(|l| *l > crate::tasks::DOWN_NODE_GRACE),
    }
}

/// Every registered node as a place for a copy: its free space (the largest `available`
/// of its disks), and why it cannot hold one now (down, not heard regularly, its store
/// unreachable or degraded, no replication address). By id, so placement is stable.
pub fn candidates(n: &Node, me: &str) -> Vec<placement::Candidate> {
    let mut candidates: Vec<placement::Candidate> = node_records(n)
        .iter()
        .map(|(id, r)| {
            let available = r["metrics"]["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["available"].as_u64())
                .max()
                .unwrap_or(0);
            let unusable = match liveness(me, id) {
                Liveness::Down => Some("the node is down".to_string()),
                Liveness::Unknown => Some("the node is not heard regularly".to_string()),
                Liveness::Up => store_trouble(r),
            };
            placement::Candidate {
                id: id.clone(),
                available,
                unusable,
            }
        })
        .collect();
    candidates.sort_by(|a, b| a.id.cmp(&b.id));
    candidates
}

/// A node's state as the management network tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Heard within the last second.
    Up,
    /// Silent for [`crate::health::DOWN_AFTER`] or more.
    Down,
    /// Suspect, or not listened long enough to say.
    Unknown,
}

/// The registered nodes' records, by id.
pub fn node_records(n: &Node) -> HashMap<String, serde_json::Value> {
    n.state.read(|t| {
        t.get(NODES)
            .map(|nodes| nodes.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    })
}

/// A node's store replication address, from its record's NBD address.
pub fn repl_addr(record: &serde_json::Value) -> Option<SocketAddr> {
    let nbd: SocketAddr = record["nbd"].as_str()?.parse().ok()?;
    Some(SocketAddr::new(nbd.ip(), REPL_PORT))
}

/// Why a node's store cannot serve a copy now, from its record (`None`: it can).
pub fn store_trouble(record: &serde_json::Value) -> Option<String> {
    if repl_addr(record).is_none() {
        return Some(
            "its store has no TCP address (seed storage.nbd), so no replication endpoint".into(),
        );
    }
    match record["storage"]["state"].as_str() {
        Some(s @ ("unreachable" | "degraded")) => Some(format!(
            "its store is {s}{}",
            record["storage"]["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        _ => None,
    }
}

/// The NBD URI of volume `name` served by `node`'s store.
pub fn nbd_uri(
    records: &HashMap<String, serde_json::Value>,
    node: &str,
    name: &str,
) -> Option<String> {
    records
        .get(node)
        .and_then(|r| r["nbd"].as_str().map(|a| format!("nbds://{a}/{name}")))
}

/// Every volume record (unreadable ones are logged and skipped).
pub fn volumes(n: &Node) -> Vec<Volume> {
    n.state.read(|t| {
        t.get(crate::records::table::VOLUMES)
            .map(|vols| {
                vols.iter()
                    .filter_map(|(k, v)| match serde_json::from_value::<Volume>(v.clone()) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::error!(volume = %k, error = %e, "unreadable volume record");
                            None
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Starts this node's replication loops: the role reconciler, the deletion of copies
/// left here, and (acting only while this node leads) the failover of copies whose nodes
/// fail, the rebuild of copies away too long and the copy tasks' progress.
pub fn start(node: std::sync::Arc<Node>, me: String, admin_socket: std::path::PathBuf) {
    let _ = ADMIN_SOCKET.set(admin_socket.clone());
    roles::start_reconciler(node.clone(), me.clone(), admin_socket.clone());
    orphans::start(node.clone(), me.clone(), admin_socket);
    failover::start(node, me);
}

/// How often the loops look again without a change of the state.
const ROUND: Duration = Duration::from_secs(1);
