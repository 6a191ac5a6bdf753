//! VM lifecycle requests (start, stop, kill, reboot, pause, resume): each changes the VM's
//! desired state in the replicated state (a start also places it: `vmrun::scheduler`);
//! the node it is placed on carries it out (`vmrun`) and reports `vm_status/<name>`.
//! Each accepted request is a task, committed with the VM's change, that the node follows
//! to the state asked for (`vmrun::tasks`); a refused one creates none.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use tessera_state::Require;

use super::auth::Principal;
use super::events::event;
use super::extract::{Auth, Operator, Param};
use super::vms::{crashed, may_run, with_status};
use super::{commit, now_ms, put, read, ApiError, ApiState, ErrorBody, St};
use crate::records::table::{MIGRATIONS, NODES, TASKS, VMS, VOLUMES};
use crate::records::{DesiredState, Task, Vm, Volume, VolumeState};
use crate::vmrun::reservation::{self, Counters, Reservation};
use crate::vmrun::scheduler::{self, NodeRoom};
use tessera_api::{VmAction as Action, VmTask};

/// What each node has and what the VMs placed on it take, for the scheduler (a VM
/// migrating to a node counts there too), and the networks it failed to set up. The VM
/// `except` (the one being placed) is not counted.
pub(super) fn rooms(
    st: &ApiState,
    n: &tessera_state::Node,
    except: &str,
) -> Result<Vec<NodeRoom>, ApiError> {
    let nodes = super::read_all::<serde_json::Value>(n, NODES)?;
    let vms = super::read_all::<Vm>(n, VMS)?;
    let migrating = super::read_all::<crate::migrate::Migration>(n, MIGRATIONS)?;
    let maintenance = super::node_maintenance::nodes_on(n);
    let heard = st.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let own_metrics = st.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(nodes
        .into_iter()
        .map(|(id, rec)| {
            let me = id == st.me.0;
            let metrics = if me { &own_metrics } else { &rec["metrics"] };
            let up = me || crate::health::state(heard.get(&id).map(|t| t.elapsed())) == "up";
            let (mut allocated_mib, mut allocated_vcpus, _) = allocated(&vms, &id, except);
            for (vm, m) in &migrating {
                if m.to == id && *vm != except {
                    if let Some((_, v)) = vms.iter().find(|(name, _)| name == vm) {
                        allocated_mib += v.memory_mib;
                        allocated_vcpus += u64::from(v.vcpus);
                    }
                }
            }
            NodeRoom {
                name: rec["name"].as_str().unwrap_or(&id).to_string(),
                up,
                memory_mib: metrics["memory_total"].as_u64().unwrap_or(0) / (1024 * 1024),
                cpus: metrics["cpus"].as_u64().unwrap_or(0),
                allocated_mib,
                allocated_vcpus,
                maintenance: maintenance.contains(&id),
                network_errors: network_errors(n, &id),
                id,
            }
        })
        .collect())
}

/// The networks node `id` reported it could not set up, with why.
fn network_errors(n: &tessera_state::Node, id: &str) -> std::collections::BTreeMap<String, String> {
    let status: Option<std::collections::BTreeMap<String, tessera_api::NetworkOnNode>> =
        crate::tables::get(n, crate::netrun::NETWORK_STATUS, id);
    status
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, s)| s.state != "ok" || s.error.is_some())
        .map(|(net, s)| {
            let why = s.error.unwrap_or_else(|| format!("state {}", s.state));
            (net, why)
        })
        .collect()
}

/// Memory (MiB), vCPUs and the number of the VMs placed on node `id` that are not
/// stopped, leaving out VM `except` (the one being placed).
pub(crate) fn allocated(vms: &[(String, Vm)], id: &str, except: &str) -> (u64, u64, u64) {
    vms.iter()
        .map(|(_, v)| v)
        .filter(|v| {
            v.name != except
                && v.placed_on.as_deref() == Some(id)
                && v.desired_state != DesiredState::Stopped
        })
        .fold((0, 0, 0), |(m, c, k), v| {
            (m + v.memory_mib, c + u64::from(v.vcpus), k + 1)
        })
}

