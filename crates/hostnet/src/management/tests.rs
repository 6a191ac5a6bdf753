#![allow(clippy::unwrap_used)]

use super::*;

const IF: u32 = 7;
const OTHER_IF: u32 = 9;

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn route(dest: &str, via: Option<&str>) -> RouteDef {
    RouteDef {
        destination: cidr(dest),
        gateway: via.map(|g| g.parse().unwrap()),
    }
}

fn def(addresses: &[&str], routes: &[RouteDef]) -> ManagementDef {
    ManagementDef {
        interface: "mgmt0".into(),
        addresses: addresses.iter().map(|a| cidr(a)).collect(),
        routes: routes.to_vec(),
    }
}

fn addr(interface: u32, c: &str, ours: bool) -> PresentAddress {
    PresentAddress {
        interface,
        cidr: cidr(c),
        ours,
    }
}

fn present_route(dest: &str, via: Option<&str>, interface: u32, ours: bool) -> PresentRoute {
    let destination = cidr(dest);
    PresentRoute {
        destination,
        gateway: via.map(|g| g.parse().unwrap()),
        interface: Some(interface),
        metric: route_metric(&destination),
        ours,
    }
}

fn up(addresses: Vec<PresentAddress>, routes: Vec<PresentRoute>) -> Present {
    Present {
        interface: Some((IF, true)),
        addresses,
        routes,
    }
}

#[test]
fn cidrs_parse_and_print() {
    assert_eq!(cidr("10.0.0.11/24").to_string(), "10.0.0.11/24");
    assert_eq!(cidr("2001:db8::1/64").prefix, 64);
    for bad in [
        "10.0.0.11",
        "10.0.0.11/33",
        "::1/129",
        "x/24",
        "10.0.0.1/-1",
        "",
    ] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad}");
    }
    assert_eq!(cidr("10.0.5.11/24").network(), cidr("10.0.5.0/24"));
    assert_eq!(cidr("10.0.5.11/0").network(), cidr("0.0.0.0/0"));
    assert!(cidr("10.0.5.0/24").contains("10.0.5.200".parse().unwrap()));
    assert!(!cidr("10.0.5.0/24").contains("10.0.6.1".parse().unwrap()));
    assert_eq!(
        route("0.0.0.0/0", Some("10.0.0.1")).to_string(),
        "default via 10.0.0.1"
    );
}

#[test]
fn a_bare_interface_gets_everything_in_order() {
    let d = def(
        &["10.0.5.11/24", "2001:db8:5::11/64"],
        &[
            route("0.0.0.0/0", Some("10.0.5.1")),
            route("10.99.0.0/16", None),
        ],
    );
    let mut p = up(vec![], vec![]);
    p.interface = Some((IF, false));
    let plan = plan(&d, &p).unwrap();
    assert!(plan.conflicts.is_empty());
    let words: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
    assert_eq!(
        words,
        [
            "set interface 7 up",
            "add address 10.0.5.11/24",
            "add address 2001:db8:5::11/64",
            "add route default via 10.0.5.1",
            "add route 10.99.0.0/16",
        ]
    );
}

#[test]
fn what_is_there_already_is_not_touched_again() {
    let d = def(&["10.0.5.11/24"], &[route("0.0.0.0/0", Some("10.0.5.1"))]);
    let p = up(
        vec![addr(IF, "10.0.5.11/24", true)],
        vec![
            present_route("0.0.0.0/0", Some("10.0.5.1"), IF, true),
            // The kernel's prefix route for the address: not Tessera's, not wanted, kept.
            present_route("10.0.5.0/24", None, IF, false),
        ],
    );
    assert_eq!(plan(&d, &p).unwrap(), Plan::default());
    // The same address set by someone else counts as there (and is never removed later).
    let p = up(
        vec![addr(IF, "10.0.5.11/24", false)],
        vec![present_route("0.0.0.0/0", Some("10.0.5.1"), IF, true)],
    );
    assert_eq!(plan(&d, &p).unwrap(), Plan::default());
}

#[test]
fn tesseras_own_are_corrected_when_they_differ() {
    let d = def(&["10.0.5.12/24"], &[route("0.0.0.0/0", Some("10.0.5.2"))]);
    let p = up(
        vec![
            addr(IF, "10.0.5.11/24", true),
            addr(IF, "10.0.5.12/16", true),
        ],
        vec![present_route("0.0.0.0/0", Some("10.0.5.1"), IF, true)],
    );
    let plan = plan(&d, &p).unwrap();
    assert_eq!(
        plan.steps,
        [
            Step::DeleteAddress {
                interface: IF,
                address: cidr("10.0.5.11/24")
            },
            Step::DeleteAddress {
                interface: IF,
                address: cidr("10.0.5.12/16")
            },
            Step::AddAddress {
                interface: IF,
                address: cidr("10.0.5.12/24")
            },
            Step::SetRoute {
                interface: IF,
                route: route("0.0.0.0/0", Some("10.0.5.2")),
                replace: true
            },
        ]
    );
}

