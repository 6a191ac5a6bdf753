//! VMs: definitions (memory shown in human units, the node by name) and their lifecycle
//! (start, stop, kill, reboot, pause, resume), waiting until the VM's node reports the
//! state asked for.

use anyhow::bail;
use serde_json::Value;
use tessera_api::{MigrateRequest, NewVm, Task, TaskState, Vm, VmUpdate};

use crate::args::{VmAction, VmCmd};
use crate::client::{decode, Client};
use crate::endpoints::{
    Ep, VM, VMS, VM_CREATE, VM_KILL, VM_MIGRATE, VM_MIGRATE_CANCEL, VM_PAUSE, VM_REBOOT, VM_RESUME,
    VM_RM, VM_SET, VM_START, VM_STOP, VM_TEMPLATE,
};
use crate::node_names::NodeNames;
use crate::output::{col, opt, size, table, word, Output};

use super::nodes::resolve;

pub fn run(client: &Client, cmd: VmCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create {
            name,
            vcpus,
            memory,
            disks,
            networks,
            nics,
            kernel,
            image,
            from,
            cmdline,
            node,
            restart_policy,
            stop_timeout,
            ha,
            priority,
        } => {
            let node = node.map(|n| resolve(client, &n)).transpose()?;
            // From a template: its size unless given (the API copies the rest).
            let template: Option<Vm> = from.as_ref().map(|t| client.get(VM, &[t])).transpose()?;
            let body = NewVm {
                name,
                vcpus: vcpus.or(template.as_ref().map(|t| t.vcpus)).unwrap_or(1),
                memory_mib: match (memory, &template) {
                    (Some(m), _) => mib(m)?,
                    (None, Some(t)) => t.memory_mib,
                    (None, None) => 512,
                },
                disks,
                networks,
                nics,
                kernel,
                cmdline,
                image,
                from,
                node,
                desired_state: None,
                restart_policy,
                stop_timeout_s: stop_timeout,
                ha: ha.then_some(true),
                priority,
            };
            let v = client.send(VM_CREATE, &[], &body)?;
            show(client, VM_CREATE, &v, out)?;
        }
        VmCmd::Ls => {
            let v = client.call(VMS, &[], None)?;
            let names = if out.is_json() {
                None
            } else {
                Some(NodeNames::fetch(client)?)
            };
            let on = |v: &Vm| match (&v.running_on, &names) {
                (Some(id), Some(n)) => n.name(id),
                _ => "-".to_string(),
            };
            out.show(VMS, &v, |vms: Vec<Vm>| {
                table(
                    &vms,
                    &[
                        col("NAME", |v: &Vm| v.name.clone()),
                        col("VCPUS", |v: &Vm| v.vcpus.to_string()),
                        col("MEMORY", memory),
                        col("DISKS", |v: &Vm| v.disks.join(",")),
                        col("DESIRED", |v: &Vm| word(&v.desired_state)),
                        col("ACTUAL", |v: &Vm| word(&v.actual_state)),
                        col("ON", on),
                    ],
                    out.wide(),
                )
            })?;
        }
        VmCmd::Template { name } => {
            let v = client.call(VM_TEMPLATE, &[&name], None)?;
            show(client, VM_TEMPLATE, &v, out)?;
        }
        VmCmd::Show { name } => {
            let v = client.call(VM, &[&name], None)?;
            show(client, VM, &v, out)?;
        }
        VmCmd::Set {
            name,
            vcpus,
            memory,
            disks,
            desired_state,
            restart_policy,
            stop_timeout,
            ha,
            priority,
        } => {
            let update = VmUpdate {
                vcpus,
                memory_mib: memory.map(mib).transpose()?,
                disks,
                desired_state,
                restart_policy,
                stop_timeout_s: stop_timeout,
                ha,
                priority,
                ..VmUpdate::default()
            };
            let v = client.send(VM_SET, &[&name], &update)?;
            show(client, VM_SET, &v, out)?;
        }
        VmCmd::Rm { name } => {
            let v = client.call(VM_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted VM {name}"));
        }
        VmCmd::Start(a) => act(client, VM_START, a, out)?,
        VmCmd::Stop(a) => act(client, VM_STOP, a, out)?,
        VmCmd::Kill(a) => act(client, VM_KILL, a, out)?,
        VmCmd::Reboot(a) => act(client, VM_REBOOT, a, out)?,
        VmCmd::Pause(a) => act(client, VM_PAUSE, a, out)?,
        VmCmd::Resume(a) => act(client, VM_RESUME, a, out)?,
        VmCmd::Console { name } => super::vm_console::attach(client, &name)?,
        VmCmd::Migrate {
            name,
            to,
            downtime_ms,
            max_bandwidth_kib_s,
            cancel,
            no_wait,
        } => {
            if cancel {
                let v = client.call(VM_MIGRATE_CANCEL, &[&name], None)?;
                out.print(&v, |_| {
                    println!("migration of VM {name} cancelled; it keeps running where it is")
                });
                return Ok(());
            }
            let req = MigrateRequest {
                to,
                downtime_ms,
                max_bandwidth_kib_s,
            };
            let accepted = client.send(VM_MIGRATE, &[&name], &req)?;
            migrated(client, &name, accepted, no_wait, out)?;
        }
    }
    Ok(())
}

