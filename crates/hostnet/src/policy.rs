//! What should exist: network definitions checked and turned into interfaces, and the
//! steps from what exists to that. Pure: no netlink here, so every rule is unit-tested.
//!
//! Ownership is the interface alias [`MARK_PREFIX`]`<network>`: it survives a daemon
//! restart, and an interface without it is never changed, even if its name looks like ours.
//! The one exception is an untagged network's uplink, which the operator named: it is made
//! a port of the network's bridge (and up), nothing else ([`uplink`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::names::{bridge_name, valid_ifname, vlan_name, BRIDGE_PREFIX, VLAN_PREFIX};
use crate::{NetworkDef, NetworkError};

/// Alias prefix marking an interface as Tessera's; the network's name follows it.
pub const MARK_PREFIX: &str = "tessera:";
/// Network names: 1-63 of a-z, 0-9, '-' (as the cluster's API accepts them).
pub const NETWORK_NAME_MAX: usize = 63;

/// What a link is, as far as reconciliation cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    /// An 802.1Q sub-interface: its VLAN id and the index of the interface it tags on.
    Vlan {
        id: u16,
        parent: u32,
    },
    Other,
}

/// One interface as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    /// Administratively up (IFF_UP), not carrier.
    pub up: bool,
    /// Index of the bridge this interface is a port of.
    pub master: Option<u32>,
    pub alias: Option<String>,
    /// Its addresses a bridge port would lose (`ip/prefix`, global and site scope; not
    /// link-local ones, which every interface has).
    pub addresses: Vec<String>,
}

impl Link {
    /// The network whose mark this interface carries, if any.
    pub fn owner(&self) -> Option<&str> {
        self.alias.as_deref()?.strip_prefix(MARK_PREFIX)
    }
}

/// One change to make, in order. Names, not indexes: the I/O layer resolves them when
/// it gets there, after the earlier steps have run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Delete an interface Tessera marked (and only such).
    Delete {
        name: String,
    },
    /// Create a bridge, then mark it.
    CreateBridge {
        name: String,
        mark: String,
    },
    /// Create a VLAN sub-interface of `uplink`, then mark it.
    CreateVlan {
        name: String,
        uplink: String,
        id: u16,
        mark: String,
    },
    /// Make `name` a port of bridge `master`.
    SetMaster {
        name: String,
        master: String,
    },
    SetUp {
        name: String,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Delete { name } => write!(f, "delete {name}"),
            Step::CreateBridge { name, .. } => write!(f, "create bridge {name}"),
            Step::CreateVlan {
                name, uplink, id, ..
            } => write!(f, "create VLAN {id} interface {name} on {uplink}"),
            Step::SetMaster { name, master } => write!(f, "attach {name} to {master}"),
            Step::SetUp { name } => write!(f, "set {name} up"),
        }
    }
}

/// The plan for one desired network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPlan {
    pub network: String,
    pub bridge: String,
    pub vlan_interface: Option<String>,
    pub steps: Vec<Step>,
}

/// Everything reconciliation will do, and what it refuses to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Marked interfaces of networks no longer desired (or no longer needed by their
    /// network): deleted first, so their names are free for what comes next.
    pub removals: Vec<(String, Step)>,
    pub networks: Vec<NetworkPlan>,
    /// Networks that cannot be set up, with why. Their existing interfaces stay as they are.
    pub failed: Vec<(String, NetworkError)>,
    /// Interfaces with a Tessera name prefix but no mark: left alone, reported.
    pub foreign: Vec<String>,
}

/// Checks one definition on its own (what no node's state can change).
pub fn validate(def: &NetworkDef) -> Result<(), NetworkError> {
    let n = &def.name;
    if n.is_empty()
        || n.len() > NETWORK_NAME_MAX
        || n.starts_with('-')
        || !n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(NetworkError::InvalidName { name: n.clone() });
    }
    if let Some(u) = &def.uplink {
        if !valid_ifname(u) {
            return Err(NetworkError::InvalidUplink { uplink: u.clone() });
        }
    }
    match (def.vlan, &def.uplink) {
        (Some(v), _) if !(1..=4094).contains(&v) => Err(NetworkError::VlanOutOfRange { vlan: v }),
        (Some(_), None) => Err(NetworkError::VlanWithoutUplink),
        _ => Ok(()),
    }
}

fn mark(network: &str) -> String {
    format!("{MARK_PREFIX}{network}")
}

/// Whether a name looks like one Tessera would make (for reporting unmarked look-alikes).
fn has_tessera_prefix(name: &str) -> bool {
    name.starts_with(BRIDGE_PREFIX) || name.starts_with(VLAN_PREFIX)
}