/// VM `vm`'s disk as placement sees it: its primary's node and the nodes with an in-sync
/// copy; 404 if the volume is gone, 409 if it is not ready.
pub(super) fn placement_disk(
    n: &tessera_state::Node,
    vm: &Vm,
) -> Result<Option<scheduler::Disk>, ApiError> {
    let Some(d) = vm.disks.first() else {
        return Ok(None);
    };
    let v: Volume =
        read(n, VOLUMES, d)?.ok_or_else(|| ApiError::not_found(format!("disks: no volume {d}")))?;
    if v.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!(
            "disks: volume {d} is not ready"
        )));
    }
    let in_sync = v
        .all_copies()
        .into_iter()
        .filter(|c| c.state == tessera_api::CopyState::InSync && c.node != v.node)
        .map(|c| c.node)
        .collect();
    Ok(Some(scheduler::Disk {
        primary: v.node,
        in_sync,
    }))
}

/// Sets the fields of a start: desired state `d`, the node the scheduler picks, a new
/// start sequence; returns the [`Reservation`] of that node's room, which the caller
/// commits with the VM. Refuses (409) a VM that cannot run: no kernel, more disks than
/// the VMM serves, a disk that is not ready, no node with room.
pub(super) fn start_fields(
    st: &ApiState,
    n: &tessera_state::Node,
    vm: &mut Vm,
    d: DesiredState,
) -> Result<Reservation, ApiError> {
    if vm.template {
        return Err(ApiError::conflict(format!(
            "VM {} is a template: it cannot be started; create a VM from it (from)",
            vm.name
        )));
    }
    if vm.kernel.is_none() && vm.image.is_none() {
        return Err(ApiError::conflict(format!(
            "VM {} has no kernel or image to boot; set one first",
            vm.name
        )));
    }
    if vm.disks.len() > 1 {
        return Err(ApiError::conflict(
            "disks: tessera-vmm serves one disk today; a VM with more cannot start yet",
        ));
    }
    // A record saved before NICs had MACs gets them now; the caller's commit claims them
    // (`nics::claims`), so two such starts cannot take one MAC.
    if vm.nics.len() != vm.networks.len() {
        let prefix = super::nics::prefix(&super::vms::cluster_id(st)?);
        let taken = super::nics::taken(n);
        if let Some(nics) = super::nics::migrate(
            &vm.networks,
            &vm.nics,
            prefix,
            &taken,
            &mut rand::thread_rng(),
        )? {
            vm.nics = nics;
        }
    }
    if vm.nics.len() > 4 {
        return Err(ApiError::conflict(
            "nics: tessera-vmm serves at most 4 NICs today; a VM with more cannot start yet",
        ));
    }
    let disk = placement_disk(n, vm)?;
    let counters = Counters::read(n);
    let rooms = rooms(st, n, &vm.name)?;
    let req = scheduler::Request {
        memory_mib: vm.memory_mib,
        vcpus: u64::from(vm.vcpus),
        pinned: vm.node.clone(),
        disk,
        vcpu_overcommit: super::settings::current(n)?.vcpu_overcommit,
        networks: vm.networks.clone(),
    };
    let node = scheduler::place(&rooms, &req).map_err(|e| match e {
        scheduler::Refusal::NoSuchNode(_) => ApiError::not_found(e.to_string()),
        _ => ApiError::conflict(e.to_string()),
    })?;
    let held = counters.reserve(&node);
    vm.placed_on = Some(node);
    vm.desired_state = d;
    vm.start_seq += 1;
    vm.force_stop = false;
    Ok(held)
}

/// How long the node has to reach the state a request asks for before its task fails.
pub fn task_timeout(action: Action, vm: &Vm) -> std::time::Duration {
    let s = match action {
        // Placement, the VMM's start, and a disk over the network.
        Action::Start | Action::Reboot => 120,
        // The guest's grace period, then the forced power-off (and the kill after it).
        Action::Stop => {
            crate::vmrun::stop_timeout(Some(vm)).as_secs()
                + crate::vmrun::stop::KILL_AFTER.as_secs()
                + 30
        }
        Action::Kill | Action::Pause | Action::Resume => 60,
        // The migration follows its own phases and bounds (`crate::migrate`).
        Action::Migrate => 600,
    };
    std::time::Duration::from_secs(s)
}