/// Sends a lifecycle request; the answer is its task. Unless `--no-wait`, follows the task
/// (the VM's node ends it once it reports the state asked for, or fails it with the
/// reason: a crash, a timeout) and shows the VM.
fn act(client: &Client, ep: Ep, a: VmAction, out: Output) -> anyhow::Result<()> {
    let accepted = client.call(ep, &[&a.name], None)?;
    let task: Task = decode(ep, &accepted)?;
    if a.no_wait {
        out.print(&accepted, super::tasks::done);
        return Ok(());
    }
    let (_, t) = super::tasks::watch(client, &task.id, !out.is_json())?;
    if t.state != TaskState::Succeeded {
        bail!(
            "{} of VM {} failed: {} (task {})",
            ep.1.rsplit('/').next().unwrap_or("request"),
            a.name,
            t.error.as_deref().unwrap_or("no reason given"),
            t.id
        );
    }
    let v = client.call(VM, &[&a.name], None)?;
    show(client, VM, &v, out)
}

/// Follows a migration's task (unless `no_wait`) and says where the VM runs and what the
/// move cost.
fn migrated(
    client: &Client,
    name: &str,
    accepted: Value,
    no_wait: bool,
    out: Output,
) -> anyhow::Result<()> {
    let task: Task = decode(VM_MIGRATE, &accepted)?;
    if no_wait {
        out.print(&accepted, super::tasks::done);
        return Ok(());
    }
    let (v, t) = super::tasks::watch(client, &task.id, !out.is_json())?;
    if t.state != TaskState::Succeeded {
        bail!(
            "migration of VM {name} failed: {} (task {})",
            t.error.as_deref().unwrap_or("no reason given"),
            t.id
        );
    }
    out.print(&v, |_| {
        let names = NodeNames::fetch(client).ok();
        let node = |id: &str| names.as_ref().map_or(id.to_string(), |n| n.name(id));
        match t.vm.as_ref().and_then(|vt| vt.migration.as_ref()) {
            Some(m) => println!(
                "VM {name} runs on {} (from {}): downtime {} ms (target {} ms), {} sent in {} round(s), {} ms in all",
                node(&m.to),
                node(&m.from),
                m.downtime_ms.map_or("?".into(), |d| d.to_string()),
                m.downtime_target_ms,
                size(Some(m.bytes)),
                m.iterations,
                m.total_ms.map_or("?".into(), |d| d.to_string()),
            ),
            None => println!("VM {name} migrated"),
        }
    });
    Ok(())
}

/// The API counts memory in MiB.
fn mib(bytes: u64) -> anyhow::Result<u64> {
    if bytes % (1 << 20) != 0 {
        bail!("memory must be a whole number of MiB");
    }
    Ok(bytes >> 20)
}

/// A VM's memory in human units.
fn memory(v: &Vm) -> String {
    size(v.memory_mib.checked_mul(1 << 20))
}

/// Prints a VM (the answer of `ep`), its node by name.
fn show(client: &Client, ep: Ep, v: &Value, out: Output) -> anyhow::Result<()> {
    if out.is_json() {
        out.print(v, |_| {});
        return Ok(());
    }
    let vm: Vm = decode(ep, v)?;
    // A VM that is not pinned has no node to look up.
    let node = match &vm.node {
        Some(id) => NodeNames::fetch(client)?.name(id),
        None => "-".to_string(),
    };
    let line = |label: &str, value: String| println!("{label:<14} {value}");
    line("name", vm.name.clone());
    line("vcpus", vm.vcpus.to_string());
    line("memory", memory(&vm));
    line("disks", vm.disks.join(","));
    line("networks", vm.networks.join(","));
    for (i, nic) in vm.nics.iter().enumerate() {
        line(
            &format!("nic{i}"),
            format!("{} mac={}", nic.network, nic.mac),
        );
    }
    line("kernel", opt(&vm.kernel));
    line("image", opt(&vm.image));
    if vm.template {
        line(
            "template",
            "yes (cannot start; vm create --from copies it)".into(),
        );
    }
    if let Some(t) = &vm.from {
        line("from", t.clone());
    }
    line("cmdline", opt(&vm.cmdline));
    line("node", node);
    if out.wide() {
        line("node id", opt(&vm.node));
    }
    line("desired_state", word(&vm.desired_state));
    line("actual_state", word(&vm.actual_state));
    if let Some(r) = &vm.state_reason {
        line("state_reason", r.clone());
    }
    line(
        "running_on",
        match &vm.running_on {
            Some(id) => NodeNames::fetch(client)?.name(id),
            None => "-".to_string(),
        },
    );
    line("restart_policy", word(&vm.restart_policy));
    line(
        "stop_timeout",
        format!(
            "{} s{}",
            vm.stop_timeout_s.unwrap_or(30),
            if vm.stop_timeout_s.is_none() {
                " (default)"
            } else {
                ""
            }
        ),
    );
    line("ha", vm.ha.to_string());
    line("priority", vm.priority.to_string());
    line("generation", vm.generation.to_string());
    Ok(())
}
