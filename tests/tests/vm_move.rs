//! A VM moves between nodes with its disk (three nodes in network namespaces, a
//! `tessera-store` per node with its replication endpoint): the test guest uploaded as a
//! boot image boots a VM whose disk is a new volume; pinned to node0 it counts on its
//! console and writes its disk; stopped and started pinned on node1, the guest reads back
//! what it wrote on node0 (`TESSERA-GUEST: disk holds COUNT=<k>`) and the volume, read
//! with nbdcopy from the stores, holds what each run wrote.
//!
//! - A volume of three copies: the start on node1 moves its primary there (one
//!   compare-and-swap raising its generation, `volume.primary_moved`), so the VM's disk
//!   is node1's own store; every copy is in sync again after and holds the same bytes.
//! - A volume of one copy on node2: the VM uses it remotely (TLS NBD to node2's store)
//!   from node0 and then node1; the volume stays on node2.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for, wait_task, ClusterNode};
use tessera_tests::vms::{
    act, console, last_count, node_ids, upload_guest, vm, vm_pid, wait_state, VmCluster,
};
use tessera_tests::{output, require, Lan};

const SIZE: u64 = 16 << 20;

/// Sectors 0 and 1 of volume `name` read through the store in `node_dir`.
fn head(node_dir: &Path, name: &str) -> (String, String) {
    let sock = node_dir.join("store/nbd.sock");
    let mut c = std::process::Command::new("nbdcopy");
    c.arg(format!("nbd+unix:///{name}?socket={}", sock.display()))
        .arg("--")
        .arg("-");
    let o = output(&mut c);
    assert!(
        o.status.success(),
        "nbdcopy of {name} from {}: {}",
        node_dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = |s: &[u8]| {
        String::from_utf8_lossy(s)
            .trim_end_matches('\0')
            .to_string()
    };
    (text(&o.stdout[..512]), text(&o.stdout[512..1024]))
}

/// The count in a guest's `COUNT=<k>` sector.
fn count_in(sector: &str) -> u64 {
    sector
        .strip_prefix("COUNT=")
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("not a count sector: {sector:?}"))
}

fn volume(lan: &Lan, t: &str, name: &str) -> Value {
    let (code, v) = api(lan, 0, "GET", &format!("volumes/{name}"), Some(t), None);
    assert_eq!(code, 200, "{v}");
    v
}

fn all_in_sync(v: &Value) -> bool {
    v["state"] == "ready"
        && v["replication"]["copies"].as_array().is_some_and(|c| {
            c.iter()
                .all(|c| c["state"] == "in_sync" && c.get("joining").is_none())
        })
}

/// Starts VM `name` pinned on node `on` and waits until it runs there and its guest has
/// counted past `past` (every fifth count is written to the disk).
fn run_on(
    lan: &Lan,
    t: &str,
    ids: &[String],
    nodes: &[ClusterNode],
    name: &str,
    on: usize,
    past: u64,
) {
    let body = json!({ "node": ids[on] }).to_string();
    let (code, v) = api(
        lan,
        0,
        "PATCH",
        &format!("vms/{name}"),
        Some(t),
        Some(&body),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = act(lan, 2, t, name, "start");
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["node"], ids[on].as_str(), "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}\n{}", nodes[on].logs());
    let v = wait_state(lan, 1, t, name, "running");
    assert_eq!(v["running_on"], ids[on].as_str(), "{v}");
    wait_for(
        &format!("{name}'s guest on node{on} to count past {past}"),
        90,
        || (last_count(&nodes[on].dir, name) > Some(past)).then_some(()),
    );
}

/// Stops VM `name` (the guest obeys its power button) and returns the last count its
/// guest printed on node `on`.
fn stop(lan: &Lan, t: &str, nodes: &[ClusterNode], name: &str, on: usize) -> u64 {
    let (code, v) = act(lan, 0, t, name, "stop");
    assert_eq!(code, 202, "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}");
    assert!(
        task["log"].to_string().contains("the guest shut down"),
        "{task}"
    );
    wait_state(lan, 0, t, name, "stopped");
    last_count(&nodes[on].dir, name).unwrap()
}

