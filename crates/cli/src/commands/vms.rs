//! VM definitions: memory shown in human units, the node by name.

use anyhow::bail;
use serde_json::{json, Value};

use crate::args::VmCmd;
use crate::client::Client;
use crate::endpoints::{VM, VMS, VM_CREATE, VM_RM, VM_SET};
use crate::node_names::NodeNames;
use crate::output::{col, field, size, table, Output};

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
            let v = client.call(
                VM_CREATE,
                &[],
                Some(json!({
                    "name": name, "vcpus": vcpus, "memory_mib": mib(memory)?, "disks": disks,
                    "networks": networks, "kernel": kernel, "cmdline": cmdline, "node": node,
                })),
            )?;
            show(client, &v, out)?;
        }
        VmCmd::Ls => {
            let v = client.call(VMS, &[], None)?;
            out.print(&v, |v| {
                let rows = v.as_array().cloned().unwrap_or_default();
                table(
                    &rows,
                    &[
                        col("NAME", |v: &Value| field(v, "name")),
                        col("VCPUS", |v: &Value| field(v, "vcpus")),
                        col("MEMORY", memory),
                        col("DISKS", |v: &Value| field(v, "disks")),
                        col("DESIRED", |v: &Value| field(v, "desired_state")),
                        col("ACTUAL", |v: &Value| field(v, "actual_state")),
                    ],
                    out.wide(),
                )
            });
        }
        VmCmd::Show { name } => {
            let v = client.call(VM, &[&name], None)?;
            show(client, &v, out)?;
        }
        VmCmd::Set {
            name,
            vcpus,
            memory,
            disks,
            desired_state,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(c) = vcpus {
                body.insert("vcpus".into(), json!(c));
            }
            if let Some(m) = memory {
                body.insert("memory_mib".into(), json!(mib(m)?));
            }
            if let Some(d) = disks {
                body.insert("disks".into(), json!(d));
            }
            if let Some(s) = desired_state {
                body.insert("desired_state".into(), json!(s));
            }
            let v = client.call(VM_SET, &[&name], Some(Value::Object(body)))?;
            show(client, &v, out)?;
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
fn memory(v: &Value) -> String {
    size(
        v["memory_mib"]
            .as_u64()
            .and_then(|m| m.checked_mul(1 << 20)),
    )
}

fn show(client: &Client, v: &Value, out: Output) -> anyhow::Result<()> {
    if out.is_json() {
        out.print(v, |_| {});
        return Ok(());
    }
    // A VM that is not pinned has no node to look up.
    let node = if v["node"].is_string() {
        NodeNames::fetch(client)?.name_of(&v["node"])
    } else {
        "-".to_string()
    };
    let line = |label: &str, value: String| println!("{label:<14} {value}");
    line("name", field(v, "name"));
    line("vcpus", field(v, "vcpus"));
    line("memory", memory(v));
    for f in ["disks", "networks", "kernel", "cmdline"] {
        line(f, field(v, f));
    }
    line("node", node);
    if out.wide() {
        line("node id", field(v, "node"));
    }
    for f in ["desired_state", "actual_state", "generation"] {
        line(f, field(v, f));
    }
    Ok(())
}
