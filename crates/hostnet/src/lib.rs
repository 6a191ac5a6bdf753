//! Setting up a node's VM networks through netlink: one Linux bridge per network and,
//! for a tagged network, the uplink's VLAN sub-interface as a port of it.
//!
//! An untagged network's uplink (the operator names it) becomes a port of the bridge itself.
//!
//! [`names`] says what the interfaces are called, [`policy`] decides what should exist and the steps to get there (pure); [`netlink`]
//! reads the interfaces and carries the steps out (rtnetlink, in the caller's network
//! namespace). The crate knows nothing about the cluster: `tesserad` maps its network
//! records to [`NetworkDef`]s and calls [`reconcile`]. It only ever changes or deletes
//! interfaces it marked as its own (alias `tessera:<network>`), never anyone else's.
//! [`tap`] makes a VM NIC's tap on a network's bridge; the tap lives as long as its fd.
//! [`management`] applies the node's own management addresses and routes (a static
//! seed's, or a DHCP lease's) to its management interface, marked as Tessera's.
// Only `tap` needs unsafe (the TUNSETIFF ioctl); the rest forbids it module by module.
#![deny(unsafe_code)]

pub mod management;
pub mod names;
pub mod netlink;
pub mod policy;
#[allow(unsafe_code)]
pub mod tap;

pub use netlink::reconcile;
pub use tap::{create_tap, Tap, TapError, TapSpec};

/// One network as this node should have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkDef {
    /// 1-63 of a-z, 0-9, '-'; the bridge's name is derived from it.
    pub name: String,
    /// 802.1Q VLAN id (1-4094) to tag on `uplink`.
    pub vlan: Option<u16>,
    /// This node's interface carrying the network: its VLAN when `vlan` is set, else the
    /// interface itself joins the bridge (untagged).
    pub uplink: Option<String>,
}

/// Why one network could not be set up; the others go on regardless.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("network name {name:?}: must be 1-63 of a-z, 0-9, '-', not starting with '-'")]
    InvalidName { name: String },
    #[error("network {name} is defined twice")]
    Duplicate { name: String },
    #[error("vlan {vlan}: must be 1 to 4094")]
    VlanOutOfRange { vlan: u16 },
    #[error("vlan: needs an uplink to tag on")]
    VlanWithoutUplink,
    #[error("uplink {uplink:?}: not a valid interface name")]
    InvalidUplink { uplink: String },
    #[error("uplink {uplink} is already network {network}'s untagged uplink")]
    UplinkInUse { uplink: String, network: String },
    #[error("uplink {uplink}: cannot join the bridge: {why}; left alone")]
    UplinkUnusable { uplink: String, why: String },
    #[error("uplink {uplink}: no such interface on this node")]
    UplinkMissing { uplink: String },
    #[error("vlan {vlan} on {uplink} is already network {network}'s")]
    VlanInUse {
        uplink: String,
        vlan: u16,
        network: String,
    },
    #[error("interface {interface} exists and is not Tessera's ({}); left alone",
        owner.as_deref().map_or("no mark".to_string(), |o| format!("marked for {o}")))]
    Conflict {
        interface: String,
        owner: Option<String>,
    },
    #[error("vlan: this node's kernel has no 802.1Q VLAN support (module 8021q)")]
    VlanUnsupported,
    #[error("{step}: {message}")]
    Netlink { step: String, message: String },
}

/// What happened to one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkReport {
    pub network: String,
    /// Its bridge (when it got as far as a name).
    pub bridge: Option<String>,
    pub vlan_interface: Option<String>,
    /// The changes made, in order, as people read them ("create bridge tsb-lan").
    pub changes: Vec<String>,
    pub result: Result<(), NetworkError>,
}

/// The outcome of one [`reconcile`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One entry per desired network, sorted by name.
    pub networks: Vec<NetworkReport>,
    /// Interfaces of networks no longer desired: deleted, or why not.
    pub removed: Vec<(String, Result<(), NetworkError>)>,
    /// Interfaces named like Tessera's but not marked as such: left alone.
    pub foreign: Vec<String>,
}

impl Report {
    /// Whether this pass changed nothing (a settled node).
    pub fn unchanged(&self) -> bool {
        self.removed.is_empty() && self.networks.iter().all(|n| n.changes.is_empty())
    }

    /// The report of one network.
    pub fn network(&self, name: &str) -> Option<&NetworkReport> {
        self.networks.iter().find(|n| n.network == name)
    }
}

/// Failures of the netlink connection itself (not of one network).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("listing interfaces: {0}")]
    List(String),
}
