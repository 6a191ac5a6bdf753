//! Two VMs on two nodes talk over a cluster network (issue #11), on the README's local
//! three-node cluster (whose nodes share this machine's network namespace, so both nodes'
//! taps join the one bridge `tsb-lan` that all three `tesserad`s reconcile): network `lan`
//! is set up and reported `ok` by every node; the test guest in net mode on node1 and on
//! node2 (pinned), with a MAC assigned from the cluster's prefix and one given; the guest
//! on node2 pings the one on node1 (ARP, then ICMP echo, each reply on its console), and
//! iputils `ping` from a namespace of the test's own, wired to the bridge by a veth pair,
//! reaches both. Refused: a VM on a network that does not exist (404), a MAC another NIC
//! has (409), a bad MAC (400), deleting a network VMs use (409). A stopped VM's tap goes
//! with its VMM; the deleted network's bridge goes from every node. `GET /nodes` lists
//! each node's interfaces (the bridge, loopback with its address).

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::cluster::wait_for;
use tessera_tests::devcluster::{
    api, memory_published, node_dir, node_id, wait_nodes, DevCluster, VmmKiller,
};
use tessera_tests::vms::console;
use tessera_tests::{kvm_or_skip, output, require};

const GUEST: &str = env!("TESSERA_TEST_GUEST");
const BRIDGE: &str = "tsb-lan";
const IP_A: &str = "10.0.99.2";
const IP_B: &str = "10.0.99.3";
const MAC_B: &str = "02:00:5e:00:99:03";

/// Removes the test's namespace, whatever happens.
struct NetnsCleanup(String);

