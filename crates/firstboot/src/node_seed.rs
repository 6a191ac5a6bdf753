//! The image seed: `seed.toml` on the image's TESSERASEED partition, what a user writes on
//! any computer before the node's first boot. Parsed and checked here with every mistake
//! named by its field; the cluster fields are checked by `tessera-cluster`'s own rules.

use std::net::IpAddr;

use serde::Deserialize;

/// A seed that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeSeedError {
    /// TOML syntax, unknown field or wrong type.
    #[error("{origin}: {reason}")]
    Parse {
        /// Where the seed came from.
        origin: String,
        /// Why (from the TOML parser, naming the field).
        reason: String,
    },
    /// A value out of range or missing for the chosen network mode.
    #[error("{origin}: field `{field}`: {reason}")]
    Invalid {
        /// Where the seed came from.
        origin: String,
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The example seed the image ships, not filled in.
    #[error("{origin}: still the image's example seed: set cluster_name, join_secret (`tessera seed new` makes one), expected_nodes and [network], then delete the `example = true` line")]
    Example {
        /// Where the seed came from.
        origin: String,
    },
}

/// How the management interface gets its address.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// From a DHCP server on the management LAN.
    Dhcp,
    /// The `address` (and `gateway`, `dns`) written in the seed.
    Static,
}

/// The management network.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// DHCP or static.
    pub mode: Mode,
    /// The management interface (default: the first Ethernet device with a hardware
    /// device behind it, by name).
    #[serde(default)]
    pub interface: Option<String>,
    /// Static only: the address with its prefix length, e.g. `10.0.0.11/24`.
    #[serde(default)]
    pub address: Option<String>,
    /// Static only: the default gateway (optional: a management LAN may have none).
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Static only: name servers.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

/// The image seed.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeSeed {
    /// The image's example seed says so; a node refuses to boot into a cluster with it.
    #[serde(default)]
    pub example: bool,
    /// Cluster name: every node of one cluster has the same.
    pub cluster_name: String,
    /// The cluster's join secret: every node of one cluster has the same.
    pub join_secret: String,
    /// How many nodes must see each other before the cluster forms.
    pub expected_nodes: usize,
    /// This node's host name (default: `tessera-` and the first 8 hex digits of its
    /// machine id).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Other nodes' management addresses, for a LAN without multicast.
    #[serde(default)]
    pub static_peers: Vec<IpAddr>,
    /// The management network.
    pub network: Network,
}

/// A static address and its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub ip: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// Parses `a.b.c.d/len` (or an IPv6 address with its length).
pub fn parse_cidr(text: &str) -> Option<Cidr> {
    let (ip, prefix) = text.split_once('/')?;
    let ip: IpAddr = ip.trim().parse().ok()?;
    let prefix: u8 = prefix.trim().parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (1..=max).contains(&prefix).then_some(Cidr { ip, prefix })
}

/// A host name systemd and DHCP servers accept: one DNS label.
pub fn valid_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// An interface name the kernel accepts.
fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl NodeSeed {
    /// Parses and checks seed text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<NodeSeed, NodeSeedError> {
        let seed: NodeSeed = toml::from_str(text).map_err(|e| NodeSeedError::Parse {
            origin: origin.to_string(),
            reason: e.to_string().replace('\n', " ").trim().to_string(),
        })?;
        let invalid = |field, reason: &str| NodeSeedError::Invalid {
            origin: origin.to_string(),
            field,
            reason: reason.to_string(),
        };
        if seed.example {
            return Err(NodeSeedError::Example {
                origin: origin.to_string(),
            });
        }
        if let Some(h) = &seed.hostname {
            if !valid_hostname(h) {
                return Err(invalid(
                    "hostname",
                    "1-63 letters, digits or '-', not starting or ending with '-'",
                ));
            }
        }
        let net = &seed.network;
        if let Some(i) = &net.interface {
            if !valid_interface(i) {
                return Err(invalid(
                    "network.interface",
                    "1-15 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        match net.mode {
            Mode::Static => match net.address.as_deref().map(parse_cidr) {
                None => return Err(invalid("network.address", "needed with mode = \"static\"")),
                Some(None) => {
                    return Err(invalid(
                        "network.address",
                        "an address with its prefix length, e.g. \"10.0.0.11/24\"",
                    ))
                }
                Some(Some(c)) if c.ip.is_unspecified() || c.ip.is_multicast() => {
                    return Err(invalid("network.address", "must be a unicast address"))
                }
                Some(Some(_)) => {}
            },
            Mode::Dhcp => {
                let stray = if net.address.is_some() {
                    Some("network.address")
                } else if net.gateway.is_some() {
                    Some("network.gateway")
                } else if !net.dns.is_empty() {
                    Some("network.dns")
                } else {
                    None
                };
                if let Some(field) = stray {
                    return Err(invalid(
                        field,
                        "only with mode = \"static\" (DHCP gives it)",
                    ));
                }
            }
        }
        Ok(seed)
    }

    /// The static address, if the seed gives one.
    pub fn static_address(&self) -> Option<Cidr> {
        match self.network.mode {
            Mode::Static => self.network.address.as_deref().and_then(parse_cidr),
            Mode::Dhcp => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATIC: &str = r#"
cluster_name = "lab"
join_secret = "0123456789abcdef0123"
expected_nodes = 3
hostname = "node1"
[network]
mode = "static"
address = "10.0.0.11/24"
gateway = "10.0.0.1"
dns = ["10.0.0.1"]
"#;

    #[test]
    fn a_static_seed_parses() {
        let s = NodeSeed::parse(STATIC, "seed.toml").expect("valid");
        assert_eq!(s.network.mode, Mode::Static);
        assert_eq!(
            s.static_address().map(|c| c.to_string()).as_deref(),
            Some("10.0.0.11/24")
        );
        assert_eq!(s.hostname.as_deref(), Some("node1"));
    }

    #[test]
    fn mistakes_are_named_by_field() {
        let cases = [
            (
                STATIC.replace("10.0.0.11/24", "10.0.0.11"),
                "network.address",
            ),
            (
                STATIC.replace("10.0.0.11/24", "10.0.0.11/33"),
                "network.address",
            ),
            (
                STATIC.replace("mode = \"static\"", "mode = \"dhcp\""),
                "network.address",
            ),
            (STATIC.replace("\"node1\"", "\"-node\""), "hostname"),
            (
                STATIC.replace("address = \"10.0.0.11/24\"\n", ""),
                "network.address",
            ),
        ];
        for (text, field) in cases {
            match NodeSeed::parse(&text, "seed.toml") {
                Err(NodeSeedError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected an error on {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_and_bad_types_are_refused() {
        let e = NodeSeed::parse(
            &STATIC.replace("expected_nodes = 3", "expected_nodes = \"three\""),
            "s",
        )
        .expect_err("a string is no count");
        assert!(e.to_string().contains("expected_nodes"), "{e}");
        let e = NodeSeed::parse(&format!("{STATIC}colour = \"red\"\n"), "s").expect_err("unknown");
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn the_example_seed_is_refused() {
        let e = NodeSeed::parse(&format!("example = true\n{STATIC}"), "s").expect_err("example");
        assert!(matches!(e, NodeSeedError::Example { .. }));
    }
}
