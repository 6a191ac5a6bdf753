//! Live migration requests: `POST /vms/{name}/migrate` moves a running VM to another node
//! without stopping it, `DELETE /vms/{name}/migrate` cancels one under way. The request
//! is placed like a start (`vmrun::scheduler`, the target's room reserved) and committed
//! with its task and the `migrations/<vm>` record the two nodes carry out
//! (`crate::migrate`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use tessera_api::{
    MigrateRequest, MigrationPhase, MigrationProgress, VmAction, VmState, VmStatus, VmTask,
    DEFAULT_DOWNTIME_MS,
};
use tessera_state::Require;

use super::events::event;
use super::extract::{Auth, Body, Operator, Param};
use super::vm_actions::{placement_disk, rooms};
use super::{commit, now_ms, put, read, ApiError, ApiState, ErrorBody, St};
use crate::migrate::Migration;
use crate::records::table::{MIGRATIONS, TASKS, VMS};
use crate::records::{DesiredState, Task, Vm};
use crate::vmrun::reservation::{self, Counters};
use crate::vmrun::scheduler::{self, Refusal};
use crate::vmrun::VM_STATUS;

/// How long a migration's task may take before it is given up (the migration's own
/// bounds end it sooner).
const TASK_TIMEOUT_MS: u64 = 600_000;

/// Live-migrate a running VM to another node.
#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", tag = "vms", operation_id = "migrate_vm",
    params(("name" = String, Path)), request_body = MigrateRequest,
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task, description = "Accepted: the VM's node sends it to the target while it runs; the task (GET /api/v1/tasks/{id}) shows the figures (`vm.migration`) and ends when the guest runs on the target, or fails with the guest still running where it was"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such VM or node"),
        (status = 409, body = ErrorBody, description = "The VM is not running, is migrating already, or no node can take it (the message names each candidate's room)"),
        (status = 503, body = ErrorBody)))]
