//! The node's own management addresses and routes (a static seed's, or what a DHCP client
//! leased), as the node should have them, and the steps from what the kernel has to that.
//! Pure: [`apply`] reads the kernel and carries the steps out through rtnetlink.
//!
//! Ownership is the netlink protocol field: Tessera's addresses carry `IFA_PROTO`
//! [`MARK_PROTO`] and its routes `rtm_protocol` [`MARK_PROTO`] (`ip addr`/`ip route` show
//! `proto 116`). It survives a daemon restart; an address or route without it is never
//! changed or deleted, even where it stands in the way of what the seed asks for (that is
//! reported instead).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::names::valid_ifname;

pub mod apply;
#[cfg(test)]
mod tests;

pub use apply::apply;

/// The protocol number marking Tessera's addresses and routes ('t'). Not one the kernel
/// or iproute2's `rt_protos` table uses (0-4, 8-18, 42, 99, 186-192).
pub const MARK_PROTO: u8 = 116;

/// The metric of Tessera's routes: the kernel's own default for routes added without
/// one (0 for IPv4, 1024 for IPv6), set explicitly so a route reads back as it was added.
pub fn route_metric(destination: &Cidr) -> u32 {
    if destination.ip.is_ipv4() {
        0
    } else {
        1024
    }
}

/// An address with its prefix length, e.g. `10.0.0.11/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The default route's destination of `ip`'s family (`0.0.0.0/0` or `::/0`).
    pub fn default_for(ip: IpAddr) -> Cidr {
        let ip = match ip {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        Cidr { ip, prefix: 0 }
    }

    fn max_prefix(&self) -> u8 {
        if self.ip.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.ip, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// The network this address is in, with its host bits cleared.
    pub fn network(&self) -> Cidr {
        let ip = match self.ip {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Cidr {
            ip,
            prefix: self.prefix,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = ManagementError;

    fn from_str(s: &str) -> Result<Cidr, ManagementError> {
        let bad = || ManagementError::InvalidCidr {
            text: s.to_string(),
        };
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        let prefix: u8 = len.trim().parse().map_err(|_| bad())?;
        let c = Cidr { ip, prefix };
        if prefix > c.max_prefix() {
            return Err(bad());
        }
        Ok(c)
    }
}

/// A route the node should have: to `destination` (the default route is `0.0.0.0/0` or
/// `::/0`) through `gateway`, or straight out of the interface without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteDef {
    pub destination: Cidr,
    pub gateway: Option<IpAddr>,
}

impl fmt::Display for RouteDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destination.prefix == 0 {
            f.write_str("default")?;
        } else {
            write!(f, "{}", self.destination)?;
        }
        match self.gateway {
            Some(g) => write!(f, " via {g}"),
            None => Ok(()),
        }
    }
}

/// The management interface as this node should have it: the addresses and routes
/// Tessera sets. Everything else on the node stays as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagementDef {
    /// The interface (a NIC or a bridge).
    pub interface: String,
    pub addresses: Vec<Cidr>,
    /// In the main routing table, through `interface`.
    pub routes: Vec<RouteDef>,
}

/// Why the management interface could not be brought (entirely) to its definition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManagementError {
    #[error("{text:?}: not an address with its prefix length (e.g. 10.0.0.11/24)")]
    InvalidCidr { text: String },
    #[error("interface {interface:?}: not a valid interface name")]
    InvalidInterface { interface: String },
    #[error("interface {interface}: no such interface on this node")]
    InterfaceMissing { interface: String },
    #[error("address {address}: must be a unicast address")]
    NotUnicast { address: Cidr },
    #[error("address {address} is wanted twice")]
    DuplicateAddress { address: IpAddr },
    #[error("route {route}: the gateway is not of the destination's family")]
    MixedFamilies { route: RouteDef },
    #[error("route {route} is wanted twice")]
    DuplicateRoute { route: Cidr },
    #[error("{what} is not Tessera's (no proto {MARK_PROTO}); left alone, so {wanted} is not set")]
    Conflict { what: String, wanted: String },
    #[error("{step}: {message}")]
    Netlink { step: String, message: String },
}

/// An address the kernel has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresentAddress {
    pub interface: u32,
    pub cidr: Cidr,
    /// Marked with [`MARK_PROTO`].
    pub ours: bool,
}

/// A route of the main table the kernel has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresentRoute {
    pub destination: Cidr,
    pub gateway: Option<IpAddr>,
    /// The interface it leaves through, if it names one.
    pub interface: Option<u32>,
    /// Its metric (0 when it has none).
    pub metric: u32,
    /// Marked with [`MARK_PROTO`].
    pub ours: bool,
}

impl PresentRoute {
    fn describe(&self) -> String {
        let def = RouteDef {
            destination: self.destination,
            gateway: self.gateway,
        };
        format!("route {def}")
    }
}

/// One change, in order. The interface is its index, read just before the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    SetUp {
        interface: u32,
    },
    DeleteRoute {
        route: RouteDef,
        interface: Option<u32>,
    },
    DeleteAddress {
        interface: u32,
        address: Cidr,
    },
    AddAddress {
        interface: u32,
        address: Cidr,
    },
    /// Adds the route, or (`replace`) replaces Tessera's own route to the same destination.
    SetRoute {
        interface: u32,
        route: RouteDef,
        replace: bool,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::SetUp { interface } => write!(f, "set interface {interface} up"),
            Step::DeleteRoute { route, .. } => write!(f, "delete route {route}"),
            Step::DeleteAddress { address, .. } => write!(f, "delete address {address}"),
            Step::AddAddress { address, .. } => write!(f, "add address {address}"),
            Step::SetRoute {
                route,
                replace: false,
                ..
            } => write!(f, "add route {route}"),
            Step::SetRoute {
                route,
                replace: true,
                ..
            } => write!(f, "change route {route}"),
        }
    }
}

