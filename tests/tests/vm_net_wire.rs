//! VMs on separate machines on one network (issue #11): three nodes, each in a network
//! namespace of its own (`tessera_tests::Lan`, as vm_ha's partition test), so each has its
//! own bridges; node0 and node1 are also linked by a second cable, a veth pair called
//! `wire0` at both ends, which network `wire` names as its untagged uplink.
//!
//! Checked: node0 and node1 make `wire0` an up port of `tsb-wire` and report `ok`; node2,
//! without `wire0`, reports the missing uplink for itself (GET /networks/wire) and makes
//! nothing; a VM pinned there is refused with that reason. A test guest on node0 and one on
//! node1 ping each other across the wire (their bridges are separate: the frames can only
//! cross the cable), and node1's namespace pings the guest on node0 too.
//!
//! Then node0's `tesserad` is killed (SIGKILL) and started again: the guest's VMM keeps
//! running (same pid, re-adopted), its tap stays the bridge's port (same ifindex, one
//! tap, nothing duplicated) through more than one network recheck, and the guest still
//! answers pings across the wire. A stop afterwards takes the tap away. Deleting the
//! network removes the bridges and releases `wire0` on both nodes, which stays.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for};
use tessera_tests::vms::{console, node_ids, vm, vm_pid, wait_state, VmCluster, GUEST};
use tessera_tests::{output, require, Lan};

const BRIDGE: &str = "tsb-wire";
const IP_A: &str = "10.0.98.2";
const IP_B: &str = "10.0.98.3";
/// node1's own address on its bridge, for pings from its namespace.
const IP_NODE1: &str = "10.0.98.9";

