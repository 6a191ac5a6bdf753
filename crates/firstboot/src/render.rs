//! What an image seed becomes on the node: the systemd-networkd file of the management
//! interface and `tesserad`'s seed (`/etc/tessera/seed.toml`), checked by `tesserad`'s own
//! seed rules before anything is written.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use tessera_cluster::seed::{Seed, SeedError};

use tessera_hostnet::management::{Cidr, ManagementDef, RouteDef};

use crate::node_seed::{Mode, NodeSeed};

/// Discovery's port on the management address (Raft and RPCs use the next one).
pub const MANAGEMENT_PORT: u16 = 7946;
/// The REST API's port.
pub const API_PORT: u16 = 8006;
/// `tessera-store`'s NBD port (TLS), as its unit serves it.
pub const NBD_PORT: u16 = 10809;
/// Where the node keeps its state: the data partition is mounted here.
pub const DATA_DIR: &str = "/var/lib/tessera";

/// The systemd-networkd file for the management interface. A DHCP seed's address comes
/// from networkd's DHCP client; a static seed's address and default route are set by
/// `tessera-firstboot network` through netlink ([`management`]), so this file only
/// brings the link up, names the DNS servers and tells networkd to keep that address.
pub fn networkd(seed: &NodeSeed, interface: &str) -> String {
    let mut out = format!(
        "# Written by tessera-firstboot from the seed partition's seed.toml.\n\
         [Match]\nName={interface}\n\n[Network]\n"
    );
    match seed.network.mode {
        Mode::Dhcp => out.push_str("DHCP=yes\n"),
        Mode::Static => {
            out.push_str(
                "# The seed's address and gateway: tessera-network.service sets them through\n\
                 # netlink (marked proto 116); networkd keeps them (static addresses are\n\
                 # kept, and 10-tessera.conf stops it removing routes it did not make).\n\
                 KeepConfiguration=static\n",
            );
            for d in &seed.network.dns {
                out.push_str(&format!("DNS={d}\n"));
            }
        }
    }
    // Discovery announces to a multicast group on this link; the address is what peers
    // know the node by, so no IPv6 privacy addresses come and go under it.
    out.push_str("MulticastDNS=no\nIPv6PrivacyExtensions=no\n");
    if seed.network.mode == Mode::Dhcp {
        // The DHCP lease's host name must not replace the seed's.
        out.push_str("\n[DHCPv4]\nUseHostname=no\n");
    }
    out
}

/// systemd-networkd's own settings (`networkd.conf.d/10-tessera.conf`): it must not remove
/// routes it did not make, or it would take away the default route Tessera sets for a
/// static seed (networkd only keeps foreign routes of its own protocol numbers).
pub const NETWORKD_CONF: &str =
    "# Written by tessera-firstboot: the management routes of a static seed are set by\n\
     # tessera-network.service (marked proto 116), not by networkd, which must keep them.\n\
     [Network]\nManageForeignRoutes=no\n";

/// The management interface's addresses and routes a static seed asks for (its address,
/// and a default route through its gateway if it names one), for `tessera-firstboot
/// network` to apply through netlink; `None` for a DHCP seed (networkd's DHCP client sets
/// the lease's).
pub fn management(seed: &NodeSeed, interface: &str) -> Option<ManagementDef> {
    let a = seed.static_address()?;
    let address = Cidr {
        ip: a.ip,
        prefix: a.prefix,
    };
    let routes = seed
        .network
        .gateway
        .map(|g| RouteDef {
            destination: Cidr::default_for(g),
            gateway: Some(g),
        })
        .into_iter()
        .collect();
    Some(ManagementDef {
        interface: interface.to_string(),
        addresses: vec![address],
        routes,
    })
}

#[derive(Serialize)]
struct TesseradSeed<'a> {
    cluster_name: &'a str,
    node_name: &'a str,
    join_secret: &'a str,
    expected_nodes: usize,
    data_dir: &'a str,
    static_peers: Vec<SocketAddr>,
    management: Management<'a>,
    storage: Storage,
}

#[derive(Serialize)]
struct Management<'a> {
    address: SocketAddr,
    interface: &'a str,
    api: SocketAddr,
}

#[derive(Serialize)]
struct Storage {
    nbd: SocketAddr,
}

/// `tesserad`'s seed for this node, with the address its management interface has, as
/// text; returned only if `tesserad` would accept it (its errors name the field).
pub fn tesserad_seed(
    seed: &NodeSeed,
    hostname: &str,
    interface: &str,
    address: IpAddr,
    data_dir: &str,
    origin: &str,
) -> Result<String, SeedError> {
    let doc = TesseradSeed {
        cluster_name: &seed.cluster_name,
        node_name: hostname,
        join_secret: &seed.join_secret,
        expected_nodes: seed.expected_nodes,
        data_dir,
        static_peers: seed
            .static_peers
            .iter()
            .map(|ip| SocketAddr::new(*ip, MANAGEMENT_PORT))
            .collect(),
        management: Management {
            address: SocketAddr::new(address, MANAGEMENT_PORT),
            interface,
            api: SocketAddr::new(address, API_PORT),
        },
        storage: Storage {
            nbd: SocketAddr::new(address, NBD_PORT),
        },
    };
    let text = toml::to_string(&doc).map_err(|e| SeedError::Parse {
        path: origin.to_string(),
        reason: e.to_string(),
    })?;
    let text = format!(
        "# Written by tessera-firstboot from the seed partition's seed.toml each time\n\
         # tesserad starts (the management address may come from DHCP): edit that, not this.\n{text}"
    );
    Seed::parse(&text, origin)?;
    Ok(text)
}

