//! `POST /vms`: define a VM, from scratch or as a copy of a template.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tessera_api::{NewVm, VmState};
use tessera_state::Require;

use super::template::{template_clone, TEMPLATE_SNAPSHOT};
use super::{cluster_id, image_requirement, network_requirements, refusal, validate};
use crate::api::events::event;
use crate::api::extract::{Auth, Body, IdempotencyKey, Operator};
use crate::api::tasks::{commit_idempotent, Idempotent};
use crate::api::vm_actions::start_fields;
use crate::api::{check_name, now_ms, put, read, ApiError, ErrorBody, St};
use crate::records::table::{DISK_CLAIMS, TASKS, VMS, VOLUMES};
use crate::records::{DesiredState, Vm};

/// Define a VM. With `from`, a copy of a template: its spec fills what the request leaves
/// out, and each of its disks is cloned copy-on-write from its `template` snapshot into
/// a new volume `<name>-disk<N>` (a task each; the VM can start once they are ready).
/// An `Idempotency-Key` makes a retry safe: the same key and body get the first answer
/// (and create nothing more), the same key with another body 409.
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", operation_id = "create_vm",
    request_body = NewVm,
    params(("Idempotency-Key" = Option<String>, Header,
        min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        description = "Makes a retry safe: the same key and body get the first answer")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = Vm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "A named volume, network, node, image or template does not exist"),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    p: Auth<Operator>,
    IdempotencyKey(key): IdempotencyKey,
    Body(req): Body<NewVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    check_name("name", &req.name, &[])?;
    let n = crate::api::synced(&st).await?;
    let idem = key.map(|k| Idempotent::new(&p.user, &k, &("vm", &req)));
    if let Some(first) = idem
        .as_ref()
        .map(|i| i.replay_answer::<Vm>(&n))
        .transpose()?
        .flatten()
    {
        return Ok((StatusCode::CREATED, Json(first)));
    }
    let now = now_ms();
    let template = match &req.from {
        None => None,
        Some(t) => {
            check_name("from", t, &[])?;
            let tv: Vm =
                read(&n, VMS, t)?.ok_or_else(|| ApiError::not_found(format!("from: no VM {t}")))?;
            if !tv.template {
                return Err(ApiError::conflict(format!(
                    "from: VM {t} is not a template (POST /vms/{t}/template makes it one)"
                )));
            }
            if !req.disks.is_empty() {
                return Err(ApiError::bad(
                    "disks: a VM created from a template gets clones of its disks; name none",
                ));
            }
            if req
                .desired_state
                .is_some_and(|d| d != DesiredState::Stopped)
            {
                return Err(ApiError::bad(
                    "desired_state: a VM created from a template starts once its disks are cloned; create it stopped",
                ));
            }
            Some(tv)
        }
    };
    let t = template.as_ref();
    let vm = Vm {
        name: req.name.clone(),
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        disks: req.disks.clone(),
        networks: Vec::new(),
        nics: Vec::new(),
        kernel: req
            .kernel
            .clone()
            .or_else(|| t.and_then(|t| t.kernel.clone())),
        cmdline: req
            .cmdline
            .clone()
            .or_else(|| t.and_then(|t| t.cmdline.clone())),
        image: req
            .image
            .clone()
            .or_else(|| t.and_then(|t| t.image.clone())),
        template: false,
        from: req.from.clone(),
        node: req.node.clone(),
        desired_state: DesiredState::Stopped,
        actual_state: VmState::Stopped,
        state_reason: None,
        placed_on: None,
        running_on: None,
        restart_policy: req
            .restart_policy
            .or(t.map(|t| t.restart_policy))
            .unwrap_or_default(),
        start_seq: 0,
        reboot_seq: 0,
        force_stop: false,
        stop_timeout_s: req
            .stop_timeout_s
            .or_else(|| t.and_then(|t| t.stop_timeout_s)),
        ha: req.ha.or(t.map(|t| t.ha)).unwrap_or(false),
        priority: req.priority.or(t.map(|t| t.priority)).unwrap_or(0),
        generation: 1,
        created_ms: now,
        updated_ms: now,
    };
    let mut vm = vm;
    // A copy of a template gets the template's networks with MACs of its own.
    let wanted = match t {
        Some(t) if req.networks.is_empty() && req.nics.is_empty() => {
            crate::api::nics::requested(&t.networks, &[])?
        }
        _ => crate::api::nics::requested(&req.networks, &req.nics)?,
    };
    crate::api::nics::set(
        &mut vm,
        &wanted,
        &[],
        &cluster_id(&st)?,
        &crate::api::nics::taken(&n),
    )?;
    validate(&n, &vm)?;
    let mut require = vec![Require::absent(VMS, &vm.name)];
    let mut ops = Vec::new();
    if let Some(d) = req.desired_state.filter(|d| *d != DesiredState::Stopped) {
        start_fields(&st, &n, &mut vm, d)?.into_txn(&mut require, &mut ops);
    }
    if let Some(t) = t {
        for (i, d) in t.disks.iter().enumerate() {
            let clone = format!("{}-disk{i}", vm.name);
            check_name("name", &clone, &[])?;
            let (task, clone_require, clone_ops) = template_clone(&p, &n, d, &clone)?;
            require.extend(clone_require);
            require.push(Require::absent(DISK_CLAIMS, &clone));
            require.push(Require::absent(TASKS, &task.id));
            ops.extend(clone_ops);
            ops.push(put(TASKS, &task.id, &task));
            ops.push(event(
                "volume.clone",
                &clone,
                &p.user,
                &format!(
                    "clone of {d}@{TEMPLATE_SNAPSHOT} requested for VM {}",
                    vm.name
                ),
            ));
            vm.disks.push(clone);
        }
    } else {
        for d in &vm.disks {
            require.push(Require::exists(VOLUMES, d));
            require.push(Require::absent(DISK_CLAIMS, d));
        }
    }
    ops.push(put(VMS, &vm.name, &vm));
    for d in &vm.disks {
        ops.push(put(DISK_CLAIMS, d, &vm.name));
    }
    let (mac_req, mac_ops) = crate::api::nics::claims(&vm.name, &[], &vm.nics);
    require.extend(mac_req);
    ops.extend(mac_ops);
    require.extend(network_requirements(&n, &vm));
    require.extend(image_requirement(&n, &vm));
    ops.push(event(
        "vm.create",
        &vm.name,
        &p.user,
        &match &vm.from {
            Some(t) => format!("VM defined from template {t}"),
            None => "VM defined".into(),
        },
    ));
    if let Some(node) = &vm.placed_on {
        ops.push(event(
            "vm.start",
            &vm.name,
            &p.user,
            &format!("start requested on node {node}"),
        ));
    }
    let name = vm.name.clone();
    let from_template = vm.from.is_some();
    let refuse = |r: &Require| {
        if r.table == VOLUMES && from_template {
            format!("name: volume {} already exists (the clone's name)", r.key)
        } else {
            refusal(r, format!("name: VM {name} already exists"))
        }
    };
    let vm = commit_idempotent(&st, vm, idem.as_ref(), require, ops, refuse).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}
