//! Templates: `POST /vms/{name}/template` snapshots a stopped VM's disks, and the clone
//! of a template's disk that a VM created `from` it gets.

use axum::extract::State;
use axum::Json;
use serde_json::json;
use tessera_state::{Command, Require};

use super::{may_run, with_status};
use crate::api::auth::Principal;
use crate::api::events::event;
use crate::api::extract::{Auth, Operator, Param, Synced};
use crate::api::{commit, now_ms, put, read, ApiError, ErrorBody, St};
use crate::records::table::{SNAPSHOTS, TASKS, VMS, VOLUMES};
use crate::records::{snapshot_key, DesiredState, Snapshot, Task, Vm, Volume, VolumeState};

/// The snapshot of each of a template's disks that VMs created from it are cloned from.
pub const TEMPLATE_SNAPSHOT: &str = "template";

/// What a template's disk `disk` cloned into `clone` takes: the clone task on the disk's
/// primary node, and the requirements and records to commit with it (not yet committed;
/// the task not included). The same plan as `POST /volumes/{disk}/clone`, so a replicated
/// disk gets a clone with the same copies, replicated from birth.
pub(super) fn template_clone(
    p: &Principal,
    n: &tessera_state::Node,
    disk: &str,
    clone: &str,
) -> Result<(Task, Vec<Require>, Vec<Command>), ApiError> {
    if read::<Volume>(n, VOLUMES, disk)?.is_none() {
        return Err(ApiError::not_found(format!(
            "from: the template's volume {disk} is gone"
        )));
    }
    let key = snapshot_key(disk, TEMPLATE_SNAPSHOT);
    let snap: Option<Snapshot> = read(n, SNAPSHOTS, &key)?;
    if snap.is_none_or(|s| s.state != VolumeState::Ready) {
        return Err(ApiError::conflict(format!(
            "from: the template's snapshot {key} is not ready yet; try again shortly"
        )));
    }
    crate::api::volumes::clone_plan(p, n, disk, TEMPLATE_SNAPSHOT, clone)
        .map_err(|ApiError(code, msg, outcome)| ApiError(code, format!("from: {msg}"), outcome))
}

/// Make a stopped VM a template: it can no longer be started, and each of its disks gets
/// a snapshot `template` (a task each) that VMs created `from` it are cloned from. Its
/// disks stay attached to it, so nothing else writes them.
#[utoipa::path(post, path = "/api/v1/vms/{name}/template", tag = "vms", operation_id = "make_vm_template",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Vm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM runs, is a template already, or a disk is busy"),
        (status = 503, body = ErrorBody)))]
pub async fn template(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Vm>, ApiError> {
    let old: Vm =
        read(&n, VMS, &name)?.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    if old.template {
        return Err(ApiError::conflict(format!(
            "VM {name} is a template already"
        )));
    }
    if old.desired_state != DesiredState::Stopped || may_run(&n, &name)? {
        return Err(ApiError::conflict(format!(
            "VM {name} is running (or not yet reported stopped); stop it first"
        )));
    }
    let mut vm = old.clone();
    vm.template = true;
    vm.generation += 1;
    vm.updated_ms = now_ms();
    let mut require = vec![Require::equals(VMS, &name, json!(old))];
    let mut ops = vec![put(VMS, &name, &vm)];
    for d in &vm.disks {
        // The same snapshot path as `POST /volumes/{d}/snapshots`: what it refuses (a
        // replicated volume, today) a template refuses too, instead of snapshotting one
        // copy only.
        let (task, req, snap_ops) =
            crate::api::volumes::snapshot_plan(&p, &n, d, TEMPLATE_SNAPSHOT).map_err(
                |ApiError(code, msg, outcome)| ApiError(code, format!("disks: {msg}"), outcome),
            )?;
        require.extend(req);
        require.push(Require::absent(TASKS, &task.id));
        ops.extend(snap_ops);
        ops.push(put(TASKS, &task.id, &task));
    }
    ops.push(event("vm.template", &name, &p.user, "VM made a template"));
    commit(&st, require, ops, |r| {
        if r.table == SNAPSHOTS {
            format!(
                "disks: volume {} already has a snapshot named template",
                r.key
            )
        } else {
            format!("VM {name} changed meanwhile; try again")
        }
    })
    .await?;
    Ok(Json(with_status(&n, vm)?))
}