#[test]
fn foreign_addresses_and_routes_are_never_in_a_step() {
    let d = def(
        &["10.0.5.11/24"],
        &[route("10.66.0.0/16", Some("10.0.5.1"))],
    );
    let p = up(
        vec![
            addr(IF, "10.0.5.50/24", false),
            // The wanted address with another prefix, set by someone else.
            addr(IF, "10.0.5.11/16", false),
            addr(OTHER_IF, "192.168.1.5/24", false),
        ],
        vec![
            present_route("10.66.0.0/16", Some("10.0.5.9"), IF, false),
            present_route("10.55.0.0/16", Some("10.0.5.9"), IF, false),
            present_route("0.0.0.0/0", Some("192.168.1.1"), OTHER_IF, false),
        ],
    );
    let plan = plan(&d, &p).unwrap();
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    let said: Vec<String> = plan.conflicts.iter().map(ToString::to_string).collect();
    assert_eq!(
        said,
        [
            "address 10.0.5.11/16 is not Tessera's (no proto 116); left alone, so address 10.0.5.11/24 is not set",
            "route 10.66.0.0/16 via 10.0.5.9 is not Tessera's (no proto 116); left alone, so route 10.66.0.0/16 via 10.0.5.1 is not set",
        ]
    );
}

#[test]
fn an_empty_definition_removes_only_tesseras_own_everywhere() {
    let d = def(&[], &[]);
    let p = up(
        vec![
            addr(IF, "10.0.5.11/24", true),
            addr(IF, "10.0.5.50/24", false),
            addr(OTHER_IF, "10.1.0.3/24", true),
        ],
        vec![
            present_route("0.0.0.0/0", Some("10.0.5.1"), IF, true),
            present_route("10.55.0.0/16", Some("10.0.5.9"), IF, false),
        ],
    );
    let words: Vec<String> = plan(&d, &p)
        .unwrap()
        .steps
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        words,
        [
            "delete route default via 10.0.5.1",
            "delete address 10.0.5.11/24",
            "delete address 10.1.0.3/24",
        ]
    );
}

#[test]
fn a_route_moves_with_the_interface() {
    let d = def(&["10.0.5.11/24"], &[route("0.0.0.0/0", Some("10.0.5.1"))]);
    let p = up(
        vec![addr(OTHER_IF, "10.0.5.11/24", true)],
        vec![present_route("0.0.0.0/0", Some("10.0.5.1"), OTHER_IF, true)],
    );
    let plan = plan(&d, &p).unwrap();
    assert_eq!(
        plan.steps,
        [
            Step::DeleteRoute {
                route: route("0.0.0.0/0", Some("10.0.5.1")),
                interface: Some(OTHER_IF)
            },
            Step::DeleteAddress {
                interface: OTHER_IF,
                address: cidr("10.0.5.11/24")
            },
            Step::AddAddress {
                interface: IF,
                address: cidr("10.0.5.11/24")
            },
            Step::SetRoute {
                interface: IF,
                route: route("0.0.0.0/0", Some("10.0.5.1")),
                replace: false
            },
        ]
    );
}

#[test]
fn bad_definitions_are_refused_before_anything_is_read() {
    let missing = Present::default();
    let ok = def(&["10.0.5.11/24"], &[]);
    assert_eq!(
        plan(&ok, &missing),
        Err(ManagementError::InterfaceMissing {
            interface: "mgmt0".into()
        })
    );
    let p = up(vec![], vec![]);
    let mut bad = ok.clone();
    bad.interface = "a/b".into();
    assert!(matches!(
        plan(&bad, &p),
        Err(ManagementError::InvalidInterface { .. })
    ));
    for a in ["224.0.0.1/4", "0.0.0.0/8", "ff02::1/64"] {
        assert!(
            matches!(
                plan(&def(&[a], &[]), &p),
                Err(ManagementError::NotUnicast { .. })
            ),
            "{a}"
        );
    }
    assert!(matches!(
        plan(&def(&["10.0.5.11/24", "10.0.5.11/16"], &[]), &p),
        Err(ManagementError::DuplicateAddress { .. })
    ));
    assert!(matches!(
        plan(&def(&[], &[route("0.0.0.0/0", Some("2001:db8::1"))]), &p),
        Err(ManagementError::MixedFamilies { .. })
    ));
    assert!(matches!(
        plan(
            &def(
                &[],
                &[
                    route("10.9.0.0/16", None),
                    route("10.9.1.0/16", Some("10.0.5.1"))
                ]
            ),
            &p
        ),
        Err(ManagementError::DuplicateRoute { .. })
    ));
}
