//! Virtual networks: definitions of the bridge (and VLAN on an uplink) that VMs' NICs
//! join. Every node sets them up (`netrun`) and reports how in `network_status/<node>`,
//! which `GET` shows per node (`nodes`).
//!
//! A VM attaching a network requires, in its transaction, that the network record is
//! unchanged; deleting a network first marks it `deleting` (so no VM can attach any
//! more), then, after a read barrier that shows every VM that attached before, deletes it
//! if none uses it or takes the mark back. No VM is left pointing at a deleted network.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use tessera_api::{Deleted, NewNetwork};
use tessera_state::Require;

use super::events::event;
use super::extract::{Administrator, Auditor, Auth, Body, IdempotencyKey, Param, Synced};
use super::tasks::{commit_idempotent, Idempotent};
use super::{check_name, commit, del, now_ms, put, read, read_all, ApiError, ErrorBody, St};
use crate::records::table::{NETWORKS, VMS};
use crate::records::{Network, Vm};

fn check_ifname(field: &str, v: &str) -> Result<(), ApiError> {
    if tessera_api::limits::is_ifname(v) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{field}: an interface name, 1-15 of a-z, 0-9, '-', '.', '_'"
        )))
    }
}

/// List networks.
#[utoipa::path(get, path = "/api/v1/networks", tag = "networks", operation_id = "list_networks",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Network]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(_: Auth<Auditor>, n: Synced) -> Result<Json<Vec<Network>>, ApiError> {
    let nets = read_all::<Network>(&n, NETWORKS)?;
    Ok(Json(
        nets.into_iter()
            .map(|(_, net)| with_nodes(&n, net))
            .collect(),
    ))
}

/// The network with how each node last reported setting it up.
fn with_nodes(n: &tessera_state::Node, mut net: Network) -> Network {
    net.nodes = crate::netrun::on_nodes(n, &net.name);
    net
}

/// One network.
#[utoipa::path(get, path = "/api/v1/networks/{name}", tag = "networks",
    operation_id = "get_network",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Network), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    _: Auth<Auditor>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Network>, ApiError> {
    let net: Json<Network> = super::show_one(&n, NETWORKS, &name, "network")?;
    Ok(Json(with_nodes(&n, net.0)))
}

/// Define a network (administrators: networks are shared by every VM). A `vlan` needs an
/// `uplink` (409 without one: the VLAN has nothing to tag).
#[utoipa::path(post, path = "/api/v1/networks", tag = "networks", operation_id = "create_network",
    request_body = NewNetwork,
    params(("Idempotency-Key" = Option<String>, Header,
        min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        description = "Makes a retry safe: the same key and body get the first answer")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = Network), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    p: Auth<Administrator>,
    IdempotencyKey(key): IdempotencyKey,
    Body(req): Body<NewNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    let idem = key.map(|k| {
        let what = ("network", &req.name, &req.bridge, req.vlan, &req.uplink);
        Idempotent::new(&p.user, &k, &what)
    });
    check_name("name", &req.name, &[])?;
    check_ifname("bridge", &req.bridge)?;
    if let Some(u) = &req.uplink {
        check_ifname("uplink", u)?;
    }
    if let Some(v) = req.vlan {
        if !tessera_api::limits::VLAN.contains(&v) {
            return Err(ApiError::bad("vlan: must be 1 to 4094"));
        }
        if req.uplink.is_none() {
            return Err(ApiError::conflict("vlan: needs an uplink"));
        }
    }
    let net = Network {
        name: req.name.clone(),
        bridge: req.bridge,
        vlan: req.vlan,
        uplink: req.uplink,
        deleting: false,
        created_ms: now_ms(),
        nodes: Default::default(),
    };
    let n = super::synced(&st).await?;
    if let Some(first) = idem
        .as_ref()
        .map(|i| i.replay_answer(&n))
        .transpose()?
        .flatten()
    {
        return Ok((StatusCode::CREATED, Json(first)));
    }
    if let Some((_, other)) = read_all::<Network>(&n, NETWORKS)?
        .into_iter()
        .find(|(_, o)| o.bridge == net.bridge)
    {
        return Err(ApiError::conflict(format!(
            "bridge: {} is already network {}",
            net.bridge, other.name
        )));
    }
    let ops = vec![
        put(NETWORKS, &net.name, &net),
        event("network.create", &net.name, &p.user, "network defined"),
    ];
    let require = vec![Require::absent(NETWORKS, &net.name)];
    let net = commit_idempotent(&st, net, idem.as_ref(), require, ops, |_| {
        format!("name: network {} already exists", req.name)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(net)))
}

/// Delete a network no VM uses.
#[utoipa::path(delete, path = "/api/v1/networks/{name}", tag = "networks",
    operation_id = "delete_network",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Administrator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Deleted>, ApiError> {
    let old: Network = read(&n, NETWORKS, &name)?
        .ok_or_else(|| ApiError::not_found(format!("no network {name}")))?;
    if old.deleting {
        return Err(ApiError::conflict(format!(
            "network {name} is being deleted"
        )));
    }
    let mut marked = old.clone();
    marked.deleting = true;
    commit(
        &st,
        vec![Require::equals(NETWORKS, &name, json!(old))],
        vec![put(NETWORKS, &name, &marked)],
        |_| format!("network {name} changed meanwhile; try again"),
    )
    .await?;
    // Every VM that attached before the mark is visible after this barrier.
    let n = super::synced(&st).await?;
    let users: Vec<String> = read_all::<Vm>(&n, VMS)?
        .into_iter()
        .filter(|(_, v)| v.networks.contains(&name))
        .map(|(k, _)| k)
        .collect();
    if !users.is_empty() {
        commit(
            &st,
            vec![Require::equals(NETWORKS, &name, json!(marked))],
            vec![put(NETWORKS, &name, &old)],
            |_| String::new(),
        )
        .await?;
        return Err(ApiError::conflict(format!(
            "network {name} is used by VMs {}",
            users.join(", ")
        )));
    }
    commit(
        &st,
        vec![Require::equals(NETWORKS, &name, json!(marked))],
        vec![
            del(NETWORKS, &name),
            event("network.delete", &name, &p.user, "network deleted"),
        ],
        |_| format!("network {name} changed meanwhile"),
    )
    .await?;
    Ok(Json(Deleted { deleted: name }))
}