impl Drop for NetnsCleanup {
    fn drop(&mut self) {
        let _ = output(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

fn ip(args: &[&str]) -> String {
    tessera_tests::run(Command::new("ip").args(args))
}

/// `ip -j link show ...` as JSON (an empty list when nothing matches).
fn links(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["-j", "link", "show"];
    all.extend_from_slice(args);
    let o = output(Command::new("ip").args(&all));
    serde_json::from_slice::<Value>(&o.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn two_vms_on_two_nodes_ping_each_other_over_a_cluster_network() {
    let test = "two_vms_on_two_nodes_ping_each_other_over_a_cluster_network";
    if !kvm_or_skip(test) {
        return;
    }
    require("curl");
    require("ip");
    require("ping");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let netns = format!("tsvmnet{}", std::process::id());
    let _netns = NetnsCleanup(netns.clone());
    let _vmms = VmmKiller::of(dir);
    // A bridge left by an earlier, interrupted run is Tessera's (marked): the cluster
    // adopts it. An unmarked one of that name would be someone else's: do not run then.
    if let Some(l) = links(&[BRIDGE]).first() {
        assert_eq!(
            l["ifalias"], "tessera:lan",
            "{BRIDGE} exists and is not Tessera's: {l}"
        );
    }
    let cluster = DevCluster::start(dir);
    let ca = cluster.ca_file();
    let token = cluster.admin_session(1, "vm net admin password");
    let t = token.as_str();
    let nodes = wait_nodes(&ca, 1, t, 60, memory_published);
    let id = |i: u8| node_id(&nodes, i);

    // The network: every node sets it up and says so; the bridge is there, marked.
    let body = json!({"name": "lan", "bridge": "br-lan"});
    let (c, v) = api(&ca, 1, "POST", "networks", Some(t), Some(&body));
    assert_eq!(c, 201, "{v}");
    let net = wait_for("network lan ok on the three nodes", 60, || {
        let (_, v) = api(&ca, 3, "GET", "networks/lan", Some(t), None);
        let nodes = v["nodes"].as_object().cloned().unwrap_or_default();
        (nodes.len() == 3
            && nodes
                .values()
                .all(|s| s["state"] == "ok" && s["bridge"] == BRIDGE))
        .then_some(v)
    });
    let (c, list) = api(&ca, 2, "GET", "networks", Some(t), None);
    assert_eq!(c, 200, "{list}");
    assert_eq!(list[0]["nodes"], net["nodes"], "{list}");
    let bridge = links(&[BRIDGE]);
    assert_eq!(bridge.len(), 1, "{bridge:?}");
    assert_eq!(bridge[0]["ifalias"], "tessera:lan", "{bridge:?}");
    let detail = ip(&["-d", "-j", "link", "show", BRIDGE]);
    assert!(detail.contains("\"info_kind\":\"bridge\""), "{detail}");

    // GET /nodes gives each node's interfaces (state, speed, addresses): the bridge and
    // loopback among them (these nodes share this machine's interfaces).
    wait_for(
        "each node's interfaces with the bridge in GET /nodes",
        60,
        || {
            let (_, nodes) = api(&ca, 1, "GET", "nodes", Some(t), None);
            nodes
                .as_array()
                .is_some_and(|n| {
                    n.len() == 3
                        && n.iter().all(|n| {
                            let ifs = n["metrics"]["interfaces"]
                                .as_array()
                                .cloned()
                                .unwrap_or_default();
                            let find = |name: &str| ifs.iter().find(|i| i["name"] == name).cloned();
                            find(BRIDGE)
                                .is_some_and(|b| b["state"].is_string() && b["mtu"].is_u64())
                                && find("lo").is_some_and(|l| {
                                    l["addresses"]
                                        .as_array()
                                        .is_some_and(|a| a.iter().any(|a| a == "127.0.0.1/8"))
                                })
                        })
                })
                .then_some(())
        },
    );

    // Refused: a network that does not exist, a bad MAC, networks and nics together.
    let vm = |name: &str, nics: Value, node: u8, cmdline: &str| {
        json!({
            "name": name, "vcpus": 1, "memory_mib": 32, "nics": nics, "node": id(node),
            "kernel": GUEST, "cmdline": cmdline,
        })
    };
    let body = vm("nowhere", json!([{"network": "nope"}]), 1, "console=ttyS0");
    let (c, v) = api(&ca, 1, "POST", "vms", Some(t), Some(&body));
    assert_eq!(c, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("no network nope"),
        "{v}"
    );
    for (mac, why) in [
        ("01:00:5e:00:00:01", "unicast"),
        ("02:00:5e:00:99", "expected xx:xx:xx:xx:xx:xx"),
        ("00:00:00:00:00:00", "unicast"),
    ] {
        let body = vm(
            "badmac",
            json!([{"network": "lan", "mac": mac}]),
            1,
            "console=ttyS0",
        );
        let (c, v) = api(&ca, 1, "POST", "vms", Some(t), Some(&body));
        assert_eq!(c, 400, "{mac}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{mac}: {v}");
    }
    let mut body = vm("both", json!([{"network": "lan"}]), 1, "console=ttyS0");
    body["networks"] = json!(["lan"]);
    let (c, v) = api(&ca, 1, "POST", "vms", Some(t), Some(&body));
    assert_eq!(c, 400, "{v}");

    // Two VMs: net-a on node1 (MAC assigned), net-b on node2 (MAC given), pinging net-a.
    let body = vm(
        "net-a",
        json!([{"network": "lan"}]),
        1,
        &format!("console=ttyS0 tessera.mode=net tessera.ip={IP_A}"),
    );
    let (c, a) = api(&ca, 1, "POST", "vms", Some(t), Some(&body));
    assert_eq!(c, 201, "{a}");
    let mac_a = a["nics"][0]["mac"].as_str().unwrap().to_string();
    assert_eq!(a["networks"], json!(["lan"]), "{a}");
    let first = u8::from_str_radix(&mac_a[..2], 16).unwrap();
    assert_eq!(first & 3, 2, "locally administered unicast: {mac_a}");
    let body = vm(
        "net-b",
        json!([{"network": "lan", "mac": MAC_B.to_uppercase()}]),
        2,
        &format!("console=ttyS0 tessera.mode=net tessera.ip={IP_B} tessera.ping={IP_A}"),
    );
    let (c, b) = api(&ca, 2, "POST", "vms", Some(t), Some(&body));
    assert_eq!(c, 201, "{b}");
    assert_eq!(b["nics"][0]["mac"], MAC_B, "{b}");
    // Another VM cannot take a MAC in use; the same prefix draws a different MAC.
    let body = vm(
        "dup",
        json!([{"network": "lan", "mac": MAC_B}]),
        3,
        "console=ttyS0",
    );
    let (c, v) = api(&ca, 3, "POST", "vms", Some(t), Some(&body));
    assert_eq!(c, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains(MAC_B), "{v}");
    let body = vm("third", json!([{"network": "lan"}]), 3, "console=ttyS0");
    let (c, v) = api(&ca, 3, "POST", "vms", Some(t), Some(&body));
    assert_eq!(c, 201, "{v}");
    let mac_c = v["nics"][0]["mac"].as_str().unwrap();
    assert_eq!(
        &mac_c[..8],
        &mac_a[..8],
        "one prefix per cluster: {mac_c} {mac_a}"
    );
    assert_ne!(mac_c, mac_a);
    let (c, v) = api(&ca, 3, "DELETE", "vms/third", Some(t), None);
    assert_eq!(c, 200, "{v}");

    for (name, node) in [("net-a", 1u8), ("net-b", 2u8)] {
        let (c, v) = api(
            &ca,
            node,
            "POST",
            &format!("vms/{name}/start"),
            Some(t),
            None,
        );
        assert_eq!(c, 202, "{v}");
    }
    for (name, node) in [("net-a", 1u8), ("net-b", 2u8)] {
        wait_for(&format!("{name} running on node{node}"), 60, || {
            let (_, v) = api(&ca, 1, "GET", &format!("vms/{name}"), Some(t), None);
            (v["actual_state"] == "running" && v["running_on"] == id(node).as_str()).then_some(())
        });
    }
    // Their taps are ports of the bridge, up, with the NICs' MACs behind `fe` (a port
    // with the guest's own MAC would make the bridge keep the guest's frames).
    let ports = wait_for("both taps on the bridge", 30, || {
        let p = links(&["master", BRIDGE]);
        (p.len() >= 2).then_some(p)
    });
    for (tap, mac) in [("tsn-net-a-0", mac_a.as_str()), ("tsn-net-b-0", MAC_B)] {
        let l = ports
            .iter()
            .find(|l| l["ifname"] == tap)
            .unwrap_or_else(|| panic!("{tap} not on {BRIDGE}: {ports:?}"));
        assert_eq!(l["address"], format!("fe{}", &mac[2..]), "{l}");
    }

    // The guest on node2 pings the one on node1: three echo replies.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let c = console(&node_dir(dir, 2), "net-b");
        if c.contains(&format!("echo reply from {IP_A} ")) && c.contains("(reply 3)") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "net-b's three echo replies from net-a did not come:\nnet-b: {c}\nnet-a: {}",
            console(&node_dir(dir, 1), "net-a")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let a_console = console(&node_dir(dir, 1), "net-a");
    assert!(
        a_console.contains(&format!("ICMP echo request from {IP_B}")),
        "{a_console}"
    );

    // The host reaches both through a namespace of its own wired to the bridge.
    ip(&["netns", "add", &netns]);
    let (host, peer) = ("tsvmnet-h", "tsvmnet-p");
    let _ = output(Command::new("ip").args(["link", "del", host]));
    ip(&["link", "add", host, "type", "veth", "peer", "name", peer]);
    ip(&["link", "set", peer, "netns", &netns]);
    ip(&["link", "set", host, "master", BRIDGE, "up"]);
    let ns = |args: &[&str]| {
        let mut all = vec!["netns", "exec", netns.as_str()];
        all.extend_from_slice(args);
        output(Command::new("ip").args(&all))
    };
    assert!(ns(&["ip", "addr", "add", "10.0.99.1/24", "dev", peer])
        .status
        .success());
    assert!(ns(&["ip", "link", "set", peer, "up"]).status.success());
    for guest in [IP_A, IP_B] {
        let o = ns(&["ping", "-c", "3", "-i", "0.3", "-W", "3", guest]);
        assert!(
            o.status.success(),
            "ping {guest}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let _ = output(Command::new("ip").args(["link", "del", host]));

    // A network in use cannot be deleted.
    let (c, v) = api(&ca, 3, "DELETE", "networks/lan", Some(t), None);
    assert_eq!(c, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("net-a"), "{v}");

    // A stopped VM's tap goes with its VMM.
    for (name, node) in [("net-a", 1u8), ("net-b", 2u8)] {
        let (c, v) = api(
            &ca,
            node,
            "POST",
            &format!("vms/{name}/stop"),
            Some(t),
            None,
        );
        assert_eq!(c, 202, "{v}");
    }
    wait_for("both taps gone", 60, || {
        let p = links(&["master", BRIDGE]);
        p.iter()
            .all(|l| l["ifname"] != "tsn-net-a-0" && l["ifname"] != "tsn-net-b-0")
            .then_some(())
    });
    for name in ["net-a", "net-b"] {
        wait_for(&format!("{name} stopped"), 60, || {
            let (_, v) = api(&ca, 1, "GET", &format!("vms/{name}"), Some(t), None);
            (v["actual_state"] == "stopped").then_some(())
        });
        let (c, v) = api(&ca, 1, "DELETE", &format!("vms/{name}"), Some(t), None);
        assert_eq!(c, 200, "{v}");
    }
    // Now it can go, and its bridge goes too.
    let (c, v) = api(&ca, 3, "DELETE", "networks/lan", Some(t), None);
    assert_eq!(c, 200, "{v}");
    wait_for("bridge tsb-lan removed", 30, || {
        links(&[BRIDGE]).is_empty().then_some(())
    });
    cluster.stop();
}
