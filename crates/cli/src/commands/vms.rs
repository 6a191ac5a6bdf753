//! VM definitions: memory shown in human units, the node by name.

use anyhow::bail;
use serde_json::Value;
use tessera_api::{NewVm, Vm, VmUpdate};

use crate::args::VmCmd;
use crate::client::{decode, Client};
use crate::endpoints::{Ep, VM, VMS, VM_CREATE, VM_RM, VM_SET};
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
            kernel,
            cmdline,
            node,
        } => {
            let node = node.map(|n| resolve(client, &n)).transpose()?;
            let body = NewVm {
                name,
                vcpus,
                memory_mib: mib(memory)?,
                disks,
                networks,
                kernel,
                cmdline,
                node,
                desired_state: None,
            };
            let v = client.send(VM_CREATE, &[], &body)?;
            show(client, VM_CREATE, &v, out)?;
        }
        VmCmd::Ls => {
            let v = client.call(VMS, &[], None)?;
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
                    ],
                    out.wide(),
                )
            })?;
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
        } => {
            let update = VmUpdate {
                vcpus,
                memory_mib: memory.map(mib).transpose()?,
                disks,
                desired_state,
                ..VmUpdate::default()
            };
            let v = client.send(VM_SET, &[&name], &update)?;
            show(client, VM_SET, &v, out)?;
        }
        VmCmd::Rm { name } => {
            let v = client.call(VM_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted VM {name}"));
        }
    }
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
    line("kernel", opt(&vm.kernel));
    line("cmdline", opt(&vm.cmdline));
    line("node", node);
    if out.wide() {
        line("node id", opt(&vm.node));
    }
    line("desired_state", word(&vm.desired_state));
    line("actual_state", word(&vm.actual_state));
    line("generation", vm.generation.to_string());
    Ok(())
}
