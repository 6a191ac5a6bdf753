//! VMs: definitions (create, list, show, update, delete) and their lifecycle (start,
//! stop, kill, reboot, pause, resume). A lifecycle request changes the VM's desired state
//! in the replicated state (a start also places it: `vmrun::scheduler`); the node it is
//! placed on carries it out (`vmrun`) and reports `vm_status/<name>`, which `GET` merges
//! in as `actual_state`, `state_reason` and `running_on`.
//!
//! A VM claims its volumes (`disk_claims/<volume>` = VM) in the same transaction that
//! creates or changes it, so a volume is attached to at most one VM and cannot be deleted
//! while attached. Updates are compare-and-swap on the whole record: two concurrent
//! updates cannot silently overwrite each other.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::Json;
use serde_json::json;
use tessera_api::limits::{MAX_DISKS, MAX_KERNEL_CHARS, MAX_NETWORKS, MEMORY_MIB, VCPUS};
use tessera_api::{Deleted, VmState, VmStatus, VmUpdate};
use tessera_state::Require;

use super::events::event;
use super::extract::{Auditor, Auth, Body, Operator, Param, Synced};
use super::vm_actions::start_fields;
use super::{check_name, commit, del, now_ms, put, read, ApiError, ErrorBody, St};
use crate::images::IMAGES;
use crate::records::table::{DISK_CLAIMS, NETWORKS, NODES, SNAPSHOTS, VMS, VOLUMES};
use crate::records::{DesiredState, Network, Vm, Volume, VolumeState};
use crate::vmrun::VM_STATUS;
use tessera_api::Image;

mod create;
mod template;

pub use create::{__path_create, create};
pub use template::{__path_template, template};

