//! The nodes: listed by name with their health; removed by name or id.

use tessera_api::NodeInfo;

use crate::args::NodeCmd;
use crate::client::Client;
use crate::endpoints::{NODES, NODE_RM};
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
                        col("STATE", |n: &NodeInfo| n.state.clone()),
                    ],
                    out.wide(),
                );
            })?;
        }
        NodeCmd::Rm { id: given, force } => {
            let id = resolve(client, &given)?;
            let q = if force { "?force=true" } else { "" };
            let v = client.call_q(NODE_RM, &[&id], q, None)?;
            out.print(&v, |_| println!("removed node {given}"));
        }
    }
    Ok(())
}

/// The id of the node `given` by name or id (an id is taken as it is, without a lookup).
pub fn resolve(client: &Client, given: &str) -> anyhow::Result<String> {
    if given.len() == 32 && given.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(given.to_string());
    }
    Ok(NodeNames::fetch(client)?.resolve(given))
}
