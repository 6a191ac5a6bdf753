//! An untagged network's uplink: the node's interface the operator named, made a port of
//! the network's bridge, so the bridge reaches the other machines on that wire.
//!
//! It is the one interface Tessera changes without having made it, so the rules are
//! narrow: it is only ever attached to the bridge and set up, never renamed, marked,
//! re-addressed or deleted; deleting the network's bridge lets the kernel release it. It
//! is refused (and left as it is) when attaching it would break something: a bridge
//! (the kernel cannot nest them), an interface Tessera made, a port of a bridge that is
//! not this network's, or an interface carrying addresses (a bridge port's addresses stop
//! working, so naming the management interface would cut the node off).

use std::collections::BTreeMap;

use super::{Link, LinkKind, Step};
use crate::names::TAP_MARK_PREFIX;
use crate::NetworkError;

/// The steps that make `uplink` an up port of `bridge` for `network`. `new_bridge`: the
/// plan (re)creates the bridge, which then has no ports. `protected`: networks that failed
/// their checks, which keep what they have.
pub fn port_steps(
    network: &str,
    uplink: &str,
    bridge: &str,
    new_bridge: bool,
    by_name: &BTreeMap<&str, &Link>,
    by_index: &BTreeMap<u32, &Link>,
    protected: &std::collections::BTreeSet<String>,
) -> Result<Vec<Step>, NetworkError> {
    let unusable = |why: String| NetworkError::UplinkUnusable {
        uplink: uplink.into(),
        why,
    };
    let Some(l) = by_name.get(uplink) else {
        return Err(NetworkError::UplinkMissing {
            uplink: uplink.into(),
        });
    };
    if l.kind == LinkKind::Bridge {
        return Err(unusable("it is a bridge".into()));
    }
    let tessera_tap = l
        .alias
        .as_deref()
        .is_some_and(|a| a.starts_with(TAP_MARK_PREFIX));
    if l.owner().is_some() || tessera_tap {
        return Err(unusable("it is an interface Tessera made".into()));
    }
    if !l.addresses.is_empty() {
        return Err(unusable(format!(
            "it carries addresses ({}), which stop working on a bridge port; \
             move them off it first",
            l.addresses.join(", ")
        )));
    }
    let master = l.master.map(|i| by_index.get(&i).copied());
    let attach = match master {
        None => true,
        Some(Some(m)) if m.name == bridge => new_bridge,
        // Another network's bridge: taken over only when that network no longer wants it
        // (it is not desired, or no longer names this uplink: `plan` refused two desired
        // networks naming one uplink before getting here).
        Some(Some(m)) => match m.owner() {
            Some(o) if o != network && protected.contains(o) => {
                return Err(unusable(format!(
                    "it is a port of {} (network {o}, which failed its checks and keeps \
                     what it has)",
                    m.name
                )))
            }
            Some(_) => true,
            None => {
                return Err(unusable(format!(
                    "it is a port of {}, which is not Tessera's",
                    m.name
                )))
            }
        },
        // A master the listing did not show (gone meanwhile): attach, the kernel decides.
        Some(None) => true,
    };
    let mut steps = Vec::new();
    if attach {
        steps.push(Step::SetMaster {
            name: uplink.into(),
            master: bridge.into(),
        });
    }
    if !l.up {
        steps.push(Step::SetUp {
            name: uplink.into(),
        });
    }
    Ok(steps)
}

#[cfg(test)]
mod tests;
