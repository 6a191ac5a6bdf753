//! Replicated volumes driven by the cluster (issue #8), on the README's local three-node
//! cluster (one start for every check): a volume of three copies is placed on three
//! nodes, written through its primary with nbdcopy and read back from every copy's own
//! store, all equal; snapshots and clones are taken while a client writes; a VM created
//! from a template whose disk has three copies gets a disk of three copies. Then one node
//! is killed (SIGKILL of its tesserad and store): for a volume whose replica was there,
//! the copy leaves the in-sync set with a new generation and writes complete again; for
//! a volume whose primary was there, another in-sync node becomes the primary and serves
//! every byte written and flushed before, and takes new writes that reach the remaining
//! replica; node 3 comes back and its copies catch up. A replica's store alone restarted
//! costs the next write a delay, never an error. Bad requests (0 or 4 replicas, an
//! unknown node, more copies than nodes able to hold one) are refused with a clear
//! message. Last, the operator override: a 2-copy volume whose replica's store dies
//! stalls until `tessera volume override` lets its primary go on alone; the copy comes
//! back, catches up, and the override is cleared. The parts live in volume_replication/.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::devcluster::DevCluster;
use tessera_tests::require;

#[path = "volume_replication/helpers.rs"]
mod helpers;
#[path = "volume_replication/node_down.rs"]
mod node_down;
#[path = "volume_replication/override_copy.rs"]
mod override_copy;
#[path = "volume_replication/resize.rs"]
mod resize;
#[path = "volume_replication/snapshots.rs"]
mod snapshots;
#[path = "volume_replication/store_restart.rs"]
mod store_restart;
#[path = "volume_replication/template.rs"]
mod template;

use helpers::{call, cli, wait_task, wait_volume, Cx, LogsOnPanic, Restarted, SIZE};

#[test]
fn replicated_volumes_survive_nodes_killed_and_their_copies_catch_up_when_back() {
    require("curl");
    require("nbdcopy");
    require("nbdinfo");
    require("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let tmp = tempfile::tempdir().unwrap();
    let _logs = LogsOnPanic(dir.to_path_buf());
    let cluster = DevCluster::start(dir);
    let (password, ca) = (cluster.admin_password(), cluster.ca_file());
    let (code, a) = call(
        &ca,
        2,
        "POST",
        "login",
        None,
        Some(&json!({"username": "admin", "password": password})),
    );
    assert_eq!(code, 200, "{a}");
    let new_password = "volume replication admin password";
    let (code, a) = call(
        &ca,
        2,
        "POST",
        "password",
        a["token"].as_str(),
        Some(&json!({"old_password": password, "new_password": new_password})),
    );
    assert_eq!(code, 200, "{a}");
    let (_, a) = call(
        &ca,
        2,
        "POST",
        "login",
        None,
        Some(&json!({"username": "admin", "password": new_password})),
    );
    let token = a["token"].as_str().unwrap().to_string();
    let t = token.as_str();
    // Placement takes only nodes whose store answers: wait until each node has published
    // a healthy store (its first poll may have run before its store was up).
    let deadline = Instant::now() + Duration::from_secs(30);
    let nodes = loop {
        let (_, nodes) = call(&ca, 2, "GET", "nodes", Some(t), None);
        let ok = nodes
            .as_array()
            .is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["storage"]["state"] == "ok"));
        if ok {
            break nodes;
        }
        assert!(Instant::now() < deadline, "stores not all healthy: {nodes}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let id = |i: u8| -> String {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == format!("node{i}"))
            .unwrap_or_else(|| panic!("no node{i}: {nodes}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // Bad requests first: each refused with the field named, nothing created.
    for (body, code, word) in [
        (
            json!({"name": "bad", "size_bytes": SIZE, "replicas": 0}),
            400,
            "replicas",
        ),
        (
            json!({"name": "bad", "size_bytes": SIZE, "replicas": 4}),
            400,
            "replicas",
        ),
        (
            json!({"name": "bad", "size_bytes": SIZE, "replicas": 3, "node": "no-such-node"}),
            404,
            "no node",
        ),
    ] {
        let (c, a) = call(&ca, 2, "POST", "volumes", Some(t), Some(&body));
        assert_eq!(c, code, "{body}: {a}");
        assert!(a["error"].as_str().unwrap().contains(word), "{a}");
    }
    assert_eq!(call(&ca, 2, "GET", "volumes/bad", Some(t), None).0, 404);

    // Volume a: primary on node1 (API, no `replicas`: the default is 3 copies with three
    // healthy nodes). Volume b: primary on node3 (CLI, --replicas).
    let (c, task) = call(
        &ca,
        2,
        "POST",
        "volumes",
        Some(t),
        Some(&json!({"name": "a", "size_bytes": SIZE, "node": id(1)})),
    );
    assert_eq!(c, 202, "{task}");
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (ok, _, err) = cli(
        h,
        &[
            "--api",
            "https://127.0.0.2:8006",
            "--ca-file",
            &ca,
            "login",
            "--user",
            "admin",
        ],
        &format!("{new_password}\n"),
    );
    assert!(ok, "{err}");
    let size = format!("{}", SIZE);
    let (ok, out, err) = cli(
        h,
        &[
            "volume",
            "create",
            "b",
            "--size",
            &size,
            "--replicas",
            "3",
            "--node",
            "node3",
        ],
        "",
    );
    assert!(ok, "volume create b: {out} {err}");
    let done = wait_task(&ca, 2, t, &task);
    assert_eq!(done["state"], "succeeded", "{done}");
    for name in ["a", "b"] {
        let v = wait_volume(&ca, 2, t, name, 30, |v| v["state"] == "ready");
        let r = &v["replication"];
        assert_eq!(r["replicas"], 3, "{v}");
        assert_eq!(r["generation"], 1, "{v}");
        let mut on: Vec<String> = r["copies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                assert_eq!(c["state"], "in_sync", "{v}");
                c["node"].as_str().unwrap().to_string()
            })
            .collect();
        on.sort();
        let mut all = vec![id(1), id(2), id(3)];
        all.sort();
        assert_eq!(on, all, "copies on three distinct nodes: {v}");
    }
    let a = wait_volume(&ca, 2, t, "a", 1, |_| true);
    assert_eq!(a["replication"]["primary"], id(1).as_str());
    assert_eq!(a["node"], id(1).as_str());
    let b = wait_volume(&ca, 2, t, "b", 1, |_| true);
    assert_eq!(b["replication"]["primary"], id(3).as_str());
    snapshots::snapshot_and_clone_under_writes(&ca, t, dir, tmp.path());
    template::vm_from_template_gets_a_replicated_disk(&ca, t, dir, tmp.path());

    let cx = Cx {
        ca: ca.clone(),
        t: token.clone(),
        dir: dir.to_path_buf(),
        tmp: tmp.path().to_path_buf(),
        home: h.to_path_buf(),
        ids: vec![id(1), id(2), id(3)],
    };
    let mut restarted = Restarted::default();
    node_down::node3_killed_and_back(&cx, &mut restarted);
    store_restart::replica_store_restarted(&cx, &mut restarted);
    resize::three_copies_grow_together(&cx);
    override_copy::operator_override(&ca, t, h, dir, tmp.path(), &mut restarted);
    drop(restarted);
    cluster.stop();
}
