//! The cluster (id, leader, members) and its nodes (address, health, metrics).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::auth::{authorize, Role};
use super::{node, synced, ApiError, ErrorBody, St};
use crate::health;

/// A Raft member.
#[derive(Serialize, ToSchema)]
pub struct Member {
    /// Raft id.
    raft_id: u64,
    /// Raft address.
    address: String,
    /// Voter (true) or learner.
    voter: bool,
}

/// The cluster as this node sees it.
#[derive(Serialize, ToSchema)]
pub struct ClusterStatus {
    /// Set at formation.
    cluster_id: Option<String>,
    /// The Raft leader's id, if one is elected.
    leader: Option<u64>,
    /// The Raft term.
    term: u64,
    /// Voters' Raft ids.
    voters: Vec<u64>,
    /// Every member.
    members: Vec<Member>,
    /// The node that answered.
    answered_by: String,
}

/// Cluster status: id, leader, term and members.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = ClusterStatus), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn cluster(State(st): St, headers: HeaderMap) -> Result<Json<ClusterStatus>, ApiError> {
    authorize(&st, &headers, Role::Auditor, false).await?;
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
    Ok(Json(ClusterStatus {
        cluster_id,
        leader: m.current_leader,
        term: m.current_term,
        voters,
        members,
        answered_by: st.me.0.clone(),
    }))
}

/// A node of the cluster.
#[derive(Serialize, ToSchema)]
pub struct NodeInfo {
    /// Node id.
    id: String,
    /// Management address.
    address: Value,
    /// `up`, `suspect` or `down`, as seen by the node that answered.
    state: String,
    /// The node's latest published metrics (CPU, memory, load, disks), if any.
    #[schema(value_type = Object)]
    metrics: Value,
}

/// Nodes with their health and metrics, as this node sees them (answers without quorum).
#[utoipa::path(get, path = "/api/v1/nodes", tag = "cluster",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [NodeInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn nodes(State(st): St, headers: HeaderMap) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    authorize(&st, &headers, Role::Auditor, false).await?;
    // This node's own view, without a read barrier: health must be readable while the
    // cluster has no leader (a partition, an election), which is when it matters most.
    let n = node(&st)?;
    let registered = n
        .state
        .read(|t| json!(t.get("nodes").cloned().unwrap_or_default()));
    let heard = st.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let health = health::report(&st.me.0, &registered, &heard);
    let mut out = Vec::new();
    if let Some(obj) = registered.as_object() {
        for (id, rec) in obj {
            let (state, metrics) = if *id == st.me.0 {
                let m = st.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
                ("up".to_string(), m)
            } else {
                (
                    health[id]["state"].as_str().unwrap_or("down").to_string(),
                    rec["metrics"].clone(),
                )
            };
            out.push(NodeInfo {
                id: id.clone(),
                address: rec["address"].clone(),
                state,
                metrics,
            });
        }
    }
    Ok(Json(out))
}

/// How to remove a node.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Remove even if the node looks up or still holds volumes.
    force: Option<bool>,
}

/// Remove a dead node from the cluster (Raft membership and the node list). Refused while
/// it is up or holds volumes, unless forced. A removed node must be wiped before it is
/// started again; it then joins as a new node.
#[utoipa::path(delete, path = "/api/v1/nodes/{id}", tag = "cluster",
    params(("id" = String, Path), RemoveQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "Removed"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    headers: HeaderMap,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    q: Result<axum::extract::Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let id = super::path(id)?;
    let axum::extract::Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let force = q.force.unwrap_or(false);
    let n = synced(&st).await?;
    if super::get::<Value>(&n, "nodes", &id).is_none() {
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
    let volumes: Vec<String> = super::all::<crate::records::Volume>(&n, "volumes")
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
    let raft_id = crate::replicated::raft_id(&tessera_cluster::identity::NodeId(id.clone()))
        .map_err(|e| ApiError::bad(e.to_string()))?;
    n.remove_member(raft_id)
        .await
        .map_err(|e| ApiError::conflict(format!("Raft refused: {e}")))?;
    super::commit(
        &st,
        vec![],
        vec![
            super::del("nodes", &id),
            super::events::event("node.remove", &id, &p.user, "node removed from the cluster"),
        ],
        |_| String::new(),
    )
    .await?;
    Ok(Json(json!({ "removed": id })))
}