/// The plan from `links` (what exists) to `defs` (what should).
pub fn plan(defs: &[NetworkDef], links: &[Link]) -> Plan {
    let mut out = Plan::default();
    let by_name: BTreeMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
    let by_index: BTreeMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();

    // Sorted by name, so names are handed out the same way on every node.
    let mut sorted: Vec<&NetworkDef> = defs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));

    let mut valid: Vec<&NetworkDef> = Vec::new();
    let mut seen = BTreeSet::new();
    // (uplink, vid) -> network: the kernel allows one VLAN interface per pair.
    let mut vlans: BTreeMap<(&str, u16), &str> = BTreeMap::new();
    // uplink -> network: an interface is a port of one bridge at most.
    let mut untagged: BTreeMap<&str, &str> = BTreeMap::new();
    for d in sorted {
        if !seen.insert(d.name.as_str()) {
            out.failed.push((
                d.name.clone(),
                NetworkError::Duplicate {
                    name: d.name.clone(),
                },
            ));
            continue;
        }
        if let Err(e) = validate(d) {
            out.failed.push((d.name.clone(), e));
            continue;
        }
        if let Some(u) = d.uplink.as_deref() {
            if !by_name.contains_key(u) {
                out.failed.push((
                    d.name.clone(),
                    NetworkError::UplinkMissing { uplink: u.into() },
                ));
                continue;
            }
        }
        if let (None, Some(u)) = (d.vlan, d.uplink.as_deref()) {
            if let Some(other) = untagged.get(u) {
                out.failed.push((
                    d.name.clone(),
                    NetworkError::UplinkInUse {
                        uplink: u.into(),
                        network: (*other).into(),
                    },
                ));
                continue;
            }
            untagged.insert(u, &d.name);
        }
        if let (Some(v), Some(u)) = (d.vlan, d.uplink.as_deref()) {
            if let Some(other) = vlans.get(&(u, v)) {
                out.failed.push((
                    d.name.clone(),
                    NetworkError::VlanInUse {
                        uplink: u.into(),
                        vlan: v,
                        network: (*other).into(),
                    },
                ));
                continue;
            }
            vlans.insert((u, v), &d.name);
        }
        valid.push(d);
    }

    // Bridge names: a network keeps the bridge it already has (its mark says which), so
    // adding a network never renames another's; new ones take the first free candidate.
    let desired: BTreeSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    let mut bridges: BTreeMap<&str, String> = BTreeMap::new();
    for d in &valid {
        if let Some(l) = links.iter().find(|l| {
            l.owner() == Some(d.name.as_str())
                && l.kind == LinkKind::Bridge
                && !taken.contains(&l.name)
        }) {
            taken.insert(l.name.clone());
            bridges.insert(&d.name, l.name.clone());
        }
    }
    for d in &valid {
        if bridges.contains_key(d.name.as_str()) {
            continue;
        }
        let free = |n: &String| {
            // A name is free unless another desired network has it (marked or planned).
            !taken.contains(n)
                && by_name
                    .get(n.as_str())
                    .and_then(|l| l.owner())
                    .is_none_or(|o| o == d.name || !desired.contains(o))
        };
        let name = (0..)
            .map(|a| bridge_name(&d.name, a))
            .find(free)
            .unwrap_or_default();
        taken.insert(name.clone());
        bridges.insert(&d.name, name);
    }

    // Networks that failed their checks keep their interfaces; no other network takes them.
    let invalid: BTreeSet<String> = out.failed.iter().map(|(n, _)| n.clone()).collect();
    let mut keep: BTreeSet<String> = BTreeSet::new();
    for d in valid {
        let bridge = bridges.get(d.name.as_str()).cloned().unwrap_or_default();
        match plan_network(d, &bridge, &by_name, &by_index, &invalid) {
            Ok(p) => {
                keep.insert(p.bridge.clone());
                keep.extend(p.vlan_interface.clone());
                out.networks.push(p);
            }
            Err(e) => out.failed.push((d.name.clone(), e)),
        }
    }

    // A failed network keeps what it has: a typo in its uplink must not cut its VMs off.
    let failed: BTreeSet<&str> = out.failed.iter().map(|(n, _)| n.as_str()).collect();
    for l in links {
        match l.owner() {
            Some(o) if !keep.contains(&l.name) && !failed.contains(o) => out.removals.push((
                o.to_string(),
                Step::Delete {
                    name: l.name.clone(),
                },
            )),
            None if has_tessera_prefix(&l.name) => out.foreign.push(l.name.clone()),
            _ => {}
        }
    }
    out
}

