//! Virtual networks: a bridge, an optional VLAN and uplink.

use tessera_api::{Network, NewNetwork};

use crate::args::NetworkCmd;
use crate::client::Client;
use crate::endpoints::{NETWORKS, NETWORK_CREATE, NETWORK_RM};
use crate::output::{col, opt, table, Output};

pub fn run(client: &Client, cmd: NetworkCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            bridge,
            vlan,
            uplink,
        } => {
            let v = client.send(
                NETWORK_CREATE,
                &[],
                &NewNetwork {
                    name: name.clone(),
                    bridge,
                    vlan,
                    uplink,
                },
            )?;
            out.print(&v, |_| println!("defined network {name}"));
        }
        NetworkCmd::Ls => {
            let v = client.call(NETWORKS, &[], None)?;
            out.show(NETWORKS, &v, |nets: Vec<Network>| {
                table(
                    &nets,
                    &[
                        col("NAME", |n: &Network| n.name.clone()),
                        col("BRIDGE", |n: &Network| n.bridge.clone()),
                        col("VLAN", |n: &Network| {
                            n.vlan.map_or_else(|| "-".into(), |v| v.to_string())
                        }),
                        col("UPLINK", |n: &Network| opt(&n.uplink)),
                    ],
                    out.wide(),
                )
            })?;
        }
        NetworkCmd::Rm { name } => {
            let v = client.call(NETWORK_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted network {name}"));
        }
    }
    Ok(())
}