/// `ip -n <node's namespace> -j link show ...` as JSON (empty when nothing matches).
fn links(lan: &Lan, i: usize, args: &[&str]) -> Vec<Value> {
    let o = output(
        Command::new("ip")
            .args(["-n", lan.netns(i), "-j", "link", "show"])
            .args(args),
    );
    serde_json::from_slice::<Value>(&o.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn is_up(l: &Value) -> bool {
    l["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "UP"))
}

/// The `tsn-*` taps in node `i`'s namespace: (name, ifindex, master).
fn taps(lan: &Lan, i: usize) -> Vec<(String, u64, String)> {
    links(lan, i, &[])
        .iter()
        .filter(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("tsn-")))
        .map(|l| {
            (
                l["ifname"].as_str().unwrap().to_string(),
                l["ifindex"].as_u64().unwrap(),
                l["master"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// `ping` from node `i`'s namespace: whether 3 echo replies came.
fn ping_from(lan: &Lan, i: usize, to: &str) -> (bool, String) {
    let o = output(Command::new("ip").args([
        "netns",
        "exec",
        lan.netns(i),
        "ping",
        "-c",
        "3",
        "-i",
        "0.3",
        "-W",
        "3",
        to,
    ]));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
    )
}

/// Waits until the guest `name` on node `i` has its three echo replies from `from`.
fn wait_replies(c: &VmCluster, i: usize, name: &str, from: &str, peer: (usize, &str)) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = console(&c.nodes[i].dir, name);
        if text.contains(&format!("echo reply from {from} ")) && text.contains("(reply 3)") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}'s three echo replies from {from} did not come:\n{name}: {text}\n{}: {}",
            peer.1,
            console(&c.nodes[peer.0].dir, peer.1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vms_on_two_machines_ping_each_other_over_an_untagged_uplink_and_survive_a_tesserad_restart() {
    let test = "vms_on_two_machines_ping_each_other_over_an_untagged_uplink_and_survive_a_tesserad_restart";
    require("ip");
    require("ping");
    require("curl");
    let Some(mut c) = VmCluster::start(test, 3, "vm-net-wire-password") else {
        return;
    };
    let t = c.token.clone();
    let t = t.as_str();
    let ids = node_ids(&c.lan, t, 3);
    c.lan.wire(0, 1, "wire0");

    let body = json!({"name": "wire", "bridge": "br-wire", "uplink": "wire0"}).to_string();
    let (code, v) = api(&c.lan, 0, "POST", "networks", Some(t), Some(&body));
    assert_eq!(code, 201, "{v}");
    // Per node: ok where wire0 exists, the missing uplink reported where it does not.
    let nodes = wait_for("network wire reported by the three nodes", 60, || {
        let (_, v) = api(&c.lan, 0, "GET", "networks/wire", Some(t), None);
        let n = v["nodes"].as_object().cloned().unwrap_or_default();
        let ok = |i: usize| n.get(&ids[i]).is_some_and(|s| s["state"] == "ok");
        (ok(0) && ok(1) && n.get(&ids[2]).is_some_and(|s| s["state"] == "error")).then_some(n)
    });
    for i in [0, 1] {
        assert_eq!(nodes[&ids[i]]["bridge"], BRIDGE, "{nodes:?}");
    }
    assert_eq!(
        nodes[&ids[2]]["error"], "uplink wire0: no such interface on this node",
        "{nodes:?}"
    );
    for i in [0, 1] {
        let w = wait_for(&format!("wire0 a port of {BRIDGE} on node{i}"), 30, || {
            links(&c.lan, i, &["wire0"])
                .into_iter()
                .find(|l| l["master"] == BRIDGE && is_up(l))
        });
        assert!(w.get("ifalias").is_none(), "the uplink is not marked: {w}");
    }
    assert!(links(&c.lan, 2, &[BRIDGE]).is_empty(), "node2 made nothing");

    // A VM pinned to node2 is refused, saying why (the scheduler never places a VM on a
    // node that failed to set up one of its networks), and nothing is created.
    let guest = |name: &str, node: usize, cmdline: String| {
        json!({
            "name": name, "vcpus": 1, "memory_mib": 32, "nics": [{"network": "wire"}],
            "node": ids[node], "kernel": GUEST, "cmdline": cmdline,
            "desired_state": "running",
        })
        .to_string()
    };
    let body = guest("wc", 2, "console=ttyS0".into());
    let (code, v) = api(&c.lan, 0, "POST", "vms", Some(t), Some(&body));
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains(
            "node2 could not set up network wire (uplink wire0: no such interface on this node)"
        )),
        "{v}"
    );
    let (code, v) = api(&c.lan, 0, "GET", "vms/wc", Some(t), None);
    assert_eq!(code, 404, "{v}");
    assert!(vm_pid(&c.nodes[2].dir, "wc").is_none());

    // Two guests on two machines: wb (node1) pings wa (node0) across the cable.
    let body = guest(
        "wa",
        0,
        format!("console=ttyS0 tessera.mode=net tessera.ip={IP_A}"),
    );
    let (code, v) = api(&c.lan, 0, "POST", "vms", Some(t), Some(&body));
    assert_eq!(code, 201, "{v}");
    wait_state(&c.lan, 0, t, "wa", "running");
    let body = guest(
        "wb",
        1,
        format!("console=ttyS0 tessera.mode=net tessera.ip={IP_B} tessera.ping={IP_A}"),
    );
    let (code, v) = api(&c.lan, 0, "POST", "vms", Some(t), Some(&body));
    assert_eq!(code, 201, "{v}");
    wait_state(&c.lan, 0, t, "wb", "running");
    wait_replies(&c, 1, "wb", IP_A, (0, "wa"));
    let a_console = console(&c.nodes[0].dir, "wa");
    assert!(
        a_console.contains(&format!("ICMP echo request from {IP_B}")),
        "{a_console}"
    );
    // node1's namespace reaches wa too (an address of the test's on node1's bridge).
    let node1 = |args: &[&str]| {
        let o = output(Command::new("ip").args(["-n", c.lan.netns(1)]).args(args));
        assert!(o.status.success(), "{args:?}: {o:?}");
    };
    node1(&["addr", "add", &format!("{IP_NODE1}/24"), "dev", BRIDGE]);
    let (ok, out) = ping_from(&c.lan, 1, IP_A);
    assert!(ok, "ping wa from node1 before the restart: {out}");

    // node0's tesserad dies and comes back; wa's VMM and tap are left as they are.
    let pid = vm_pid(&c.nodes[0].dir, "wa").unwrap();
    let before = taps(&c.lan, 0);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].0, "tsn-wa-0");
    assert_eq!(before[0].2, BRIDGE);
    let log = c.nodes[0].dir.join("tesserad.log");
    // Lines, not `vm=wa`: the log may colour a field's name apart from its value.
    let adoptions = |s: &str| {
        s.lines()
            .filter(|l| l.contains("re-adopting a running VMM") && l.contains("wa"))
            .count()
    };
    let adopted_before = adoptions(&std::fs::read_to_string(&log).unwrap_or_default());
    c.nodes[0].kill_tesserad();
    assert_eq!(
        vm_pid(&c.nodes[0].dir, "wa"),
        Some(pid),
        "the VMM outlives tesserad"
    );
    c.nodes[0].start_tesserad(&c.lan);
    wait_for("node0's tesserad re-adopting wa", 60, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (adoptions(&text) > adopted_before).then_some(())
    });
    // Longer than a network recheck (10 s) of the new tesserad: nothing moves.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(12) {
        assert_eq!(vm_pid(&c.nodes[0].dir, "wa"), Some(pid), "wa's VMM");
        assert_eq!(taps(&c.lan, 0), before, "wa's tap, unchanged and alone");
        let w = links(&c.lan, 0, &["wire0"]);
        assert!(
            w.first().is_some_and(|l| l["master"] == BRIDGE),
            "wire0: {w:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let v = vm(&c.lan, 1, t, "wa");
    assert_eq!(v["actual_state"], "running", "{v}");
    assert_eq!(v["running_on"], ids[0].as_str(), "{v}");
    let (ok, out) = ping_from(&c.lan, 1, IP_A);
    assert!(ok, "ping wa from node1 after the restart: {out}");

    // The re-adopted VMM's stop takes its tap with it.
    for name in ["wa", "wb"] {
        let (code, v) = api(
            &c.lan,
            0,
            "POST",
            &format!("vms/{name}/stop"),
            Some(t),
            None,
        );
        assert_eq!(code, 202, "{v}");
    }
    for name in ["wa", "wb"] {
        wait_state(&c.lan, 0, t, name, "stopped");
    }
    for i in [0, 1] {
        wait_for(&format!("node{i}'s taps gone"), 30, || {
            taps(&c.lan, i).is_empty().then_some(())
        });
    }
    for name in ["wa", "wb"] {
        let (code, v) = api(&c.lan, 0, "DELETE", &format!("vms/{name}"), Some(t), None);
        assert_eq!(code, 200, "{v}");
    }

    // The network goes: the bridges go, wire0 is released and stays.
    let (code, v) = api(&c.lan, 0, "DELETE", "networks/wire", Some(t), None);
    assert_eq!(code, 200, "{v}");
    for i in [0, 1] {
        wait_for(&format!("{BRIDGE} gone from node{i}"), 30, || {
            links(&c.lan, i, &[BRIDGE]).is_empty().then_some(())
        });
        let w = links(&c.lan, i, &["wire0"]);
        assert_eq!(w.len(), 1, "wire0 stays on node{i}: {w:?}");
        assert!(w[0].get("master").is_none(), "released: {w:?}");
    }
}
