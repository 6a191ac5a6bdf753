//! VM definitions: create, list, show, update, delete, with a desired state. Running them
//! on a node comes with VM orchestration; until then `actual_state` stays `stopped` and
//! the API says so instead of pretending.
//!
//! A VM claims its volumes (`disk_claims/<volume>` = VM) in the same transaction that
//! creates or changes it, so a volume is attached to at most one VM and cannot be deleted
//! while attached. Updates are compare-and-swap on the whole record: two concurrent
//! updates cannot silently overwrite each other.

use std::collections::BTreeSet;

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
    body, check_name, commit, del, get, now_ms, path, put, synced, ApiError, ErrorBody, St,
};
use crate::records::{DesiredState, Vm, Volume, VolumeState};

const MAX_DISKS: usize = 16;

/// A new VM.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVm {
    /// 1-63 of a-z, 0-9, '-'.
    name: String,
    /// 1-32.
    vcpus: u32,
    /// 16-1048576.
    memory_mib: u64,
    /// Volume names (at most 16), each attached to no other VM.
    #[serde(default)]
    disks: Vec<String>,
    /// Network names (at most 8), one NIC each.
    #[serde(default)]
    networks: Vec<String>,
    /// Kernel image path on the node.
    kernel: Option<String>,
    /// Kernel command line (at most 4096 bytes).
    cmdline: Option<String>,
    /// Pin to this node.
    node: Option<String>,
    /// Default `stopped`.
    desired_state: Option<DesiredState>,
}

/// Changes to a VM; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmUpdate {
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    disks: Option<Vec<String>>,
    networks: Option<Vec<String>>,
    kernel: Option<String>,
    cmdline: Option<String>,
    node: Option<String>,
    desired_state: Option<DesiredState>,
    /// If given, the update applies only to this generation (optimistic locking).
    generation: Option<u64>,
}

/// Checks the fields of a VM against the rules and the cluster state.
fn validate(n: &tessera_state::Node, vm: &Vm) -> Result<(), ApiError> {
    if !(1..=32).contains(&vm.vcpus) {
        return Err(ApiError::bad("vcpus: must be 1 to 32"));
    }
    if !(16..=1 << 20).contains(&vm.memory_mib) {
        return Err(ApiError::bad("memory_mib: must be 16 to 1048576"));
    }
    if vm.disks.len() > MAX_DISKS {
        return Err(ApiError::bad("disks: at most 16"));
    }
    let unique: BTreeSet<&String> = vm.disks.iter().collect();
    if unique.len() != vm.disks.len() {
        return Err(ApiError::bad("disks: a volume is listed twice"));
    }
    for d in &vm.disks {
        let v: Volume =
            get(n, "volumes", d).ok_or_else(|| ApiError::bad(format!("disks: no volume {d}")))?;
        if v.state != VolumeState::Ready {
            return Err(ApiError::conflict(format!(
                "disks: volume {d} is not ready"
            )));
        }
        if let Some(owner) = get::<String>(n, "disk_claims", d) {
            if owner != vm.name {
                return Err(ApiError::conflict(format!(
                    "disks: volume {d} is attached to VM {owner}"
                )));
            }
        }
    }
    if vm.networks.len() > 8 {
        return Err(ApiError::bad("networks: at most 8"));
    }
    for net in &vm.networks {
        let rec: crate::records::Network = get(n, "networks", net)
            .ok_or_else(|| ApiError::bad(format!("networks: no network {net}")))?;
        if rec.deleting {
            return Err(ApiError::conflict(format!(
                "networks: network {net} is being deleted"
            )));
        }
    }
    if let Some(k) = &vm.kernel {
        if k.is_empty() || k.len() > 4096 || !k.starts_with('/') {
            return Err(ApiError::bad(
                "kernel: an absolute path of at most 4096 bytes",
            ));
        }
    }
    if vm.cmdline.as_ref().is_some_and(|c| c.len() > 4096) {
        return Err(ApiError::bad("cmdline: at most 4096 bytes"));
    }
    if let Some(node) = &vm.node {
        if get::<serde_json::Value>(n, "nodes", node).is_none() {
            return Err(ApiError::bad(format!(
                "node: no node {node} in the cluster"
            )));
        }
    }
    Ok(())
}

/// List VMs.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Vm]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn list(State(st): St, headers: HeaderMap) -> Result<axum::response::Response, ApiError> {
    super::list_all(&st, &headers, "vms").await
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Vm), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Vm>, ApiError> {
    super::show_one(&st, &headers, name, "vms", "VM").await
}

fn claims(vm: &Vm) -> impl Iterator<Item = &String> {
    vm.disks.iter()
}

/// Each network must be unchanged when the VM commits: a network marked for deletion
/// meanwhile makes the commit fail (see `networks.rs`).
fn network_requirements(n: &tessera_state::Node, vm: &Vm) -> Vec<Require> {
    vm.networks
        .iter()
        .filter_map(|net| {
            n.state
                .read(|t| t.get("networks").and_then(|t| t.get(net)).cloned())
                .map(|rec| Require::equals("networks", net, rec))
        })
        .collect()
}

