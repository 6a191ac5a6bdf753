//! The untagged uplink's rules against hand-made link tables.

use std::collections::BTreeMap;

use crate::policy::{plan, Link, LinkKind, Step, MARK_PREFIX};
use crate::{NetworkDef, NetworkError};

fn untagged(name: &str, uplink: &str) -> NetworkDef {
    NetworkDef {
        name: name.into(),
        vlan: None,
        uplink: Some(uplink.into()),
    }
}

fn link(index: u32, name: &str, kind: LinkKind) -> Link {
    Link {
        index,
        name: name.into(),
        kind,
        up: true,
        master: None,
        alias: None,
        addresses: Vec::new(),
    }
}

fn bridge_of(index: u32, name: &str, network: &str) -> Link {
    Link {
        alias: Some(format!("{MARK_PREFIX}{network}")),
        ..link(index, name, LinkKind::Bridge)
    }
}

fn failures(defs: &[NetworkDef], links: &[Link]) -> BTreeMap<String, NetworkError> {
    plan(defs, links).failed.into_iter().collect()
}

#[test]
fn an_untagged_uplink_joins_the_new_bridge_and_then_is_settled() {
    let mut wire = link(1, "wire0", LinkKind::Other);
    wire.up = false;
    let p = plan(&[untagged("lan", "wire0")], &[wire.clone()]);
    assert!(p.failed.is_empty(), "{:?}", p.failed);
    assert_eq!(p.networks[0].vlan_interface, None);
    let shown: Vec<String> = p.networks[0].steps.iter().map(Step::to_string).collect();
    assert_eq!(
        shown,
        [
            "create bridge tsb-lan",
            "set tsb-lan up",
            "attach wire0 to tsb-lan",
            "set wire0 up"
        ]
    );
    // As the kernel has it afterwards: nothing to do.
    wire.up = true;
    wire.master = Some(2);
    let settled = [wire, bridge_of(2, "tsb-lan", "lan")];
    let p = plan(&[untagged("lan", "wire0")], &settled);
    assert!(p.failed.is_empty(), "{:?}", p.failed);
    assert!(p.networks[0].steps.is_empty(), "{:?}", p.networks[0].steps);
    assert!(p.removals.is_empty());
    // Detached by someone: attached again.
    let mut detached = settled.clone();
    detached[0].master = None;
    let p = plan(&[untagged("lan", "wire0")], &detached);
    assert_eq!(
        p.networks[0].steps,
        [Step::SetMaster {
            name: "wire0".into(),
            master: "tsb-lan".into()
        }]
    );
}

#[test]
fn an_uplink_that_would_break_something_is_refused_and_nothing_is_planned() {
    let mut addressed = link(1, "eth0", LinkKind::Other);
    addressed.addresses = vec!["10.77.0.1/24".into()];
    let mut tap = link(2, "tsn-web-0", LinkKind::Other);
    tap.alias = Some("tessera-tap:web/0".into());
    let mut foreign_port = link(4, "eth1", LinkKind::Other);
    foreign_port.master = Some(3);
    let links = [
        addressed,
        tap,
        link(3, "br0", LinkKind::Bridge),
        foreign_port,
        bridge_of(5, "tsb-other", "other"),
    ];
    let defs = [
        untagged("mgmt", "eth0"),
        untagged("taps", "tsn-web-0"),
        untagged("nested", "br0"),
        untagged("stolen", "eth1"),
        untagged("ours", "tsb-other"),
        untagged("typo", "eth9"),
    ];
    let p = plan(&defs, &links);
    assert!(p.networks.is_empty(), "{:?}", p.networks);
    let f: BTreeMap<String, NetworkError> = p.failed.into_iter().collect();
    let why = |n: &str| match &f[n] {
        NetworkError::UplinkUnusable { why, .. } => why.clone(),
        e => panic!("{n}: {e:?}"),
    };
    assert!(why("mgmt").contains("10.77.0.1/24"), "{}", why("mgmt"));
    assert!(f["mgmt"]
        .to_string()
        .starts_with("uplink eth0: cannot join the bridge"));
    assert_eq!(why("taps"), "it is an interface Tessera made");
    assert_eq!(why("nested"), "it is a bridge");
    assert_eq!(why("stolen"), "it is a port of br0, which is not Tessera's");
    assert_eq!(why("ours"), "it is a bridge");
    assert!(matches!(f["typo"], NetworkError::UplinkMissing { .. }));
}

#[test]
fn one_uplink_serves_one_untagged_network_and_any_tagged_ones() {
    let links = [link(1, "eth1", LinkKind::Other)];
    let defs = [
        untagged("a", "eth1"),
        untagged("b", "eth1"),
        NetworkDef {
            name: "c".into(),
            vlan: Some(7),
            uplink: Some("eth1".into()),
        },
    ];
    let f = failures(&defs, &links);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        f["b"],
        NetworkError::UplinkInUse {
            uplink: "eth1".into(),
            network: "a".into()
        }
    );
}

#[test]
fn an_uplink_moves_from_a_deleted_networks_bridge_but_not_from_a_failed_ones() {
    let mut wire = link(1, "wire0", LinkKind::Other);
    wire.master = Some(2);
    let links = [wire, bridge_of(2, "tsb-old", "old")];
    // "old" is gone: its bridge is deleted first, then the uplink joins the new one.
    let p = plan(&[untagged("new", "wire0")], &links);
    assert!(p.failed.is_empty(), "{:?}", p.failed);
    assert_eq!(
        p.removals,
        [(
            "old".to_string(),
            Step::Delete {
                name: "tsb-old".into()
            }
        )]
    );
    assert!(p.networks[0].steps.contains(&Step::SetMaster {
        name: "wire0".into(),
        master: "tsb-new".into()
    }));
    // "old" still wanted but failing its checks (a bad VLAN): it keeps its port.
    let bad_old = NetworkDef {
        name: "old".into(),
        vlan: Some(0),
        uplink: Some("eth0".into()),
    };
    let f = failures(&[untagged("new", "wire0"), bad_old], &links);
    assert!(
        matches!(&f["new"], NetworkError::UplinkUnusable { why, .. } if why.contains("network old")),
        "{f:?}"
    );
}