fn plan_network(
    d: &NetworkDef,
    bridge: &str,
    by_name: &BTreeMap<&str, &Link>,
    by_index: &BTreeMap<u32, &Link>,
    protected: &BTreeSet<String>,
) -> Result<NetworkPlan, NetworkError> {
    let mut steps = Vec::new();
    let m = mark(&d.name);
    let conflict = |l: &Link| NetworkError::Conflict {
        interface: l.name.clone(),
        owner: l.owner().map(str::to_string),
    };
    match by_name.get(bridge) {
        None => {
            steps.push(Step::CreateBridge {
                name: bridge.into(),
                mark: m.clone(),
            });
            steps.push(Step::SetUp {
                name: bridge.into(),
            });
        }
        Some(l) if l.owner() == Some(d.name.as_str()) && l.kind == LinkKind::Bridge => {
            if !l.up {
                steps.push(Step::SetUp {
                    name: bridge.into(),
                });
            }
        }
        // Marked by a network that failed its checks: that one keeps what it has.
        Some(l) if l.owner().is_some_and(|o| protected.contains(o)) => return Err(conflict(l)),
        // Ours but not a bridge, or another network's that is going away: replaced.
        Some(l) if l.owner().is_some() => {
            steps.push(Step::Delete {
                name: bridge.into(),
            });
            steps.push(Step::CreateBridge {
                name: bridge.into(),
                mark: m.clone(),
            });
            steps.push(Step::SetUp {
                name: bridge.into(),
            });
        }
        Some(l) => return Err(conflict(l)),
    }
    if let (None, Some(u)) = (d.vlan, d.uplink.as_deref()) {
        // A bridge made (again) in this plan has no ports yet.
        let new_bridge = steps.iter().any(|s| matches!(s, Step::CreateBridge { .. }));
        uplink::port_steps(&d.name, u, bridge, new_bridge, by_name, by_index, protected)?
            .into_iter()
            .for_each(|s| steps.push(s));
    }

    let mut vlan_interface = None;
    if let (Some(vid), Some(uplink)) = (d.vlan, d.uplink.as_deref()) {
        let name = vlan_name(uplink, vid);
        let uplink_index = by_name.get(uplink).map(|l| l.index);
        let create = |steps: &mut Vec<Step>| {
            steps.push(Step::CreateVlan {
                name: name.clone(),
                uplink: uplink.into(),
                id: vid,
                mark: m.clone(),
            });
            steps.push(Step::SetMaster {
                name: name.clone(),
                master: bridge.into(),
            });
            steps.push(Step::SetUp { name: name.clone() });
        };
        // The kernel allows one interface per (uplink, VLAN id), whatever its name: one
        // under another name (say an administrator's `vlan7`) would make ours fail.
        if let Some(l) = by_name.values().find(|l| {
            l.name != name
                && uplink_index.is_some_and(|u| l.kind == LinkKind::Vlan { id: vid, parent: u })
                && l.owner().is_none_or(|o| protected.contains(o))
        }) {
            return Err(conflict(l));
        }
        match by_name.get(name.as_str()) {
            None => create(&mut steps),
            Some(l) if l.owner() == Some(d.name.as_str()) => {
                let right_vlan = l.kind
                    == LinkKind::Vlan {
                        id: vid,
                        parent: uplink_index.unwrap_or(0),
                    };
                if !right_vlan {
                    steps.push(Step::Delete { name: name.clone() });
                    create(&mut steps);
                } else {
                    let master = l
                        .master
                        .and_then(|i| by_index.get(&i))
                        .map(|b| b.name.as_str());
                    if master != Some(bridge) {
                        steps.push(Step::SetMaster {
                            name: name.clone(),
                            master: bridge.into(),
                        });
                    }
                    if !l.up {
                        steps.push(Step::SetUp { name: name.clone() });
                    }
                }
            }
            Some(l) if l.owner().is_some_and(|o| protected.contains(o)) => return Err(conflict(l)),
            // Another network's that it no longer needs: replaced.
            Some(l) if l.owner().is_some() => {
                steps.push(Step::Delete { name: name.clone() });
                create(&mut steps);
            }
            Some(l) => return Err(conflict(l)),
        }
        vlan_interface = Some(name);
    }
    Ok(NetworkPlan {
        network: d.name.clone(),
        bridge: bridge.into(),
        vlan_interface,
        steps,
    })
}

#[cfg(test)]
mod tests;
pub mod uplink;