/// Define a VM.
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = NewVm,
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = Vm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<NewVm>, JsonRejection>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let req = body(b)?;
    check_name("name", &req.name, &[])?;
    let now = now_ms();
    let vm = Vm {
        name: req.name,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        disks: req.disks,
        networks: req.networks,
        kernel: req.kernel,
        cmdline: req.cmdline,
        node: req.node,
        desired_state: req.desired_state.unwrap_or(DesiredState::Stopped),
        actual_state: DesiredState::Stopped,
        generation: 1,
        created_ms: now,
        updated_ms: now,
    };
    let n = synced(&st).await?;
    validate(&n, &vm)?;
    let mut require = vec![Require::absent("vms", &vm.name)];
    let mut ops = vec![put("vms", &vm.name, &vm)];
    for d in claims(&vm) {
        require.push(Require::exists("volumes", d));
        require.push(Require::absent("disk_claims", d));
        ops.push(put("disk_claims", d, &vm.name));
    }
    require.extend(network_requirements(&n, &vm));
    ops.push(event("vm.create", &vm.name, &p.user, "VM defined"));
    commit(&st, require, ops, |r| {
        if r.table == "vms" {
            format!("name: VM {} already exists", vm.name)
        } else if r.table == "networks" {
            format!("networks: network {} changed or is being deleted", r.key)
        } else {
            format!("disks: volume {} was deleted or attached meanwhile", r.key)
        }
    })
    .await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Change a VM's definition or desired state.
#[utoipa::path(patch, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path)), request_body = VmUpdate,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Vm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    b: Result<Json<VmUpdate>, JsonRejection>,
) -> Result<Json<Vm>, ApiError> {
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let name = path(name)?;
    let req = body(b)?;
    let n = synced(&st).await?;
    let old: Vm =
        get(&n, "vms", &name).ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    if req.generation.is_some_and(|g| g != old.generation) {
        return Err(ApiError::conflict(format!(
            "generation: the VM is at generation {}, not {}",
            old.generation,
            req.generation.unwrap_or_default()
        )));
    }
    let mut vm = old.clone();
    vm.vcpus = req.vcpus.unwrap_or(vm.vcpus);
    vm.memory_mib = req.memory_mib.unwrap_or(vm.memory_mib);
    if let Some(d) = req.disks {
        vm.disks = d;
    }
    if let Some(nets) = req.networks {
        vm.networks = nets;
    }
    if req.kernel.is_some() {
        vm.kernel = req.kernel;
    }
    if req.cmdline.is_some() {
        vm.cmdline = req.cmdline;
    }
    if req.node.is_some() {
        vm.node = req.node;
    }
    vm.desired_state = req.desired_state.unwrap_or(vm.desired_state);
    vm.generation += 1;
    vm.updated_ms = now_ms();
    validate(&n, &vm)?;
    let mut require = vec![Require::equals("vms", &name, json!(old))];
    let mut ops = vec![put("vms", &name, &vm)];
    for d in vm.disks.iter().filter(|d| !old.disks.contains(d)) {
        require.push(Require::exists("volumes", d));
        require.push(Require::absent("disk_claims", d));
        ops.push(put("disk_claims", d, &name));
    }
    for d in old.disks.iter().filter(|d| !vm.disks.contains(d)) {
        ops.push(del("disk_claims", d));
    }
    require.extend(network_requirements(&n, &vm));
    ops.push(event(
        "vm.update",
        &name,
        &p.user,
        &format!("VM changed (generation {})", vm.generation),
    ));
    commit(&st, require, ops, |r| {
        if r.table == "vms" {
            format!("VM {name} changed meanwhile; fetch it and try again")
        } else if r.table == "networks" {
            format!("networks: network {} changed or is being deleted", r.key)
        } else {
            format!("disks: volume {} was deleted or attached meanwhile", r.key)
        }
    })
    .await?;
    Ok(Json(vm))
}

/// Delete a VM definition (its volumes are detached, not deleted).
#[utoipa::path(delete, path = "/api/v1/vms/{name}", tag = "vms",
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
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let name = path(name)?;
    let n = synced(&st).await?;
    let old: Vm =
        get(&n, "vms", &name).ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    if old.desired_state == DesiredState::Running {
        return Err(ApiError::conflict(format!(
            "VM {name} should be running; set desired_state to stopped first"
        )));
    }
    let mut ops = vec![del("vms", &name)];
    ops.extend(old.disks.iter().map(|d| del("disk_claims", d)));
    ops.push(event("vm.delete", &name, &p.user, "VM deleted"));
    commit(
        &st,
        vec![Require::equals("vms", &name, json!(old))],
        ops,
        |_| format!("VM {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(json!({ "deleted": name })))
}
