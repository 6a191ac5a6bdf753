//! The management interface's addresses and routes against a real kernel: each test runs
//! in a network namespace of its own on a veth pair standing in for the node's NIC, and
//! checks the outcome with iproute2's `ip -j addr` and `ip -j route`, tools we did not
//! write. Added when missing, corrected when different, a second pass changes nothing,
//! and what Tessera did not set is never touched. Needs root; prints SKIP without it.
// Helpers outside `#[test]`s unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;
use tessera_hostnet::management::{
    apply, Cidr, ManagementDef, ManagementError, ManagementReport, RouteDef,
};

fn ip_json(args: &[&str]) -> Vec<Value> {
    let out = Command::new("ip").arg("-j").args(args).output().unwrap();
    assert!(out.status.success(), "ip -j {args:?}");
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `ip -j addr show dev <dev>`: its addresses as `ip/len`, link-local ones left out.
fn addrs(dev: &str) -> Vec<String> {
    let mut out: Vec<String> = ip_json(&["addr", "show", "dev", dev])
        .iter()
        .flat_map(|l| l["addr_info"].as_array().unwrap().clone())
        .filter(|a| a["scope"] != "link")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    out.sort();
    out
}

/// `ip -j route` of both families in the main table: `dst [via gw] dev d [proto p]`,
/// sorted; the kernel's link-local IPv6 routes left out.
fn routes() -> Vec<String> {
    let mut out: Vec<String> = ["-4", "-6"]
        .iter()
        .flat_map(|f| ip_json(&[f, "route", "show", "table", "main"]))
        .filter(|r| r["dst"] != "fe80::/64")
        .map(|r| {
            let mut s = r["dst"].as_str().unwrap().to_string();
            if let Some(g) = r["gateway"].as_str() {
                s.push_str(&format!(" via {g}"));
            }
            s.push_str(&format!(" dev {}", r["dev"].as_str().unwrap()));
            if let Some(p) = r["protocol"].as_str() {
                s.push_str(&format!(" proto {p}"));
            }
            s
        })
        .collect();
    out.sort();
    out
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn route(dest: &str, via: Option<&str>) -> RouteDef {
    RouteDef {
        destination: cidr(dest),
        gateway: via.map(|g| g.parse().unwrap()),
    }
}

fn def(dev: &str, addresses: &[&str], routes: &[RouteDef]) -> ManagementDef {
    ManagementDef {
        interface: dev.into(),
        addresses: addresses.iter().map(|a| cidr(a)).collect(),
        routes: routes.to_vec(),
    }
}

fn run_mgmt(rt: &tokio::runtime::Runtime, d: &ManagementDef) -> ManagementReport {
    rt.block_on(apply(d)).unwrap()
}

/// A veth pair `dev`/`<dev>p`, its peer up (so the kernel gives the link a carrier: IPv6
/// gateways need one); `dev` stays down for Tessera to bring up.
fn nic(dev: &str) {
    uplink(dev);
    sh(&["ip", "link", "set", &format!("{dev}p"), "up"]);
}

#[test]
fn addresses_and_routes_are_added_and_a_second_pass_changes_nothing() {
    let test = "addresses_and_routes_are_added_and_a_second_pass_changes_nothing";
    in_fresh_netns(test, |rt| {
        nic("mgmt0");
        let d = def(
            "mgmt0",
            &["10.77.5.11/24", "2001:db8:5::11/64"],
            &[
                route("0.0.0.0/0", Some("10.77.5.1")),
                route("10.99.0.0/16", Some("10.77.5.254")),
                route("10.98.0.0/16", None),
                route("::/0", Some("2001:db8:5::1")),
            ],
        );
        let r = run_mgmt(rt, &d);
        assert!(r.complete(), "{r:?}");
        assert_eq!(r.changes.len(), 7, "{r:?}");
        assert!(is_up(&ip_link("mgmt0").unwrap()));
        assert_eq!(addrs("mgmt0"), ["10.77.5.11/24", "2001:db8:5::11/64"]);
        assert_eq!(
            routes(),
            [
                // The kernel's prefix routes for the addresses are the kernel's.
                "10.77.5.0/24 dev mgmt0 proto kernel",
                "10.98.0.0/16 dev mgmt0 proto 116",
                "10.99.0.0/16 via 10.77.5.254 dev mgmt0 proto 116",
                "2001:db8:5::/64 dev mgmt0 proto kernel",
                "default via 10.77.5.1 dev mgmt0 proto 116",
                "default via 2001:db8:5::1 dev mgmt0 proto 116",
            ]
        );
        // Idempotent: nothing to do, nothing changed.
        let (a, rs) = (addrs("mgmt0"), routes());
        let again = run_mgmt(rt, &d);
        assert_eq!(again, ManagementReport::default());
        assert_eq!((addrs("mgmt0"), routes()), (a, rs));
    });
}

#[test]
fn tesseras_own_are_corrected_when_the_definition_changes() {
    let test = "tesseras_own_are_corrected_when_the_definition_changes";
    in_fresh_netns(test, |rt| {
        nic("mgmt0");
        nic("mgmt1");
        let first = def(
            "mgmt0",
            &["10.77.5.11/24"],
            &[route("0.0.0.0/0", Some("10.77.5.1"))],
        );
        assert!(run_mgmt(rt, &first).complete());
        // Another address, another gateway.
        let second = def(
            "mgmt0",
            &["10.77.5.12/24"],
            &[route("0.0.0.0/0", Some("10.77.5.2"))],
        );
        let r = run_mgmt(rt, &second);
        assert!(r.complete(), "{r:?}");
        assert_eq!(addrs("mgmt0"), ["10.77.5.12/24"]);
        assert_eq!(
            routes(),
            [
                "10.77.5.0/24 dev mgmt0 proto kernel",
                "default via 10.77.5.2 dev mgmt0 proto 116",
            ]
        );
        // A wider prefix for the same address.
        let wider = def(
            "mgmt0",
            &["10.77.5.12/16"],
            &[route("0.0.0.0/0", Some("10.77.5.2"))],
        );
        assert!(run_mgmt(rt, &wider).complete());
        assert_eq!(addrs("mgmt0"), ["10.77.5.12/16"]);
        assert!(routes().contains(&"default via 10.77.5.2 dev mgmt0 proto 116".to_string()));
        // The management interface moves: nothing of Tessera's stays on the old one.
        let moved = def(
            "mgmt1",
            &["10.77.6.11/24"],
            &[route("0.0.0.0/0", Some("10.77.6.1"))],
        );
        let r = run_mgmt(rt, &moved);
        assert!(r.complete(), "{r:?}");
        assert!(addrs("mgmt0").is_empty(), "{:?}", addrs("mgmt0"));
        assert_eq!(addrs("mgmt1"), ["10.77.6.11/24"]);
        assert_eq!(
            routes(),
            [
                "10.77.6.0/24 dev mgmt1 proto kernel",
                "default via 10.77.6.1 dev mgmt1 proto 116",
            ]
        );
    });
}

#[test]
fn what_tessera_did_not_set_is_never_touched() {
    let test = "what_tessera_did_not_set_is_never_touched";
    in_fresh_netns(test, |rt| {
        nic("mgmt0");
        sh(&["ip", "link", "set", "mgmt0", "up"]);
        // Someone else's: an address, the address Tessera wants (same prefix), a route
        // Tessera does not want, and one to a destination Tessera wants.
        sh(&["ip", "addr", "add", "10.77.5.50/24", "dev", "mgmt0"]);
        sh(&["ip", "addr", "add", "10.77.5.20/24", "dev", "mgmt0"]);
        sh(&["ip", "route", "add", "10.55.0.0/16", "via", "10.77.5.9"]);
        sh(&["ip", "route", "add", "10.66.0.0/16", "via", "10.77.5.9"]);
        let d = def(
            "mgmt0",
            &["10.77.5.11/24", "10.77.5.20/24"],
            &[
                route("10.66.0.0/16", Some("10.77.5.1")),
                route("0.0.0.0/0", Some("10.77.5.1")),
            ],
        );
        let r = run_mgmt(rt, &d);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            matches!(&r.problems[0], ManagementError::Conflict { what, .. } if what == "route 10.66.0.0/16 via 10.77.5.9"),
            "{r:?}"
        );
        assert_eq!(
            r.changes,
            [
                "add address 10.77.5.11/24",
                "add route default via 10.77.5.1"
            ]
        );
        assert_eq!(
            addrs("mgmt0"),
            ["10.77.5.11/24", "10.77.5.20/24", "10.77.5.50/24"]
        );
        assert_eq!(
            routes(),
            [
                "10.55.0.0/16 via 10.77.5.9 dev mgmt0",
                "10.66.0.0/16 via 10.77.5.9 dev mgmt0",
                "10.77.5.0/24 dev mgmt0 proto kernel",
                "default via 10.77.5.1 dev mgmt0 proto 116",
            ]
        );
        // Nothing wanted any more: only Tessera's own go; the rest is as it was.
        let r = run_mgmt(rt, &def("mgmt0", &[], &[]));
        assert!(r.complete(), "{r:?}");
        assert_eq!(addrs("mgmt0"), ["10.77.5.20/24", "10.77.5.50/24"]);
        assert_eq!(
            routes(),
            [
                "10.55.0.0/16 via 10.77.5.9 dev mgmt0",
                "10.66.0.0/16 via 10.77.5.9 dev mgmt0",
                "10.77.5.0/24 dev mgmt0 proto kernel",
            ]
        );
        // An interface that does not exist: reported, nothing changed.
        let r = run_mgmt(rt, &def("nosuch0", &["10.77.7.1/24"], &[]));
        assert_eq!(
            r.problems,
            [ManagementError::InterfaceMissing {
                interface: "nosuch0".into()
            }]
        );
        assert!(r.changes.is_empty());
    });
}