/// What the kernel has, as far as the plan cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Present {
    /// The management interface's index and whether it is up (None: it does not exist).
    pub interface: Option<(u32, bool)>,
    /// Every address of every interface.
    pub addresses: Vec<PresentAddress>,
    /// The main table's routes.
    pub routes: Vec<PresentRoute>,
}

/// The steps, and what stands in the way (foreign addresses or routes: left alone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub conflicts: Vec<ManagementError>,
}

/// Checks a definition on its own.
pub fn validate(def: &ManagementDef) -> Result<(), ManagementError> {
    if !valid_ifname(&def.interface) {
        return Err(ManagementError::InvalidInterface {
            interface: def.interface.clone(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for a in &def.addresses {
        let unicast = match a.ip {
            IpAddr::V4(v) => !(v.is_unspecified() || v.is_multicast() || v.is_broadcast()),
            IpAddr::V6(v) => !(v.is_unspecified() || v.is_multicast()),
        };
        if !unicast || a.prefix > a.max_prefix() {
            return Err(ManagementError::NotUnicast { address: *a });
        }
        if !seen.insert(a.ip) {
            return Err(ManagementError::DuplicateAddress { address: a.ip });
        }
    }
    let mut dests = std::collections::BTreeSet::new();
    for r in &def.routes {
        if r.destination.prefix > r.destination.max_prefix()
            || r.gateway
                .is_some_and(|g| g.is_ipv4() != r.destination.ip.is_ipv4())
        {
            return Err(ManagementError::MixedFamilies { route: *r });
        }
        if !dests.insert(r.destination.network()) {
            return Err(ManagementError::DuplicateRoute {
                route: r.destination.network(),
            });
        }
    }
    Ok(())
}

/// The steps from `present` to `def`: Tessera's stale routes and addresses go first
/// (anywhere on the node: a seed that moved to another interface leaves nothing behind),
/// then the interface comes up, then the addresses, then the routes (a gateway must be on
/// a subnet the interface has by then). Foreign addresses and routes are never in a step.
pub fn plan(def: &ManagementDef, present: &Present) -> Result<Plan, ManagementError> {
    validate(def)?;
    let Some((index, up)) = present.interface else {
        return Err(ManagementError::InterfaceMissing {
            interface: def.interface.clone(),
        });
    };
    let mut out = Plan::default();
    let wanted_routes: Vec<RouteDef> = def
        .routes
        .iter()
        .map(|r| RouteDef {
            destination: r.destination.network(),
            gateway: r.gateway,
        })
        .collect();

    // Tessera's routes that no longer fit: wrong interface, or a destination not wanted.
    // A wanted one through another gateway is replaced in place below.
    for r in present.routes.iter().filter(|r| r.ours) {
        let wanted = wanted_routes.iter().any(|w| {
            w.destination == r.destination
                && r.interface == Some(index)
                && r.metric == route_metric(&w.destination)
        });
        if !wanted {
            out.steps.push(Step::DeleteRoute {
                route: RouteDef {
                    destination: r.destination,
                    gateway: r.gateway,
                },
                interface: r.interface,
            });
        }
    }
    for a in present.addresses.iter().filter(|a| a.ours) {
        if a.interface != index || !def.addresses.contains(&a.cidr) {
            out.steps.push(Step::DeleteAddress {
                interface: a.interface,
                address: a.cidr,
            });
        }
    }
    if !up {
        out.steps.push(Step::SetUp { interface: index });
    }
    for want in &def.addresses {
        let here: Vec<&PresentAddress> = present
            .addresses
            .iter()
            .filter(|a| a.interface == index && a.cidr.ip == want.ip)
            .collect();
        if here.iter().any(|a| a.cidr == *want) {
            // There already, Tessera's or not: nothing to do.
            continue;
        }
        if let Some(foreign) = here.iter().find(|a| !a.ours) {
            out.conflicts.push(ManagementError::Conflict {
                what: format!("address {}", foreign.cidr),
                wanted: format!("address {want}"),
            });
            continue;
        }
        out.steps.push(Step::AddAddress {
            interface: index,
            address: *want,
        });
    }
    for want in &wanted_routes {
        // The kernel keeps one route per destination and metric in a table: Tessera's
        // have the family's default metric.
        let metric = route_metric(&want.destination);
        let same: Vec<&PresentRoute> = present
            .routes
            .iter()
            .filter(|r| r.destination == want.destination && r.metric == metric)
            .collect();
        if let Some(foreign) = same.iter().find(|r| !r.ours) {
            out.conflicts.push(ManagementError::Conflict {
                what: foreign.describe(),
                wanted: format!("route {want}"),
            });
            continue;
        }
        match same.iter().find(|r| r.ours) {
            Some(r) if r.gateway == want.gateway && r.interface == Some(index) => {}
            Some(r) if r.interface == Some(index) => out.steps.push(Step::SetRoute {
                interface: index,
                route: *want,
                replace: true,
            }),
            // Through another interface: deleted above; added anew.
            Some(_) | None => out.steps.push(Step::SetRoute {
                interface: index,
                route: *want,
                replace: false,
            }),
        }
    }
    Ok(out)
}

/// What one [`apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManagementReport {
    /// The changes made, in order, as people read them ("add address 10.0.0.11/24").
    pub changes: Vec<String>,
    /// What could not be set: foreign addresses or routes in the way, a step the kernel
    /// refused. The rest was applied regardless.
    pub problems: Vec<ManagementError>,
}

impl ManagementReport {
    /// Whether the node is as defined (possibly after changes).
    pub fn complete(&self) -> bool {
        self.problems.is_empty()
    }
}
