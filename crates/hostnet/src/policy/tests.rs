//! The planner against hand-made link tables: every rule without a kernel.

use super::*;

fn def(name: &str, vlan: Option<u16>, uplink: Option<&str>) -> NetworkDef {
    NetworkDef {
        name: name.into(),
        vlan,
        uplink: uplink.map(str::to_string),
    }
}

fn link(index: u32, name: &str, kind: LinkKind, alias: Option<&str>) -> Link {
    Link {
        index,
        name: name.into(),
        kind,
        up: true,
        master: None,
        alias: alias.map(str::to_string),
        addresses: Vec::new(),
    }
}

#[test]
fn bad_definitions_fail_alone() {
    let links = [link(1, "eth0", LinkKind::Other, None)];
    let defs = [
        def("good", Some(7), Some("eth0")),
        def("zero", Some(0), Some("eth0")),
        def("high", Some(4095), Some("eth0")),
        def("nouplink", Some(5), None),
        def("gone", Some(5), Some("eth9")),
        def("again", Some(7), Some("eth0")),
        def("Bad_Name", None, None),
        def("untagged", None, Some("eth9")),
    ];
    let p = plan(&defs, &links);
    let failed: BTreeMap<&str, &NetworkError> =
        p.failed.iter().map(|(n, e)| (n.as_str(), e)).collect();
    assert!(matches!(
        failed["zero"],
        NetworkError::VlanOutOfRange { vlan: 0 }
    ));
    assert!(matches!(
        failed["high"],
        NetworkError::VlanOutOfRange { vlan: 4095 }
    ));
    assert!(matches!(
        failed["nouplink"],
        NetworkError::VlanWithoutUplink
    ));
    assert!(matches!(failed["gone"], NetworkError::UplinkMissing { .. }));
    assert!(matches!(
        failed["Bad_Name"],
        NetworkError::InvalidName { .. }
    ));
    assert!(matches!(
        failed["untagged"],
        NetworkError::UplinkMissing { .. }
    ));
    // "again" sorts first, so it gets eth0.7 and "good" is the one refused.
    assert!(matches!(failed["good"], NetworkError::VlanInUse { .. }));
    assert_eq!(p.networks.len(), 1);
    assert_eq!(p.networks[0].network, "again");
    assert_eq!(p.networks[0].vlan_interface.as_deref(), Some("eth0.7"));
}

#[test]
fn unmarked_interface_is_a_conflict_and_never_a_step() {
    let links = [
        link(1, "tsb-lan", LinkKind::Bridge, None),
        link(2, "tsb-other", LinkKind::Bridge, Some("admin's")),
    ];
    let p = plan(&[def("lan", None, None)], &links);
    assert!(p.networks.is_empty());
    assert!(p.removals.is_empty());
    assert!(matches!(
        &p.failed[0].1,
        NetworkError::Conflict { interface, owner: None } if interface == "tsb-lan"
    ));
    assert_eq!(p.foreign, ["tsb-lan", "tsb-other"]);
}

#[test]
fn a_settled_network_needs_no_steps_and_a_deleted_one_is_removed() {
    let mut vlan = link(
        3,
        "eth0.7",
        LinkKind::Vlan { id: 7, parent: 1 },
        Some("tessera:lan"),
    );
    vlan.master = Some(2);
    let links = vec![
        link(1, "eth0", LinkKind::Other, None),
        link(2, "tsb-lan", LinkKind::Bridge, Some("tessera:lan")),
        vlan,
        link(4, "tsb-old", LinkKind::Bridge, Some("tessera:old")),
    ];
    let p = plan(&[def("lan", Some(7), Some("eth0"))], &links);
    assert_eq!(p.networks[0].steps, []);
    assert_eq!(
        p.removals,
        [(
            "old".to_string(),
            Step::Delete {
                name: "tsb-old".into()
            }
        )]
    );
    assert!(p.failed.is_empty() && p.foreign.is_empty());
}

#[test]
fn drift_is_corrected() {
    let mut vlan = link(
        3,
        "eth0.7",
        LinkKind::Vlan { id: 7, parent: 1 },
        Some("tessera:lan"),
    );
    vlan.master = Some(9);
    vlan.up = false;
    let mut bridge = link(2, "tsb-lan", LinkKind::Bridge, Some("tessera:lan"));
    bridge.up = false;
    let links = vec![
        link(1, "eth0", LinkKind::Other, None),
        bridge,
        vlan,
        link(9, "br-admin", LinkKind::Bridge, None),
    ];
    let p = plan(&[def("lan", Some(7), Some("eth0"))], &links);
    assert_eq!(
        p.networks[0].steps,
        [
            Step::SetUp {
                name: "tsb-lan".into()
            },
            Step::SetMaster {
                name: "eth0.7".into(),
                master: "tsb-lan".into()
            },
            Step::SetUp {
                name: "eth0.7".into()
            },
        ]
    );
}

#[test]
fn colliding_names_get_distinct_bridges_and_keep_them() {
    // A short name equal to another's hashed form.
    let long = "abcdefghijklmnop";
    let clash = bridge_name(long, 0)[BRIDGE_PREFIX.len()..].to_string();
    let defs = [def(long, None, None), def(&clash, None, None)];
    let p = plan(&defs, &[]);
    let names: BTreeSet<&str> = p.networks.iter().map(|n| n.bridge.as_str()).collect();
    assert_eq!(names.len(), 2);
    // Whatever a network got, it keeps when the other one comes and goes.
    let existing: Vec<Link> = p
        .networks
        .iter()
        .enumerate()
        .map(|(i, n)| {
            link(
                i as u32 + 1,
                &n.bridge,
                LinkKind::Bridge,
                Some(&format!("tessera:{}", n.network)),
            )
        })
        .collect();
    let again = plan(&defs, &existing);
    assert!(again.networks.iter().all(|n| n.steps.is_empty()));
    assert!(again.removals.is_empty());
}