#[test]
fn a_vm_moves_to_another_node_with_its_disk() {
    let test = "a_vm_moves_to_another_node_with_its_disk";
    let Some(c) = VmCluster::start(test, 3, "vm-move-password-1") else {
        return;
    };
    require("nbdcopy");
    let (lan, nodes, t) = (&c.lan, &c.nodes, c.token.as_str());
    let ids = node_ids(lan, t, 3);
    upload_guest(lan, t, "guest", 3);

    // New volumes: three copies with the primary on node0; one copy on node2.
    for (name, replicas, node) in [("disk3", 3, 0), ("disk1", 1, 2)] {
        let body = json!({
            "name": name, "size_bytes": SIZE, "replicas": replicas, "node": ids[node],
        })
        .to_string();
        let (code, v) = api(lan, 0, "POST", "volumes", Some(t), Some(&body));
        assert_eq!(code, 202, "{v}");
        let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
        assert_eq!(task["state"], "succeeded", "{task}");
    }
    let v3 = wait_for("disk3's three copies in sync", 60, || {
        let v = volume(lan, t, "disk3");
        all_in_sync(&v).then_some(v)
    });
    assert_eq!(
        v3["replication"]["copies"].as_array().unwrap().len(),
        3,
        "{v3}"
    );
    assert_eq!(v3["node"], ids[0].as_str(), "{v3}");
    let generation = v3["replication"]["generation"].as_u64().unwrap();
    assert_eq!(volume(lan, t, "disk1")["node"], ids[2].as_str());

    for (name, disk) in [("mover", "disk3"), ("remote", "disk1")] {
        let body = json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "disks": [disk], "image": "guest",
            "cmdline": "console=ttyS0 tessera.mode=count",
        })
        .to_string();
        let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body));
        assert_eq!(code, 201, "{v}");
        assert!(
            v["kernel"].is_null(),
            "booted from the image, not a path: {v}"
        );
    }

    // --- Three copies: node0 (the primary's node), then node1 (the primary follows).
    run_on(lan, t, &ids, nodes, "mover", 0, 10);
    let out = console(&nodes[0].dir, "mover");
    assert!(
        !out.contains("disk holds"),
        "a new volume held a count: {out}"
    );
    let shown = stop(lan, t, nodes, "mover", 0);
    let (mark, count) = head(&nodes[0].dir, "disk3");
    assert!(mark.starts_with("TESSERA-MARK"), "{mark:?}");
    let written = count_in(&count);
    assert!(
        written >= 10 && written.is_multiple_of(5) && written <= shown,
        "node0's guest printed up to {shown}, its disk says {count:?}"
    );
    assert_eq!(
        volume(lan, t, "disk3")["node"],
        ids[0].as_str(),
        "no move yet"
    );

    run_on(lan, t, &ids, nodes, "mover", 1, 10);
    let out = console(&nodes[1].dir, "mover");
    assert!(
        out.contains(&format!("TESSERA-GUEST: disk holds COUNT={written}\n")),
        "node1's guest did not read node0's last count ({written}): {out}"
    );
    // The primary moved to node1 in a new generation; its copies are in sync again.
    let v = wait_for("disk3's copies in sync after the move", 60, || {
        let v = volume(lan, t, "disk3");
        all_in_sync(&v).then_some(v)
    });
    assert_eq!(v["node"], ids[1].as_str(), "{v}");
    assert_eq!(
        v["replication"]["generation"].as_u64(),
        Some(generation + 1),
        "{v}"
    );
    assert_eq!(
        v["replication"]["copies"][0]["node"],
        ids[1].as_str(),
        "{v}"
    );
    let (code, events) = api(lan, 0, "GET", "events", Some(t), None);
    assert_eq!(code, 200);
    assert!(
        events.to_string().contains("volume.primary_moved"),
        "no volume.primary_moved event: {events}"
    );
    // Its disk is node1's own store (a Unix socket), not NBD over the network.
    let pid = vm_pid(&nodes[1].dir, "mover").unwrap();
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    assert!(
        cmd.contains("--disk nbd+unix:///disk3?socket="),
        "the VMM on node1 does not use its own store: {cmd}"
    );
    let shown = stop(lan, t, nodes, "mover", 1);
    let (mark, count) = head(&nodes[1].dir, "disk3");
    assert!(mark.starts_with("TESSERA-MARK"), "{mark:?}");
    let written = count_in(&count);
    assert!(
        written >= 10 && written.is_multiple_of(5) && written <= shown,
        "node1's guest printed up to {shown}, its disk says {count:?}"
    );
    // Every copy holds node1's writes (replicated from the new primary).
    for n in nodes {
        assert_eq!(head(&n.dir, "disk3").1, count, "node{}'s copy differs", n.i);
    }

    // --- One copy on node2, used remotely from node0, then node1.
    run_on(lan, t, &ids, nodes, "remote", 0, 5);
    stop(lan, t, nodes, "remote", 0);
    let (mark, count) = head(&nodes[2].dir, "disk1");
    assert!(mark.starts_with("TESSERA-MARK"), "{mark:?}");
    let written = count_in(&count);
    assert!(written >= 5, "{count:?}");
    run_on(lan, t, &ids, nodes, "remote", 1, 5);
    let out = console(&nodes[1].dir, "remote");
    assert!(
        out.contains(&format!("TESSERA-GUEST: disk holds COUNT={written}\n")),
        "node1's guest did not read node0's last count ({written}) from node2: {out}"
    );
    stop(lan, t, nodes, "remote", 1);
    assert_eq!(volume(lan, t, "disk1")["node"], ids[2].as_str());
    assert!(count_in(&head(&nodes[2].dir, "disk1").1) >= 5);
    let v = vm(lan, 0, t, "remote");
    assert_eq!(v["actual_state"], "stopped", "{v}");
}