/// How many times a start that lost a race for a node's room is placed again. Starts sent
/// at once mostly prefer the same node (the one with most free memory), so one of N
/// concurrent starts can lose N-1 races: 5 attempts refused 2 of 10 starts sent by 8
/// clients at once (bench/vm.sh); 20, with the jitter below, leaves room for dozens.
const PLACEMENT_ATTEMPTS: usize = 20;

/// Applies `action` to VM `name`: one compare-and-swap of its record with the event and
/// the task that follows it; the node it is placed on carries it out. 202 with the task.
/// A start whose node took another VM between reading the rooms and committing is placed
/// again with that VM counted.
async fn act(
    st: &ApiState,
    p: &Principal,
    name: &str,
    action: Action,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let mut attempt = 1;
    loop {
        match act_once(st, p, name, action).await? {
            Ok(task) => return Ok((StatusCode::ACCEPTED, Json(task))),
            Err(raced) if attempt < PLACEMENT_ATTEMPTS => {
                tracing::info!(vm = name, attempt, "{raced}; placing again");
                // The losers of a race would read the rooms again at the same moment
                // and race again: spread them out (up to 10 ms per lost race).
                let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=10 * attempt as u64);
                tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
                attempt += 1;
            }
            Err(raced) => return Err(ApiError::conflict(raced)),
        }
    }
}

/// One attempt of [`act`]: `Ok(Err(why))` when a placement lost a race for its node's
/// room (nothing was changed).
async fn act_once(
    st: &ApiState,
    p: &Principal,
    name: &str,
    action: Action,
) -> Result<Result<Task, String>, ApiError> {
    let user = p.user.as_str();
    let n = super::synced(st).await?;
    let old: Vm =
        read(&n, VMS, name)?.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    let mut vm = old.clone();
    let not = |what: &str| {
        Err(ApiError::conflict(format!(
            "VM {name} is {what} (desired state {})",
            match old.desired_state {
                DesiredState::Stopped => "stopped",
                DesiredState::Running => "running",
                DesiredState::Paused => "paused",
            }
        )))
    };
    let mut held = None;
    let message = match (action, old.desired_state) {
        (Action::Start, DesiredState::Stopped) => {
            if may_run(&n, name)? {
                return Err(ApiError::conflict(format!(
                    "VM {name} is still stopping; try again once it is stopped"
                )));
            }
            held = Some(start_fields(st, &n, &mut vm, DesiredState::Running)?);
            format!(
                "start requested on node {}",
                vm.placed_on.as_deref().unwrap_or("?")
            )
        }
        // A crashed VM (its policy gave up) starts afresh.
        (Action::Start, _) if crashed(&n, name)? => {
            held = Some(start_fields(st, &n, &mut vm, DesiredState::Running)?);
            format!(
                "start requested on node {} (after a crash)",
                vm.placed_on.as_deref().unwrap_or("?")
            )
        }
        (Action::Start, _) => return not("already started"),
        (Action::Stop | Action::Kill, DesiredState::Stopped) if !may_run(&n, name)? => {
            return not("not running")
        }
        (Action::Stop, _) => {
            vm.desired_state = DesiredState::Stopped;
            vm.force_stop = false;
            format!(
                "stop requested (the guest's power button, forced after {} s)",
                crate::vmrun::stop_timeout(Some(&vm)).as_secs()
            )
        }
        (Action::Kill, _) => {
            vm.desired_state = DesiredState::Stopped;
            vm.force_stop = true;
            "kill requested".to_string()
        }
        (Action::Reboot, DesiredState::Running | DesiredState::Paused) => {
            vm.reboot_seq += 1;
            vm.desired_state = DesiredState::Running;
            "reboot requested".to_string()
        }
        (Action::Reboot, _) => return not("not running"),
        (Action::Pause, DesiredState::Running) => {
            vm.desired_state = DesiredState::Paused;
            "pause requested".to_string()
        }
        (Action::Pause, _) => return not("not running"),
        (Action::Resume, DesiredState::Paused) => {
            vm.desired_state = DesiredState::Running;
            "resume requested".to_string()
        }
        (Action::Resume, _) => return not("not paused"),
        // POST /vms/{name}/migrate has its own handler (`api::vm_migrate`).
        (Action::Migrate, _) => {
            return Err(ApiError::internal(
                "a live migration is not a lifecycle request",
            ))
        }
    };
    vm.generation += 1;
    vm.updated_ms = now_ms();
    let word = super::tasks::word(action);
    let kind = format!("vm.{word}");
    // The node that carries it out follows the task: where the VM is placed (a stop of a
    // VM that never ran has no node; the node that reported it last then).
    let status = with_status(&n, vm.clone())?;
    let task_node = vm
        .placed_on
        .clone()
        .or(status.running_on.clone())
        .unwrap_or_else(|| st.me.0.clone());
    let task = super::tasks::queued_vm(
        p,
        &task_node,
        VmTask {
            vm: name.to_string(),
            action,
            start_seq: vm.start_seq,
            reboot_seq: vm.reboot_seq,
            deadline_ms: now_ms() + task_timeout(action, &vm).as_millis() as u64,
            migration: None,
        },
    );
    let mut require = vec![
        Require::equals(VMS, name, json!(old)),
        Require::absent(TASKS, &task.id),
    ];
    let mut ops = vec![
        put(VMS, name, &vm),
        put(TASKS, &task.id, &task),
        event(&kind, name, user, &format!("{message} (task {})", task.id)),
    ];
    if let Some(h) = held {
        h.into_txn(&mut require, &mut ops);
    }
    // A start placed on another node retires the last node's writer record.
    ops.extend(crate::vmrun::writer_key::retire_moved(&old, &vm));
    // MACs a start gave an old record's NICs (`start_fields`).
    if vm.nics != old.nics {
        let (mac_req, mac_ops) = super::nics::claims(name, &old.nics, &vm.nics);
        require.extend(mac_req);
        ops.extend(mac_ops);
    }
    let mut raced = None;
    let res = commit(st, require, ops, |r| {
        if reservation::raced(r) {
            raced = Some(reservation::raced_message(r));
        }
        format!("VM {name} changed meanwhile; try again")
    })
    .await;
    match (res, raced) {
        (Ok(()), _) => Ok(Ok(task)),
        (Err(_), Some(why)) => Ok(Err(why)),
        (Err(e), None) => Err(e),
    }
}

