//! Maintenance mode of a node: `POST /nodes/{id}/maintenance` turns it on or off
//! (Administrator). The record `maintenance/<node id>` is all there is to it: the
//! scheduler reads it (no new VMs there), the HA manager reads it and drains the node by
//! live migration (`crate::ha`), and `GET /nodes` shows it with the drain's progress.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tessera_api::{MaintenanceRequest, NodeMaintenance};
use tessera_state::Require;

use super::events::event;
use super::extract::{Administrator, Auth, Body, Param};
use super::{commit, del, now_ms, put, read, read_all, ApiError, ErrorBody, St};
use crate::migrate::Migration;
use crate::records::table::{MAINTENANCE, MIGRATIONS, NODES, VMS};
use crate::records::{DesiredState, Vm};

/// `maintenance/<node id>`: who put the node in maintenance, and when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Maintenance {
    /// The user.
    pub by: String,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
}

/// The ids of the nodes in maintenance, from the records of `n`.
pub fn nodes_on(n: &tessera_state::Node) -> Vec<String> {
    n.state.read(|t| {
        t.get(MAINTENANCE)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    })
}

/// The maintenance state of node `id` as `GET /nodes` shows it, from the records read:
/// `None` when it is not in maintenance.
pub fn state_of(
    id: &str,
    on: Option<&Maintenance>,
    vms: &[(String, Vm)],
    migrating: &[(String, Migration)],
) -> Option<NodeMaintenance> {
    let m = on?;
    let vms_left: Vec<String> = vms
        .iter()
        .filter(|(_, v)| {
            v.placed_on.as_deref() == Some(id) && v.desired_state != DesiredState::Stopped
        })
        .map(|(name, _)| name.clone())
        .collect();
    let moving = migrating
        .iter()
        .filter(|(vm, r)| r.from == id && vms_left.contains(vm))
        .map(|(vm, _)| vm.clone())
        .collect();
    Some(NodeMaintenance {
        by: m.by.clone(),
        since_ms: m.since_ms,
        drained: vms_left.is_empty(),
        vms_left,
        migrating: moving,
    })
}

/// Put a node in maintenance (its VMs are moved away by live migration, one at a time; it
/// takes no new VMs) or take it out (it takes VMs again; none moves back by itself).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/maintenance", tag = "cluster", operation_id = "set_node_maintenance",
    params(("id" = String, Path)), request_body = MaintenanceRequest,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = MaintenanceRequest, description = "The node's maintenance mode as it is now (asking for the state it is in already changes nothing); GET /api/v1/nodes shows the drain"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such node"),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn set(
    State(st): St,
    p: Auth<Administrator>,
    Param(id): Param<String>,
    Body(req): Body<MaintenanceRequest>,
) -> Result<Json<MaintenanceRequest>, ApiError> {
    let n = super::synced(&st).await?;
    let rec: Value =
        read(&n, NODES, &id)?.ok_or_else(|| ApiError::not_found(format!("no node {id}")))?;
    let name = rec["name"].as_str().unwrap_or(&id).to_string();
    let now: Option<Maintenance> = read(&n, MAINTENANCE, &id)?;
    if now.is_some() == req.enabled {
        return Ok(Json(req));
    }
    let (require, ops) = if req.enabled {
        let vms = read_all::<Vm>(&n, VMS)?;
        let running: Vec<String> = vms
            .iter()
            .filter(|(_, v)| {
                v.placed_on.as_deref() == Some(id.as_str())
                    && v.desired_state != DesiredState::Stopped
            })
            .map(|(k, _)| k.clone())
            .collect();
        let msg = if running.is_empty() {
            format!("node {name} in maintenance: no new VMs; none to move")
        } else {
            format!(
                "node {name} in maintenance: no new VMs; moving {} away by live migration",
                running.join(", ")
            )
        };
        let m = Maintenance {
            by: p.user.clone(),
            since_ms: now_ms(),
        };
        (
            vec![Require::absent(MAINTENANCE, &id)],
            vec![
                put(MAINTENANCE, &id, &m),
                event("node.maintenance", &id, &p.user, &msg),
            ],
        )
    } else {
        (
            vec![Require::equals(MAINTENANCE, &id, json!(now))],
            vec![
                del(MAINTENANCE, &id),
                event(
                    "node.maintenance",
                    &id,
                    &p.user,
                    &format!("node {name} out of maintenance: it takes VMs again"),
                ),
            ],
        )
    };
    commit(&st, require, ops, |_| {
        format!("node {name}'s maintenance mode changed meanwhile; look again")
    })
    .await?;
    Ok(Json(req))
}

/// Every maintenance record, for `GET /nodes` (none when unreadable: the node list must
/// stay readable).
pub fn all(n: &tessera_state::Node) -> Vec<(String, Maintenance)> {
    read_all(n, MAINTENANCE).unwrap_or_default()
}

/// Every migration under way, for `GET /nodes` (as [`all`]).
pub fn migrations(n: &tessera_state::Node) -> Vec<(String, Migration)> {
    read_all(n, MIGRATIONS).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, on: &str, state: &str) -> (String, Vm) {
        let v = json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "disks": [],
            "desired_state": state, "placed_on": on,
            "created_ms": 0, "updated_ms": 0, "generation": 1,
        });
        (name.into(), serde_json::from_value(v).unwrap())
    }

    #[test]
    fn the_drain_counts_what_should_run_on_the_node() {
        let m = Maintenance {
            by: "admin".into(),
            since_ms: 5,
        };
        let vms = [
            vm("a", "n1", "running"),
            vm("b", "n1", "stopped"),
            vm("c", "n2", "running"),
            vm("d", "n1", "paused"),
        ];
        assert_eq!(state_of("n1", None, &vms, &[]), None);
        let s = state_of("n1", Some(&m), &vms, &[]).unwrap();
        assert_eq!(s.vms_left, vec!["a", "d"]);
        assert!(!s.drained && s.migrating.is_empty());
        assert_eq!((s.by.as_str(), s.since_ms), ("admin", 5));
        let s = state_of("n3", Some(&m), &vms, &[]).unwrap();
        assert!(s.drained && s.vms_left.is_empty());
    }
}