/// Checks the fields of a VM against the rules and the cluster state. What the request
/// names but the cluster lacks (a volume, a network, a node) is 404.
fn validate(n: &tessera_state::Node, vm: &Vm) -> Result<(), ApiError> {
    if !VCPUS.contains(&vm.vcpus) {
        return Err(ApiError::bad("vcpus: must be 1 to 32"));
    }
    if !MEMORY_MIB.contains(&vm.memory_mib) {
        return Err(ApiError::bad("memory_mib: must be 16 to 1048576"));
    }
    if vm.disks.len() > MAX_DISKS {
        return Err(ApiError::bad("disks: at most 16"));
    }
    let unique: BTreeSet<&String> = vm.disks.iter().collect();
    if unique.len() != vm.disks.len() {
        return Err(ApiError::bad("disks: a volume is listed twice"));
    }
    if vm.networks.len() > MAX_NETWORKS {
        return Err(ApiError::bad("networks: at most 8"));
    }
    if let Some(k) = &vm.kernel {
        if k.is_empty() || k.chars().count() > MAX_KERNEL_CHARS || !k.starts_with('/') {
            return Err(ApiError::bad(
                "kernel: an absolute path of at most 4096 characters",
            ));
        }
    }
    if vm
        .cmdline
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_KERNEL_CHARS)
    {
        return Err(ApiError::bad("cmdline: at most 4096 characters"));
    }
    for d in &vm.disks {
        let v: Volume = read(n, VOLUMES, d)?
            .ok_or_else(|| ApiError::not_found(format!("disks: no volume {d}")))?;
        if v.state != VolumeState::Ready {
            return Err(ApiError::conflict(format!(
                "disks: volume {d} is not ready"
            )));
        }
        if let Some(owner) = read::<String>(n, DISK_CLAIMS, d)? {
            if owner != vm.name {
                return Err(ApiError::conflict(format!(
                    "disks: volume {d} is attached to VM {owner}"
                )));
            }
        }
    }
    for net in &vm.networks {
        let rec: Network = read(n, NETWORKS, net)?
            .ok_or_else(|| ApiError::not_found(format!("networks: no network {net}")))?;
        if rec.deleting {
            return Err(ApiError::conflict(format!(
                "networks: network {net} is being deleted"
            )));
        }
    }
    if let Some(img) = &vm.image {
        check_name("image", img, &[])?;
        match read::<Image>(n, IMAGES, img)? {
            None => return Err(ApiError::not_found(format!("image: no image {img}"))),
            Some(i) if i.deleting => {
                return Err(ApiError::conflict(format!(
                    "image: image {img} is being deleted"
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(node) = &vm.node {
        if read::<serde_json::Value>(n, NODES, node)?.is_none() {
            return Err(ApiError::not_found(format!(
                "node: no node {node} in the cluster"
            )));
        }
    }
    Ok(())
}

/// The cluster's id (the MAC prefix is derived from it); 503 before this node knows it.
pub(super) fn cluster_id(st: &super::ApiState) -> Result<String, ApiError> {
    st.cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| ApiError::unavailable("the cluster id is not known yet; try again"))
}

/// The VM as a client sees it: its record with the state its node reports.
pub(super) fn with_status(n: &tessera_state::Node, mut vm: Vm) -> Result<Vm, ApiError> {
    let status: Option<VmStatus> = read(n, VM_STATUS, &vm.name)?;
    let meant_to_run = vm.desired_state != DesiredState::Stopped;
    match status {
        // The node has not taken up the latest start yet.
        Some(s) if meant_to_run && (s.start_seq < vm.start_seq) => {
            vm.actual_state = VmState::Starting;
            vm.running_on = None;
        }
        Some(s) => {
            vm.actual_state = s.state;
            vm.state_reason = s.reason;
            // What a node that is down last said is not what its VM does now.
            if let Some(why) = crate::ha::reporter_down(&s.node, s.state) {
                vm.actual_state = VmState::Unknown;
                vm.state_reason = Some(why);
            }
            vm.running_on = Some(s.node);
        }
        None if meant_to_run => vm.actual_state = VmState::Starting,
        None => vm.actual_state = VmState::Stopped,
    }
    Ok(vm)
}

/// Whether the VM's node reports it crashed (its restart policy gave up).
pub(super) fn crashed(n: &tessera_state::Node, name: &str) -> Result<bool, ApiError> {
    Ok(read::<VmStatus>(n, VM_STATUS, name)?.is_some_and(|s| s.state == VmState::Crashed))
}

/// Whether a VMM may still run for the VM (its node has not reported it ended).
pub(super) fn may_run(n: &tessera_state::Node, name: &str) -> Result<bool, ApiError> {
    Ok(read::<VmStatus>(n, VM_STATUS, name)?.is_some_and(|s| {
        matches!(
            s.state,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }))
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms", operation_id = "get_vm",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Vm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    _: Auth<Auditor>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Vm>, ApiError> {
    let vm: Vm =
        read(&n, VMS, &name)?.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    with_status(&n, vm).map(Json)
}

/// Each network must be unchanged when the VM commits: a network marked for deletion
/// meanwhile makes the commit fail (see `networks.rs`).
fn network_requirements(n: &tessera_state::Node, vm: &Vm) -> Vec<Require> {
    vm.networks
        .iter()
        .filter_map(|net| {
            n.state
                .read(|t| t.get(NETWORKS).and_then(|t| t.get(net)).cloned())
                .map(|rec| Require::equals(NETWORKS, net, rec))
        })
        .collect()
}

/// The image must be unchanged (not marked for deletion) when the VM commits.
fn image_requirement(n: &tessera_state::Node, vm: &Vm) -> Option<Require> {
    let img = vm.image.as_ref()?;
    n.state
        .read(|t| t.get(IMAGES).and_then(|t| t.get(img)).cloned())
        .map(|rec| Require::equals(IMAGES, img, rec))
}

/// Words a refused VM commit by the requirement that failed.
fn refusal(r: &Require, vm_changed: String) -> String {
    if r.table == VMS {
        vm_changed
    } else if crate::vmrun::reservation::raced(r) {
        crate::vmrun::reservation::raced_message(r)
    } else if r.table == IMAGES {
        format!("image: image {} changed or is being deleted", r.key)
    } else if r.table == SNAPSHOTS {
        format!(
            "from: the template's snapshot {} was deleted meanwhile",
            r.key
        )
    } else if r.table == super::nics::MAC_CLAIMS {
        format!("nics: MAC {} is another NIC's (in this cluster)", r.key)
    } else if r.table == NETWORKS {
        format!("networks: network {} changed or is being deleted", r.key)
    } else {
        format!("disks: volume {} was deleted or attached meanwhile", r.key)
    }
}

/// Change a VM's definition or desired state.
#[utoipa::path(patch, path = "/api/v1/vms/{name}", tag = "vms", operation_id = "update_vm",
    params(("name" = String, Path)), request_body = VmUpdate,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Vm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn update(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    n: Synced,
    Body(req): Body<VmUpdate>,
) -> Result<Json<Vm>, ApiError> {
    let old: Vm =
        read(&n, VMS, &name)?.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    if let Some(g) = req.generation.filter(|g| *g != old.generation) {
        return Err(ApiError::conflict(format!(
            "generation: the VM is at generation {}, not {g}",
            old.generation
        )));
    }
    if old.template && (req.disks.is_some() || req.desired_state.is_some()) {
        return Err(ApiError::conflict(format!(
            "VM {name} is a template: its disks and state stay as they are"
        )));
    }
    let mut vm = old.clone();
    vm.vcpus = req.vcpus.unwrap_or(vm.vcpus);
    vm.memory_mib = req.memory_mib.unwrap_or(vm.memory_mib);
    if let Some(d) = req.disks {
        vm.disks = d;
    }
    if req.networks.is_some() || req.nics.is_some() {
        let wanted = super::nics::requested(
            req.networks.as_deref().unwrap_or_default(),
            req.nics.as_deref().unwrap_or_default(),
        )?;
        let taken = super::nics::taken(&n);
        super::nics::set(&mut vm, &wanted, &old.nics, &cluster_id(&st)?, &taken)?;
    }
    if req.kernel.is_some() {
        vm.kernel = req.kernel;
    }
    if req.cmdline.is_some() {
        vm.cmdline = req.cmdline;
    }
    if req.image.is_some() {
        vm.image = req.image;
    }
    if req.node.is_some() {
        vm.node = req.node;
    }
    if req.stop_timeout_s.is_some() {
        vm.stop_timeout_s = req.stop_timeout_s;
    }
    if let Some(r) = req.restart_policy {
        vm.restart_policy = r;
    }
    vm.ha = req.ha.unwrap_or(vm.ha);
    vm.priority = req.priority.unwrap_or(vm.priority);
    vm.generation += 1;
    vm.updated_ms = now_ms();
    validate(&n, &vm)?;
    let held = match (old.desired_state, req.desired_state) {
        (DesiredState::Stopped, Some(d)) if d != DesiredState::Stopped => {
            Some(start_fields(&st, &n, &mut vm, d)?)
        }
        (_, Some(d)) => {
            vm.desired_state = d;
            vm.force_stop = false;
            None
        }
        (_, None) => None,
    };
    let mut require = vec![Require::equals(VMS, &name, json!(old))];
    let mut ops = vec![put(VMS, &name, &vm)];
    // A start placed on another node retires the last node's writer record.
    ops.extend(crate::vmrun::writer_key::retire_moved(&old, &vm));
    if let Some(h) = held {
        h.into_txn(&mut require, &mut ops);
    }
    for d in vm.disks.iter().filter(|d| !old.disks.contains(d)) {
        require.push(Require::exists(VOLUMES, d));
        require.push(Require::absent(DISK_CLAIMS, d));
        ops.push(put(DISK_CLAIMS, d, &name));
    }
    for d in old.disks.iter().filter(|d| !vm.disks.contains(d)) {
        ops.push(del(DISK_CLAIMS, d));
    }
    if vm.nics != old.nics {
        let (mac_req, mac_ops) = super::nics::claims(&name, &old.nics, &vm.nics);
        require.extend(mac_req);
        ops.extend(mac_ops);
    }
    require.extend(network_requirements(&n, &vm));
    require.extend(image_requirement(&n, &vm));
    ops.push(event(
        "vm.update",
        &name,
        &p.user,
        &format!("VM changed (generation {})", vm.generation),
    ));
    commit(&st, require, ops, |r| {
        refusal(
            r,
            format!("VM {name} changed meanwhile; fetch it and try again"),
        )
    })
    .await?;
    Ok(Json(vm))
}

/// Delete a VM definition (its volumes are detached, not deleted).
#[utoipa::path(delete, path = "/api/v1/vms/{name}", tag = "vms", operation_id = "delete_vm",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Deleted>, ApiError> {
    let old: Vm =
        read(&n, VMS, &name)?.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    if old.desired_state != DesiredState::Stopped || may_run(&n, &name)? {
        return Err(ApiError::conflict(format!(
            "VM {name} is running (or not yet reported stopped); stop it first"
        )));
    }
    let mut ops = vec![del(VMS, &name), del(VM_STATUS, &name)];
    ops.extend(crate::vmrun::writer_key::delete_all(&n, &name));
    ops.extend(old.disks.iter().map(|d| del(DISK_CLAIMS, d)));
    ops.extend(super::nics::claims(&name, &old.nics, &[]).1);
    ops.push(event("vm.delete", &name, &p.user, "VM deleted"));
    commit(
        &st,
        vec![Require::equals(VMS, &name, json!(old))],
        ops,
        |_| format!("VM {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(Deleted { deleted: name }))
}
