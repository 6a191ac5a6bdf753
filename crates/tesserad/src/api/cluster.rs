//! The cluster (id, leader, members) and its nodes (address, health, metrics).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use tessera_api::{ClusterStatus, Member, NodeAllocation, NodeInfo, RemoveQuery, Removed};
use tessera_cluster::identity::NodeId;

use super::extract::{Administrator, Auditor, Auth, Param, Synced, Q};
use super::{node, read, read_all, ApiError, ErrorBody, St};
use crate::health;
use crate::records::table::{NODES, VMS, VOLUMES};

/// Cluster status: id, leader (by Raft id and as a node, with its name), term and members.
/// Raft ids are unsigned 64-bit integers.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster", operation_id = "get_cluster",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = ClusterStatus), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn cluster(State(st): St, _: Auth<Auditor>) -> Result<Json<ClusterStatus>, ApiError> {
    let n = node(&st)?;
    let m = n.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| Member {
            raft_id: *id,
            address: node.addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    let cluster_id = st
        .cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let registered = n
        .state
        .read(|t| json!(t.get(NODES).cloned().unwrap_or_default()));
    let (leader_node, leader_name) = m
        .current_leader
        .and_then(|l| node_of_raft_id(&registered, l))
        .map_or((None, None), |(id, name)| (Some(id), name));
    let mut vms = tessera_api::VmCounts::default();
    for (_, vm) in read_all::<tessera_api::Vm>(&n, VMS)? {
        vms.add(super::vms::with_status(&n, vm)?.actual_state);
    }
    Ok(Json(ClusterStatus {
        cluster_id,
        leader: m.current_leader,
        leader_node,
        leader_name,
        term: m.current_term,
        voters,
        members,
        answered_by: st.me.0.clone(),
        vms,
    }))
}

/// Nodes with their health, metrics and storage health, as this node sees them (answers
/// without quorum). A node's `storage` is as it last published it (every 10 s, at once
/// when it changes); this node's is its latest poll.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "cluster", operation_id = "list_nodes",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [NodeInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn nodes(State(st): St, _: Auth<Auditor>) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    // This node's own view, without a read barrier: health must be readable while the
    // cluster has no leader (a partition, an election), which is when it matters most.
    let n = node(&st)?;
    let registered = n
        .state
        .read(|t| json!(t.get(NODES).cloned().unwrap_or_default()));
    let heard = st.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let health = health::report(&st.me.0, &registered, &heard);
    // Health must stay readable: an unreadable VM record costs the allocation, not the list.
    let vms = read_all::<tessera_api::Vm>(&n, VMS).unwrap_or_else(|e| {
        tracing::warn!(error = %e.1, "VM records unreadable; allocations shown as 0");
        Vec::new()
    });
    let ratio = super::settings::current(&n)
        .map_or(crate::vmrun::scheduler::DEFAULT_VCPU_OVERCOMMIT, |s| {
            s.vcpu_overcommit
        });
    let maintenance = super::node_maintenance::all(&n);
    let migrating = super::node_maintenance::migrations(&n);
    let mut out = Vec::new();
    if let Some(obj) = registered.as_object() {
        for (id, rec) in obj {
            let (state, metrics, storage) = if *id == st.me.0 {
                let m = st.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
                ("up".to_string(), m, st.storage.latest())
            } else {
                (
                    health[id]["state"].as_str().unwrap_or("down").to_string(),
                    rec["metrics"].clone(),
                    // As the node last published it; a record that does not read (a
                    // newer node's) shows as not reported rather than failing the list.
                    serde_json::from_value(rec["storage"].clone())
                        .ok()
                        .flatten(),
                )
            };
            let (memory_mib_allocated, vcpus_allocated, placed) =
                super::vm_actions::allocated(&vms, id, "");
            let cpus = metrics["cpus"].as_u64().unwrap_or(0);
            let allocation = NodeAllocation {
                memory_mib: metrics["memory_total"].as_u64().unwrap_or(0) / (1024 * 1024),
                memory_mib_allocated,
                cpus,
                vcpus_allocated,
                vcpus_limit: crate::vmrun::scheduler::vcpu_limit(cpus, ratio),
                vms: placed,
            };
            out.push(NodeInfo {
                id: id.clone(),
                name: rec["name"].as_str().map(String::from),
                raft_id: raft_id(id),
                address: rec["address"].clone(),
                state,
                metrics,
                storage,
                allocation,
                maintenance: super::node_maintenance::state_of(
                    id,
                    maintenance.iter().find(|(k, _)| k == id).map(|(_, m)| m),
                    &vms,
                    &migrating,
                ),
            });
        }
    }
    Ok(Json(out))
}