#[test]
fn a_changed_vlan_replaces_its_interface() {
    let mut old = link(
        3,
        "eth0.7",
        LinkKind::Vlan { id: 7, parent: 1 },
        Some("tessera:lan"),
    );
    old.master = Some(2);
    let links = vec![
        link(1, "eth0", LinkKind::Other, None),
        link(2, "tsb-lan", LinkKind::Bridge, Some("tessera:lan")),
        old,
        link(4, "eth1", LinkKind::Other, None),
    ];
    let create = |uplink: &str, id: u16, name: &str| {
        vec![
            Step::CreateVlan {
                name: name.into(),
                uplink: uplink.into(),
                id,
                mark: "tessera:lan".into(),
            },
            Step::SetMaster {
                name: name.into(),
                master: "tsb-lan".into(),
            },
            Step::SetUp { name: name.into() },
        ]
    };
    // Another id: a new name; the old interface is a removal, run before the steps.
    let p = plan(&[def("lan", Some(8), Some("eth0"))], &links);
    assert_eq!(
        p.removals,
        [(
            "lan".to_string(),
            Step::Delete {
                name: "eth0.7".into()
            }
        )]
    );
    assert_eq!(p.networks[0].steps, create("eth0", 8, "eth0.8"));
    // Another uplink: likewise.
    let p = plan(&[def("lan", Some(7), Some("eth1"))], &links);
    assert_eq!(
        p.removals,
        [(
            "lan".to_string(),
            Step::Delete {
                name: "eth0.7".into()
            }
        )]
    );
    assert_eq!(p.networks[0].steps, create("eth1", 7, "eth1.7"));
    // Same name, wrong id or parent underneath (made by an older Tessera, say): recreated.
    let mut odd = links.clone();
    odd[2].kind = LinkKind::Vlan { id: 7, parent: 4 };
    let p = plan(&[def("lan", Some(7), Some("eth0"))], &odd);
    assert!(p.removals.is_empty());
    let mut want = vec![Step::Delete {
        name: "eth0.7".into(),
    }];
    want.extend(create("eth0", 7, "eth0.7"));
    assert_eq!(p.networks[0].steps, want);
}

#[test]
fn a_deleted_networks_vlan_can_go_to_a_new_network() {
    let links = vec![
        link(1, "eth0", LinkKind::Other, None),
        link(2, "tsb-old", LinkKind::Bridge, Some("tessera:old")),
        link(
            3,
            "eth0.7",
            LinkKind::Vlan { id: 7, parent: 1 },
            Some("tessera:old"),
        ),
    ];
    let p = plan(&[def("new", Some(7), Some("eth0"))], &links);
    assert_eq!(
        p.removals,
        [(
            "old".to_string(),
            Step::Delete {
                name: "tsb-old".into()
            }
        )]
    );
    assert!(p.failed.is_empty());
    // The kernel allows one VLAN 7 on eth0: the old one goes before the new one comes.
    assert_eq!(
        p.networks[0].steps[2..4],
        [
            Step::Delete {
                name: "eth0.7".into()
            },
            Step::CreateVlan {
                name: "eth0.7".into(),
                uplink: "eth0".into(),
                id: 7,
                mark: "tessera:new".into(),
            }
        ]
    );

    // But while "old" is still defined (if broken), it keeps it.
    let p = plan(
        &[
            def("new", Some(7), Some("eth0")),
            def("old", Some(0), Some("eth0")),
        ],
        &links,
    );
    assert!(p.removals.is_empty() && p.networks.is_empty());
    let new = p.failed.iter().find(|(n, _)| n == "new").unwrap();
    assert_eq!(
        new.1,
        NetworkError::Conflict {
            interface: "eth0.7".into(),
            owner: Some("old".into())
        }
    );
}

#[test]
fn a_foreign_vlan_interface_of_that_name_is_a_conflict() {
    let links = vec![
        link(1, "eth0", LinkKind::Other, None),
        link(3, "eth0.7", LinkKind::Vlan { id: 7, parent: 1 }, None),
    ];
    let p = plan(&[def("lan", Some(7), Some("eth0"))], &links);
    assert!(p.networks.is_empty());
    assert_eq!(
        p.failed,
        [(
            "lan".to_string(),
            NetworkError::Conflict {
                interface: "eth0.7".into(),
                owner: None
            }
        )]
    );
}

#[test]
fn the_uplinks_vlan_under_another_name_is_a_conflict() {
    let links = vec![
        link(1, "eth0", LinkKind::Other, None),
        link(3, "vlan7", LinkKind::Vlan { id: 7, parent: 1 }, None),
    ];
    let p = plan(&[def("lan", Some(7), Some("eth0"))], &links);
    assert!(p.networks.is_empty());
    assert_eq!(
        p.failed,
        [(
            "lan".to_string(),
            NetworkError::Conflict {
                interface: "vlan7".into(),
                owner: None
            }
        )]
    );
    // VLAN 7 on another uplink is no obstacle.
    let mut other = links.clone();
    other.push(link(4, "eth1", LinkKind::Other, None));
    let p = plan(&[def("lan", Some(7), Some("eth1"))], &other);
    assert!(p.failed.is_empty(), "{:?}", p.failed);
}
