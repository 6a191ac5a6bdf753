//! Virtual networks: definitions of the bridge (and VLAN on an uplink) that VMs' NICs
//! join. Setting them up on the nodes (netlink) comes with the networking issue; until
//! then they are definitions VMs refer to, and the API says so in `docs/api.md`.
//!
//! A VM attaching a network requires, in its transaction, that the network record is
//! unchanged; deleting a network first marks it `deleting` (so no VM can attach any
//! more), then, after a read barrier that shows every VM that attached before, deletes it
//! if none uses it or takes the mark back. No VM is left pointing at a deleted network.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tessera_state::Require;
use utoipa::ToSchema;

use super::auth::{authorize, Role};
use super::events::event;
use super::{
    all, body, check_name, commit, del, get, now_ms, path, put, synced, ApiError, ErrorBody, St,
};
use crate::records::{Network, Vm};

/// A new network.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNetwork {
    /// 1-63 of a-z, 0-9, '-'.
    name: String,
    /// Linux bridge name, 1-15 of a-z, 0-9, '-', '.', '_'.
    bridge: String,
    /// VLAN id 1-4094 (needs `uplink`).
    vlan: Option<u16>,
    /// Uplink interface name, 1-15 of a-z, 0-9, '-', '.', '_'.
    uplink: Option<String>,
}

fn check_ifname(field: &str, v: &str) -> Result<(), ApiError> {
    let ok = !v.is_empty()
        && v.len() <= 15
        && v.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{field}: an interface name, 1-15 of a-z, 0-9, '-', '.', '_'"
        )))
    }
}

/// List networks.
#[utoipa::path(get, path = "/api/v1/networks", tag = "networks",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Network]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn list(State(st): St, headers: HeaderMap) -> Result<axum::response::Response, ApiError> {
    super::list_all(&st, &headers, "networks").await
}

/// One network.
#[utoipa::path(get, path = "/api/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Network), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Network>, ApiError> {
    super::show_one(&st, &headers, name, "networks", "network").await
}

/// Define a network (administrators: networks are shared by every VM).
#[utoipa::path(post, path = "/api/v1/networks", tag = "networks", request_body = NewNetwork,
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = Network), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<NewNetwork>, JsonRejection>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let req = body(b)?;
    check_name("name", &req.name, &[])?;
    check_ifname("bridge", &req.bridge)?;
    if let Some(u) = &req.uplink {
        check_ifname("uplink", u)?;
    }
    if let Some(v) = req.vlan {
        if !(1..=4094).contains(&v) {
            return Err(ApiError::bad("vlan: must be 1 to 4094"));
        }
        if req.uplink.is_none() {
            return Err(ApiError::bad("vlan: needs an uplink"));
        }
    }
    let net = Network {
        name: req.name.clone(),
        bridge: req.bridge,
        vlan: req.vlan,
        uplink: req.uplink,
        deleting: false,
        created_ms: now_ms(),
    };
    let n = synced(&st).await?;
    if let Some((_, other)) = all::<Network>(&n, "networks")
        .into_iter()
        .find(|(_, o)| o.bridge == net.bridge)
    {
        return Err(ApiError::conflict(format!(
            "bridge: {} is already network {}",
            net.bridge, other.name
        )));
    }
    commit(
        &st,
        vec![Require::absent("networks", &net.name)],
        vec![
            put("networks", &net.name, &net),
            event("network.create", &net.name, &p.user, "network defined"),
        ],
        |_| format!("name: network {} already exists", req.name),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(net)))
}

/// Delete a network no VM uses.
#[utoipa::path(delete, path = "/api/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "Deleted"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let name = path(name)?;
    let n = synced(&st).await?;
    let old: Network = get(&n, "networks", &name)
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
        vec![Require::equals("networks", &name, json!(old))],
        vec![put("networks", &name, &marked)],
        |_| format!("network {name} changed meanwhile; try again"),
    )
    .await?;
    // Every VM that attached before the mark is visible after this barrier.
    let n = synced(&st).await?;
    let users: Vec<String> = all::<Vm>(&n, "vms")
        .into_iter()
        .filter(|(_, v)| v.networks.contains(&name))
        .map(|(k, _)| k)
        .collect();
    if !users.is_empty() {
        commit(
            &st,
            vec![Require::equals("networks", &name, json!(marked))],
            vec![put("networks", &name, &old)],
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
        vec![Require::equals("networks", &name, json!(marked))],
        vec![
            del("networks", &name),
            event("network.delete", &name, &p.user, "network deleted"),
        ],
        |_| format!("network {name} changed meanwhile"),
    )
    .await?;
    Ok(Json(json!({ "deleted": name })))
}