/// The Raft id of the node registered as `id`, if the id has one.
fn raft_id(id: &str) -> Option<u64> {
    crate::replicated::raft_id(&NodeId(id.to_string())).ok()
}

/// The registered node (id and name) whose Raft id is `raft`.
fn node_of_raft_id(registered: &Value, raft: u64) -> Option<(String, Option<String>)> {
    registered
        .as_object()?
        .iter()
        .find(|(id, _)| raft_id(id) == Some(raft))
        .map(|(id, rec)| (id.clone(), rec["name"].as_str().map(String::from)))
}

/// Remove a dead node from the cluster (Raft membership and the node list). Refused while
/// it is up or holds volumes, unless forced. A removed node must be wiped before it is
/// started again; it then joins as a new node.
#[utoipa::path(delete, path = "/api/v1/nodes/{id}", tag = "cluster", operation_id = "remove_node",
    params(("id" = String, Path), RemoveQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Removed), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Administrator>,
    Param(id): Param<String>,
    Q(q): Q<RemoveQuery>,
    n: Synced,
) -> Result<Json<Removed>, ApiError> {
    let force = q.force.unwrap_or(false);
    if read::<Value>(&n, NODES, &id)?.is_none() {
        return Err(ApiError::not_found(format!("no node {id}")));
    }
    if id == st.me.0 {
        return Err(ApiError::conflict(
            "a node cannot remove itself; ask another node",
        ));
    }
    let heard = st.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let state = health::state(heard.get(&id).map(|t| t.elapsed()));
    if state != "down" && !force {
        return Err(ApiError::conflict(format!(
            "node {id} is {state}; only a down node can be removed (force=true overrides)"
        )));
    }
    let volumes: Vec<String> = read_all::<crate::records::Volume>(&n, VOLUMES)?
        .into_iter()
        .filter(|(_, v)| v.node == id)
        .map(|(k, _)| k)
        .collect();
    if !volumes.is_empty() && !force {
        return Err(ApiError::conflict(format!(
            "node {id} holds volumes {}; they would be lost (force=true overrides)",
            volumes.join(", ")
        )));
    }
    let raft_id = crate::replicated::raft_id(&NodeId(id.clone()))
        .map_err(|e| ApiError::bad(e.to_string()))?;
    // A retry after the membership change went through but the record's removal did not
    // (the leader removed itself and stepped down before the next write) finishes the job.
    let member = n.is_member(raft_id);
    if member {
        n.remove_member(raft_id).await.map_err(|e| {
            // The membership change's own words name Raft internals: log them, answer plainly.
            tracing::warn!(node = %id, error = %e, "removing a node from the membership failed");
            ApiError::conflict(format!(
                "node {id} could not be removed from the cluster's membership now (another \
                 membership change may be in progress, or this node lost the leadership); try again"
            ))
        })?;
    }
    super::commit(
        &st,
        vec![],
        vec![
            super::del(NODES, &id),
            // Remembered so the removed node cannot enroll or join again with the join
            // secret alone: wiped, it comes back as a new node.
            super::put(
                tessera_state::network::admission::REMOVED_NODES,
                &tessera_state::network::cert_name(raft_id),
                serde_json::json!({ "node": id, "by": p.user, "removed_ms": crate::now_ms() }),
            ),
            super::events::event("node.remove", &id, &p.user, "node removed from the cluster"),
        ],
        |_| String::new(),
    )
    .await?;
    Ok(Json(Removed { removed: id }))
}
