//! Virtual networks.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A virtual network: a bridge on every node, optionally on a VLAN of an uplink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    /// Name.
    pub name: String,
    /// The Linux bridge VMs' taps join (1-15 characters).
    pub bridge: String,
    /// 802.1Q VLAN id on the uplink (1-4094), if tagged.
    pub vlan: Option<u16>,
    /// The nodes' uplink interface, if the bridge has one.
    pub uplink: Option<String>,
    /// Set while a delete is checking that no VM uses it; VMs cannot attach meanwhile.
    #[serde(default)]
    pub deleting: bool,
    /// Created (ms since the epoch).
    pub created_ms: u64,
    /// How each node last reported setting it up (by node id), filled in by `GET`;
    /// never stored in the record.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nodes: std::collections::BTreeMap<String, NetworkOnNode>,
}

/// A network as one node has it: the bridge it made (named by Tessera, `tsb-<network>`
/// or a hashed form), its VLAN interface, and whether the last pass succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkOnNode {
    /// The Linux bridge VMs' taps join on that node, once named.
    pub bridge: Option<String>,
    /// The VLAN sub-interface, for a tagged network.
    #[serde(default)]
    pub vlan_interface: Option<String>,
    /// `ok` or `error`.
    pub state: String,
    /// Why not, when `error`.
    #[serde(default)]
    pub error: Option<String>,
    /// When the node last reported it (ms since the epoch).
    pub since_ms: u64,
}

/// A new network. A `vlan` needs an `uplink`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
#[schema(examples(json!({"name": "lan", "bridge": "br-lan", "vlan": 7, "uplink": "eth0"})))]
pub struct NewNetwork {
    /// 1-63 of a-z, 0-9, '-', starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// Linux bridge name, 1-15 of a-z, 0-9, '-', '.', '_'.
    #[schema(min_length = 1, max_length = 15, pattern = "^[a-z0-9._-]{1,15}$")]
    pub bridge: String,
    /// VLAN id 1-4094 (needs `uplink`).
    #[serde(
        default,
        deserialize_with = "crate::strict::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 4094)]
    pub vlan: Option<u16>,
    /// Uplink interface name, 1-15 of a-z, 0-9, '-', '.', '_'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 15, pattern = "^[a-z0-9._-]{1,15}$")]
    pub uplink: Option<String>,
}

crate::object_only!(NewNetwork);
