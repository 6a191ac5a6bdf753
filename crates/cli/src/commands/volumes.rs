//! Volumes, snapshots and clones: each change is a task, followed to its end with a
//! progress bar unless `--no-wait`.

use std::io::IsTerminal;

use serde_json::{json, Value};

use crate::args::VolumeCmd;
use crate::client::Client;
use crate::endpoints::{
    CLONE, SNAPSHOT_CREATE, SNAPSHOT_RM, VOLUME, VOLUMES, VOLUME_CREATE, VOLUME_RM,
};
use crate::node_names::NodeNames;
use crate::output::{col, field, size, table, wide_col, Output};

use super::nodes::resolve;
use super::tasks::follow;

pub fn run(client: &Client, cmd: VolumeCmd, out: Output) -> anyhow::Result<()> {
    let bar = std::io::stderr().is_terminal();
    let done = |v: &Value| println!("task {} {}", field(v, "id"), field(v, "state"));
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            node,
            no_wait,
        } => {
            let node = node.map(|n| resolve(client, &n)).transpose()?;
            let v = client.call(
                VOLUME_CREATE,
                &[],
                Some(json!({ "name": name, "size_bytes": size, "node": node })),
            )?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Ls => {
            let v = client.call(VOLUMES, &[], None)?;
            if out.is_json() {
                out.print(&v, |_| {});
                return Ok(());
            }
            let names = NodeNames::fetch(client)?;
            let rows = v.as_array().cloned().unwrap_or_default();
            table(
                &rows,
                &[
                    col("NAME", |v: &Value| field(v, "name")),
                    col("SIZE", |v: &Value| size(v["size_bytes"].as_u64())),
                    col("STATE", |v: &Value| field(v, "state")),
                    col("NODE", |v: &Value| names.name_of(&v["node"])),
                    wide_col("NODE ID", |v: &Value| field(v, "node")),
                    col("ORIGIN", |v: &Value| field(v, "origin")),
                    col("VM", |v: &Value| field(v, "attached_to")),
                    col("NBD", |v: &Value| field(v, "nbd")),
                ],
                out.wide(),
            );
        }
        VolumeCmd::Show { name } => {
            let v = client.call(VOLUME, &[&name], None)?;
            if out.is_json() {
                out.print(&v, |_| {});
                return Ok(());
            }
            let names = NodeNames::fetch(client)?;
            println!("{:<12} {}", "name", field(&v, "name"));
            println!("{:<12} {}", "size", size(v["size_bytes"].as_u64()));
            println!("{:<12} {}", "state", field(&v, "state"));
            println!("{:<12} {}", "node", names.name_of(&v["node"]));
            if out.wide() {
                println!("{:<12} {}", "node id", field(&v, "node"));
            }
            for f in ["origin", "attached_to", "nbd"] {
                println!("{f:<12} {}", field(&v, f));
            }
            for s in v["snapshots"].as_array().into_iter().flatten() {
                println!("snapshot     {} ({})", field(s, "name"), field(s, "state"));
            }
        }
        VolumeCmd::Snapshot {
            volume,
            snapshot,
            no_wait,
        } => {
            let v = client.call(
                SNAPSHOT_CREATE,
                &[&volume],
                Some(json!({ "name": snapshot })),
            )?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::SnapshotRm {
            volume,
            snapshot,
            no_wait,
        } => {
            let v = client.call(SNAPSHOT_RM, &[&volume, &snapshot], None)?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Clone {
            volume,
            snapshot,
            name,
            no_wait,
        } => {
            let v = client.call(
                CLONE,
                &[&volume],
                Some(json!({ "snapshot": snapshot, "name": name })),
            )?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Rm { name, no_wait } => {
            let v = client.call(VOLUME_RM, &[&name], None)?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
    }
    Ok(())
}