pub async fn migrate(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    Body(req): Body<MigrateRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let task = begin(&st, &p.user, &name, &req).await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// Why a migration was not begun, for the HA manager's drain (`crate::ha`): the words
/// the API would answer with.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotBegun(pub String);

/// Begins the live migration of VM `name` for the HA manager's drain of a node in
/// maintenance, exactly as `POST /vms/{name}/migrate` does for `user`.
pub async fn begin_for_drain(
    st: &ApiState,
    user: &str,
    name: &str,
    to: &str,
) -> Result<Task, NotBegun> {
    let req = MigrateRequest {
        to: Some(to.to_string()),
        downtime_ms: None,
        max_bandwidth_kib_s: None,
    };
    begin(st, user, name, &req).await.map_err(|e| NotBegun(e.1))
}

/// Places and commits a live migration of VM `name` asked by `user`: its task.
async fn begin(
    st: &ApiState,
    user: &str,
    name: &str,
    req: &MigrateRequest,
) -> Result<Task, ApiError> {
    let name = name.to_string();
    let n = super::synced(st).await?;
    let vm: Vm =
        read(&n, VMS, &name)?.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    if let Some(m) = read::<Migration>(&n, MIGRATIONS, &name)? {
        return Err(ApiError::conflict(format!(
            "VM {name} is migrating already (to node {}, task {})",
            m.to, m.task
        )));
    }
    if vm.desired_state != DesiredState::Running {
        return Err(ApiError::conflict(format!(
            "VM {name} is not running (desired state {}): only a running VM migrates",
            if vm.desired_state == DesiredState::Paused {
                "paused"
            } else {
                "stopped"
            }
        )));
    }
    let status: Option<VmStatus> = read(&n, VM_STATUS, &name)?;
    let from = match (&vm.placed_on, &status) {
        (Some(on), Some(s))
            if s.node == *on && s.state == VmState::Running && s.start_seq == vm.start_seq =>
        {
            on.clone()
        }
        _ => {
            return Err(ApiError::conflict(format!(
                "VM {name} is not running yet ({}): try again once it runs",
                status
                    .as_ref()
                    .map_or("no node reported it".to_string(), |s| {
                        format!("node {} reports it {:?}", s.node, s.state).to_lowercase()
                    })
            )))
        }
    };
    if crate::ha::reporter_down(&from, VmState::Running).is_some() {
        return Err(ApiError::conflict(format!(
            "VM {name}'s node {from} is down: it cannot send it"
        )));
    }
    let counters = Counters::read(&n);
    let mut rooms = rooms(st, &n, &name)?;
    let to = match &req.to {
        None => None,
        Some(t) => Some(
            crate::replicated::names::resolve(
                t,
                rooms.iter().map(|r| (r.id.as_str(), r.name.as_str())),
            )
            .map_err(super::node_lookup)?,
        ),
    };
    if to.as_deref() == Some(from.as_str()) {
        return Err(ApiError::conflict(format!(
            "VM {name} runs on node {} already",
            req.to.as_deref().unwrap_or(&from)
        )));
    }
    // The node it runs on is not a place to go.
    for r in rooms.iter_mut().filter(|r| r.id == from) {
        r.memory_mib = 0;
        r.name = format!("{} (where it runs)", r.name);
    }
    let place = scheduler::Request {
        memory_mib: vm.memory_mib,
        vcpus: u64::from(vm.vcpus),
        pinned: to,
        disk: placement_disk(&n, &vm)?,
        vcpu_overcommit: super::settings::current(&n)?.vcpu_overcommit,
        networks: vm.networks.clone(),
    };
    let target = scheduler::place(&rooms, &place).map_err(|e| match e {
        Refusal::NoSuchNode(_) => ApiError::not_found(e.to_string()),
        _ => ApiError::conflict(e.to_string()),
    })?;
    let held = counters.reserve(&target);
    let downtime_ms = req.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
    let now = now_ms();
    let task = super::tasks::queued_vm_by(
        user,
        &from,
        VmTask {
            vm: name.clone(),
            action: VmAction::Migrate,
            start_seq: vm.start_seq,
            reboot_seq: vm.reboot_seq,
            deadline_ms: now + TASK_TIMEOUT_MS,
            migration: Some(MigrationProgress {
                from: from.clone(),
                to: target.clone(),
                phase: MigrationPhase::Preparing,
                memory_bytes: vm.memory_mib << 20,
                downtime_target_ms: downtime_ms,
                ..MigrationProgress::default()
            }),
        },
    );
    let rec = Migration {
        task: task.id.clone(),
        vm: name.clone(),
        from: from.clone(),
        to: target.clone(),
        phase: MigrationPhase::Preparing,
        start_seq: vm.start_seq,
        downtime_ms,
        max_bandwidth_kib_s: req.max_bandwidth_kib_s,
        listen: None,
        token: None,
        error: None,
        user: user.to_string(),
        created_ms: now,
    };
    let mut require = vec![
        Require::equals(VMS, &name, json!(vm)),
        Require::equals(VM_STATUS, &name, json!(status)),
        Require::absent(MIGRATIONS, &name),
        Require::absent(TASKS, &task.id),
    ];
    let mut ops = vec![
        put(MIGRATIONS, &name, &rec),
        put(TASKS, &task.id, &task),
        event(
            "vm.migrate",
            &name,
            user,
            &format!(
                "live migration from node {from} to node {target} requested (task {}, downtime target {downtime_ms} ms)",
                task.id
            ),
        ),
    ];
    held.into_txn(&mut require, &mut ops);
    commit(st, require, ops, |r| {
        if reservation::raced(r) {
            reservation::raced_message(r)
        } else {
            format!("VM {name} changed meanwhile; try again")
        }
    })
    .await?;
    Ok(task)
}

/// Cancel a VM's live migration under way: the VM keeps running on its node.
#[utoipa::path(delete, path = "/api/v1/vms/{name}/migrate", tag = "vms", operation_id = "cancel_vm_migration",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Task, description = "Cancelled: the migration's task ends failed once the source has resumed the guest"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such VM, or no migration of it under way"),
        (status = 409, body = ErrorBody, description = "Too late: the VM switched over to the target already, or the migration ended"),
        (status = 503, body = ErrorBody)))]
pub async fn cancel(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
) -> Result<Json<Task>, ApiError> {
    let n = super::synced(&st).await?;
    if read::<Vm>(&n, VMS, &name)?.is_none() {
        return Err(ApiError::not_found(format!("no VM {name}")));
    }
    let m: Migration = read(&n, MIGRATIONS, &name)?.ok_or_else(|| {
        ApiError::not_found(format!("no live migration of VM {name} is under way"))
    })?;
    match m.phase {
        MigrationPhase::SwitchedOver | MigrationPhase::Done => {
            return Err(ApiError::conflict(format!(
                "too late: VM {name} switched over to node {} already",
                m.to
            )))
        }
        MigrationPhase::Failed => {
            return Err(ApiError::conflict(format!(
                "the migration of VM {name} ended already: {}",
                m.error.as_deref().unwrap_or("failed")
            )))
        }
        _ => {}
    }
    let mut cancelled = m.clone();
    cancelled.phase = MigrationPhase::Failed;
    cancelled.error = Some(format!("cancelled by {}", p.user));
    commit(
        &st,
        vec![Require::equals(MIGRATIONS, &name, json!(m))],
        vec![
            put(MIGRATIONS, &name, &cancelled),
            event(
                "vm.migrate_cancel",
                &name,
                &p.user,
                &format!(
                    "live migration to node {} cancelled (task {})",
                    m.to, m.task
                ),
            ),
        ],
        |_| format!("the migration of VM {name} moved on meanwhile; look again"),
    )
    .await?;
    let task: Task = read(&n, TASKS, &m.task)?
        .ok_or_else(|| ApiError::internal(format!("task {} is gone", m.task)))?;
    Ok(Json(task))
}