/// Checks the cluster fields of a seed by `tesserad`'s rules before any address is known
/// (a DHCP node learns its address later): the same rendering with a documentation
/// address.
pub fn check_cluster_fields(seed: &NodeSeed, origin: &str) -> Result<(), SeedError> {
    let placeholder = IpAddr::from([192, 0, 2, 1]);
    tesserad_seed(seed, "check", "eth0", placeholder, DATA_DIR, origin).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(text: &str) -> NodeSeed {
        NodeSeed::parse(text, "seed.toml").expect("valid seed")
    }

    const DHCP: &str = r#"
cluster_name = "lab"
join_secret = "0123456789abcdef0123"
expected_nodes = 3
static_peers = ["10.0.0.12"]
[network]
mode = "dhcp"
"#;

    #[test]
    fn dhcp_gives_a_dhcp_network_file_and_a_seed_tesserad_accepts() {
        let s = seed(DHCP);
        let net = networkd(&s, "enp1s0");
        assert!(net.contains("[Match]\nName=enp1s0\n"), "{net}");
        assert!(net.contains("DHCP=yes\n"), "{net}");
        assert!(!net.contains("Address="), "{net}");
        let text = tesserad_seed(
            &s,
            "node1",
            "enp1s0",
            "10.0.0.11".parse().unwrap(),
            DATA_DIR,
            "x",
        )
        .expect("tesserad accepts it");
        let t = Seed::parse(&text, "x").expect("parses again");
        assert_eq!(t.cluster_name, "lab");
        assert_eq!(t.node_name.as_deref(), Some("node1"));
        assert_eq!(t.management.address, "10.0.0.11:7946".parse().unwrap());
        assert_eq!(t.management.interface.as_deref(), Some("enp1s0"));
        assert_eq!(
            t.management.api_address(),
            "10.0.0.11:8006".parse().unwrap()
        );
        assert_eq!(t.static_peers, vec!["10.0.0.12:7946".parse().unwrap()]);
        assert_eq!(t.storage.nbd, Some("10.0.0.11:10809".parse().unwrap()));
        assert_eq!(t.data_dir, std::path::PathBuf::from(DATA_DIR));
    }

    #[test]
    fn static_gives_the_address_gateway_and_dns() {
        let s = seed(
            &DHCP.replace(
                "mode = \"dhcp\"",
                "mode = \"static\"\naddress = \"10.0.0.11/24\"\ngateway = \"10.0.0.1\"\ndns = [\"10.0.0.2\", \"10.0.0.3\"]",
            ),
        );
        let net = networkd(&s, "eth0");
        for line in [
            "KeepConfiguration=static\n",
            "DNS=10.0.0.2\n",
            "DNS=10.0.0.3\n",
        ] {
            assert!(net.contains(line), "{line} missing in {net}");
        }
        // The address and gateway are tessera-network.service's, not networkd's.
        assert!(!net.contains("Address="), "{net}");
        assert!(!net.contains("Gateway="), "{net}");
        assert!(!net.contains("DHCP"), "{net}");
        let m = management(&s, "eth0").expect("a static seed's management");
        assert_eq!(m.interface, "eth0");
        assert_eq!(m.addresses, ["10.0.0.11/24".parse().unwrap()]);
        assert_eq!(
            m.routes,
            [RouteDef {
                destination: "0.0.0.0/0".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
            }]
        );
        tessera_hostnet::management::validate(&m).expect("valid");
        let no_gateway = seed(&DHCP.replace(
            "mode = \"dhcp\"",
            "mode = \"static\"\naddress = \"fd00::11/64\"",
        ));
        let m = management(&no_gateway, "eth1").expect("static");
        assert_eq!(m.addresses, ["fd00::11/64".parse().unwrap()]);
        assert!(m.routes.is_empty());
        assert_eq!(management(&seed(DHCP), "eth0"), None, "DHCP: networkd's");
    }

    #[test]
    fn tesserads_rules_apply_to_the_cluster_fields() {
        let short = seed(&DHCP.replace("0123456789abcdef0123", "short"));
        let e = check_cluster_fields(&short, "seed.toml").expect_err("short secret");
        assert!(e.to_string().contains("join_secret"), "{e}");
        let bad = seed(&DHCP.replace("\"lab\"", "\"lab cluster\""));
        let e = check_cluster_fields(&bad, "seed.toml").expect_err("space in name");
        assert!(e.to_string().contains("cluster_name"), "{e}");
        let none = seed(&DHCP.replace("expected_nodes = 3", "expected_nodes = 0"));
        assert!(check_cluster_fields(&none, "seed.toml").is_err());
    }
}