macro_rules! lifecycle {
    ($fn:ident, $action:expr, $path:literal, $id:literal, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "vms", operation_id = $id,
            params(("name" = String, Path)),
            security(("token" = []), ("cookie" = [])),
            responses((status = 202, body = Task, description = "Accepted: the VM's node carries it out; the task follows it to the state asked for (GET /api/v1/tasks/{id})"),
                (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
                (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
                (status = 409, body = ErrorBody, description = "The VM's state does not allow it, or no node can run it (the message says why)"),
                (status = 503, body = ErrorBody)))]
        pub async fn $fn(
            State(st): St,
            p: Auth<Operator>,
            Param(name): Param<String>,
        ) -> Result<(StatusCode, Json<Task>), ApiError> {
            act(&st, &p, &name, $action).await
        }
    };
}

lifecycle!(start, Action::Start, "/api/v1/vms/{name}/start", "start_vm",
    "Start a VM: the scheduler places it on an up node with room (its disk's node, or the pinned one) and that node starts its VMM.");
lifecycle!(stop, Action::Stop, "/api/v1/vms/{name}/stop", "stop_vm",
    "Stop a VM: its VMM presses the guest's ACPI power button; a guest that has not shut down within the VM's stop_timeout_s (default 30 s) is powered off (killed if that does not end it within 10 s). The task's result says which: `the guest shut down` or `forced after N s`.");
lifecycle!(
    kill,
    Action::Kill,
    "/api/v1/vms/{name}/kill",
    "kill_vm",
    "Kill a VM's VMM at once (SIGKILL)."
);
lifecycle!(
    reboot,
    Action::Reboot,
    "/api/v1/vms/{name}/reboot",
    "reboot_vm",
    "Reboot a VM: its VMM is powered off and started again on the same node."
);
lifecycle!(
    pause,
    Action::Pause,
    "/api/v1/vms/{name}/pause",
    "pause_vm",
    "Pause a running VM (its vCPUs stop; memory and devices are kept)."
);
lifecycle!(
    resume,
    Action::Resume,
    "/api/v1/vms/{name}/resume",
    "resume_vm",
    "Resume a paused VM."
);
