//! The nodes: listed by name with their health and their storage's; removed by name or
//! id; put in maintenance and out; upgraded (`node_upgrade`).

use std::time::{Duration, Instant};

use anyhow::bail;
use tessera_api::{MaintenanceRequest, NodeInfo, NodeStorage, StorageState};

use crate::args::NodeCmd;
use crate::client::Client;
use crate::endpoints::{NODES, NODE_MAINTENANCE, NODE_RM};
use crate::node_names::NodeNames;
use crate::output::{col, table, wide_col, Output};

pub fn run(client: &Client, cmd: NodeCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Ls => {
            let v = client.call(NODES, &[], None)?;
            out.show(NODES, &v, |nodes: Vec<NodeInfo>| {
                let names = NodeNames::new(&nodes);
                table(
                    &nodes,
                    &[
                        col("NAME", |n: &NodeInfo| names.name(&n.id)),
                        wide_col("ID", |n: &NodeInfo| n.id.clone()),
                        wide_col("RAFT ID", |n: &NodeInfo| {
                            n.raft_id.map_or_else(|| "-".to_string(), |r| r.to_string())
                        }),
                        col("ADDRESS", |n: &NodeInfo| {
                            n.address.as_str().unwrap_or("-").to_string()
                        }),
                        col("MEMORY", |n: &NodeInfo| {
                            let a = &n.allocation;
                            format!("{}/{}", mib(a.memory_mib_allocated), mib(a.memory_mib))
                        }),
                        col("VCPUS", |n: &NodeInfo| {
                            let a = &n.allocation;
                            // Placed against the overcommitted limit, then the CPUs.
                            format!("{}/{} ({} CPUs)", a.vcpus_allocated, a.vcpus_limit, a.cpus)
                        }),
                        col("VMS", |n: &NodeInfo| n.allocation.vms.to_string()),
                        col("STORAGE", |n: &NodeInfo| storage_cell(n.storage.as_ref())),
                        col("STATE", |n: &NodeInfo| match &n.maintenance {
                            None => n.state.clone(),
                            Some(m) if m.drained => format!("{} (maintenance, drained)", n.state),
                            Some(m) => format!(
                                "{} (maintenance, draining: {})",
                                n.state,
                                m.vms_left.join(", ")
                            ),
                        }),
                    ],
                    out.wide(),
                );
                for n in &nodes {
                    if let Some(line) = storage_note(&names.name(&n.id), n.storage.as_ref()) {
                        println!("{line}");
                    }
                }
            })?;
        }
        NodeCmd::Rm { id: given, force } => {
            let id = resolve(client, &given)?;
            let q = if force { "?force=true" } else { "" };
            let v = client.call_q(NODE_RM, &[&id], q, None)?;
            out.print(&v, |_| println!("removed node {given}"));
        }
        NodeCmd::Maintenance {
            id: given,
            state,
            wait,
        } => {
            let id = resolve(client, &given)?;
            let v = client.send(
                NODE_MAINTENANCE,
                &[&id],
                &MaintenanceRequest { enabled: state },
            )?;
            if !state {
                out.print(&v, |_| {
                    println!("node {given} out of maintenance: it takes VMs again")
                });
                return Ok(());
            }
            if !wait {
                out.print(&v, |_| {
                    println!("node {given} in maintenance: its VMs move away (tessera node ls shows the drain)")
                });
                return Ok(());
            }
            let node = drain(|| client.get(NODES, &[]), &id, &given, !out.is_json())?;
            out.print(&node, |_| println!("node {given} drained"));
        }
        NodeCmd::Upgrade {
            nodes,
            image,
            tries,
            timeout,
            no_drain,
            settle,
        } => {
            let up = super::node_upgrade::Upgrade {
                nodes: &nodes,
                image: &image,
                tries,
                timeout: Duration::from_secs(timeout),
                no_drain,
                settle: Duration::from_secs(settle),
            };
            super::node_upgrade::run(client, up, out)?;
        }
    }
    Ok(())
}

