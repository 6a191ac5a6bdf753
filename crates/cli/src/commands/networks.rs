//! Virtual networks: a bridge, an optional VLAN and uplink.

use serde_json::{json, Value};

use crate::args::NetworkCmd;
use crate::client::Client;
use crate::endpoints::{NETWORKS, NETWORK_CREATE, NETWORK_RM};
use crate::output::{col, field, table, Output};

pub fn run(client: &Client, cmd: NetworkCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            bridge,
            vlan,
            uplink,
        } => {
            let v = client.call(
                NETWORK_CREATE,
                &[],
                Some(json!({ "name": name, "bridge": bridge, "vlan": vlan, "uplink": uplink })),
            )?;
            out.print(&v, |_| println!("defined network {name}"));
        }
        NetworkCmd::Ls => {
            let v = client.call(NETWORKS, &[], None)?;
            out.print(&v, |v| {
                let rows = v.as_array().cloned().unwrap_or_default();
                table(
                    &rows,
                    &[
                        col("NAME", |n: &Value| field(n, "name")),
                        col("BRIDGE", |n: &Value| field(n, "bridge")),
                        col("VLAN", |n: &Value| field(n, "vlan")),
                        col("UPLINK", |n: &Value| field(n, "uplink")),
                    ],
                    out.wide(),
                )
            });
        }
        NetworkCmd::Rm { name } => {
            let v = client.call(NETWORK_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted network {name}"));
        }
    }
    Ok(())
}