/// How long `node maintenance --wait` follows a drain.
const DRAIN_WAIT: Duration = Duration::from_secs(600);

/// Follows node `id`'s drain until no VM is left on it; shows each change when `show`.
/// `nodes` asks for the node list (`node upgrade` asks any node's API, again while they
/// are not ready).
pub(crate) fn drain(
    mut nodes: impl FnMut() -> anyhow::Result<Vec<NodeInfo>>,
    id: &str,
    given: &str,
    show: bool,
) -> anyhow::Result<NodeInfo> {
    let deadline = Instant::now() + DRAIN_WAIT;
    let mut last = None;
    loop {
        let nodes = nodes()?;
        let Some(n) = nodes.into_iter().find(|n| n.id == id) else {
            bail!("node {given} is gone from the cluster");
        };
        let Some(m) = n.maintenance.clone() else {
            bail!("node {given} left maintenance while draining");
        };
        if m.drained {
            return Ok(n);
        }
        if show && last.as_ref() != Some(&m.vms_left) {
            println!("{given}: {} left", m.vms_left.join(", "));
            last = Some(m.vms_left.clone());
        }
        if Instant::now() >= deadline {
            bail!(
                "node {given} is not drained after {} s: {} left (the events say why)",
                DRAIN_WAIT.as_secs(),
                m.vms_left.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The id of the node `given` by name or id (an id is taken as it is, without a lookup).
pub fn resolve(client: &Client, given: &str) -> anyhow::Result<String> {
    if given.len() == 32 && given.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(given.to_string());
    }
    Ok(NodeNames::fetch(client)?.resolve(given))
}

/// A MiB count as people read it (`64M`, `7.5G`).
fn mib(v: u64) -> String {
    tessera_units::format_size(v.saturating_mul(1024 * 1024))
}

/// The STORAGE cell: a degraded store in capitals, to stand out in a long list; `-` for
/// a node that has not reported.
fn storage_cell(s: Option<&NodeStorage>) -> String {
    match s.map(|s| s.state) {
        None => "-".into(),
        Some(StorageState::Ok) => "ok".into(),
        Some(StorageState::Degraded) => "DEGRADED".into(),
        Some(StorageState::Unreachable) => "unreachable".into(),
    }
}

/// The line under the table that says why a node's storage is not ok.
fn storage_note(name: &str, s: Option<&NodeStorage>) -> Option<String> {
    let s = s?;
    let why = s.reason.as_deref().unwrap_or("no reason given");
    match s.state {
        StorageState::Ok => None,
        StorageState::Degraded => Some(format!(
            "{name}: storage DEGRADED: {why} (flushes fail until its tessera-store restarts)"
        )),
        StorageState::Unreachable => Some(format!("{name}: storage unreachable: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(state: StorageState, reason: Option<&str>) -> NodeStorage {
        NodeStorage {
            state,
            reason: reason.map(String::from),
            checked_ms: 1,
        }
    }

    #[test]
    fn a_degraded_store_stands_out_and_says_why() {
        let ok = storage(StorageState::Ok, None);
        let bad = storage(StorageState::Degraded, Some("syncing WAL segment 3: EIO"));
        let gone = storage(StorageState::Unreachable, Some("admin socket: refused"));
        assert_eq!(storage_cell(Some(&ok)), "ok");
        assert_eq!(storage_cell(Some(&bad)), "DEGRADED");
        assert_eq!(storage_cell(Some(&gone)), "unreachable");
        assert_eq!(storage_cell(None), "-");
        assert_eq!(storage_note("node1", Some(&ok)), None);
        assert_eq!(storage_note("node1", None), None);
        assert_eq!(
            storage_note("node2", Some(&bad)).unwrap(),
            "node2: storage DEGRADED: syncing WAL segment 3: EIO \
             (flushes fail until its tessera-store restarts)"
        );
        assert_eq!(
            storage_note("node3", Some(&gone)).unwrap(),
            "node3: storage unreachable: admin socket: refused"
        );
    }
}
