//! HA and maintenance against the cluster's capacity (issue #12), on the README's local
//! three-node cluster at `vcpu_overcommit` 1: node2 is filled by a VM with as many vCPUs as
//! it has CPUs, node3 is in maintenance (empty: the node with the most room), and the HA
//! VM `ha1` (1 vCPU, an idle guest counting every 100 ms) runs on node1.
//!
//! - node1 goes into maintenance too: `ha1` has nowhere to go. The drain stays unfinished
//!   (`GET /nodes`: not drained, `ha1` left, nothing migrating), an `ha.pending` event
//!   says why (node2's room, node3 in maintenance), and `ha1` keeps running on node1.
//!   Out of maintenance again.
//! - node1 dies: `ha1` is fenced but not restarted: not onto node3 (room, but in
//!   maintenance) nor node2 (full at ratio 1); an `ha.pending` event says so.
//! - `vcpu_overcommit` 2: node2 has room at that ratio, and the manager, counting at the
//!   ratio, starts `ha1` there; it counts on. node3 never ran it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::cluster::wait_for;
use tessera_tests::devcluster::{
    api, kill_matching, memory_published, node_dir, node_id, wait_nodes, DevCluster, VmmKiller,
};
use tessera_tests::vms::{console, last_count, vm_pid};
use tessera_tests::{counts, kvm_or_skip};

use super::GUEST;

pub fn run(test: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let _reaper = VmmKiller::of(dir);
    let cluster = DevCluster::start(dir);
    let ca = cluster.ca_file();
    let token = cluster.admin_session(2, "vm ha capacity password");
    let t = token.as_str();
    let nodes = wait_nodes(&ca, 2, t, 40, |n| {
        n["storage"]["state"] == "ok"
            && memory_published(n)
            && n["metrics"]["cpus"].as_u64() > Some(0)
    });
    let id = |i: u8| node_id(&nodes, i);
    let cpus = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id(2).as_str())
        .and_then(|n| n["metrics"]["cpus"].as_u64())
        .unwrap();
    // Through node2 (node1 dies below; a 503 while a new leader is elected is retried).
    let ratio = |r: f64| {
        let body = json!({ "vcpu_overcommit": r });
        let (code, v) = wait_for("an answer with a leader", 20, || {
            let (code, v) = api(&ca, 2, "PATCH", "settings", Some(t), Some(&body));
            (code != 503).then_some((code, v))
        });
        assert_eq!(code, 200, "{v}");
    };
    let maintenance = |i: u8, on: bool| {
        let (code, v) = api(
            &ca,
            2,
            "POST",
            &format!("nodes/{}/maintenance", id(i)),
            Some(t),
            Some(&json!({ "enabled": on })),
        );
        assert_eq!(code, 200, "{v}");
    };
    // GET /vms/{name} (`null` while there is no leader).
    let vm = |name: &str| api(&ca, 2, "GET", &format!("vms/{name}"), Some(t), None).1;
    let create = |body: Value| {
        let (code, v) = api(&ca, 2, "POST", "vms", Some(t), Some(&body));
        assert_eq!(code, 201, "{v}");
        let name = body["name"].as_str().unwrap().to_string();
        let on = body["node"].as_str().unwrap().to_string();
        wait_for(&format!("{name} running"), 60, || {
            let v = vm(&name);
            (v["actual_state"] == "running" && v["running_on"] == on.as_str()).then_some(())
        });
    };
    // `ha.pending` messages naming `vm`, oldest first.
    let pending = |vm: &str| -> Vec<String> {
        let (_, ev) = api(&ca, 2, "GET", "events?limit=10000", Some(t), None);
        ev.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["kind"] == "ha.pending")
            .filter_map(|e| e["message"].as_str())
            .filter(|m| m.starts_with(&format!("{vm} ")))
            .map(str::to_string)
            .collect()
    };

    // At ratio 1: node2 full, node3 in maintenance (drained at once: nothing runs there).
    ratio(1.0);
    create(json!({
        "name": "filler", "vcpus": cpus, "memory_mib": 64, "node": id(2),
        "kernel": GUEST, "cmdline": "console=ttyS0 tessera.mode=idle tessera.tick_ms=1000",
        "desired_state": "running",
    }));
    maintenance(3, true);
    create(json!({
        "name": "ha1", "vcpus": 1, "memory_mib": 64, "node": id(1), "ha": true,
        "kernel": GUEST, "cmdline": "console=ttyS0 tessera.mode=idle tessera.tick_ms=100",
        "desired_state": "running",
    }));
    wait_for("ha1 counting on node1", 30, || {
        (last_count(&node_dir(dir, 1), "ha1") >= Some(3)).then_some(())
    });

    // --- node1 in maintenance: no room anywhere, the drain waits, ha1 runs on.
    maintenance(1, true);
    let why = wait_for("an ha.pending event: ha1 cannot leave node1", 20, || {
        pending("ha1")
            .into_iter()
            .find(|m| m.contains("cannot leave"))
    });
    assert!(
        why.contains(&format!("{} in maintenance", id(3))) && why.contains(&id(2)),
        "{why}"
    );
    let (_, list) = api(&ca, 2, "GET", "nodes", Some(t), None);
    let node1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id(1).as_str())
        .cloned()
        .unwrap();
    let m = &node1["maintenance"];
    assert_eq!(m["drained"], false, "{node1}");
    assert_eq!(m["vms_left"], json!(["ha1"]), "{node1}");
    assert_eq!(m["migrating"], json!([]), "{node1}");
    let before = last_count(&node_dir(dir, 1), "ha1").unwrap();
    wait_for("ha1 counting on in node1", 20, || {
        (last_count(&node_dir(dir, 1), "ha1") > Some(before + 5)).then_some(())
    });
    let v = vm("ha1");
    assert_eq!(
        (v["running_on"].as_str(), v["actual_state"].as_str()),
        (Some(id(1).as_str()), Some("running")),
        "{v}"
    );
    assert!(
        vm_pid(&node_dir(dir, 2), "ha1").is_none() && vm_pid(&node_dir(dir, 3), "ha1").is_none()
    );
    maintenance(1, false);

    // --- node1 dies: fenced, not restarted: node3 is in maintenance, node2 full at 1.
    let seen = pending("ha1").len();
    let mark = format!("{}/", dir.join("node1").display());
    let killed = kill_matching(&mark, &["tesserad", "tessera-store", "tessera-vmm"]);
    assert!(killed >= 3, "node1: {killed} processes killed");
    let why = wait_for("an ha.pending event: ha1 waits for room", 30, || {
        pending("ha1")
            .into_iter()
            .skip(seen)
            .find(|m| m.contains("waits for room"))
    });
    assert!(
        why.contains(&format!("{} in maintenance", id(3))) && why.contains(&id(2)),
        "{why}"
    );
    // Pending means it stays so: a few manager rounds (250 ms each) later, still nowhere.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let v = vm("ha1");
        assert_ne!(v["actual_state"], "running", "{v}");
        assert!(
            vm_pid(&node_dir(dir, 3), "ha1").is_none(),
            "ha1 started on node3"
        );
        assert!(
            vm_pid(&node_dir(dir, 2), "ha1").is_none(),
            "ha1 started on node2"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // --- Ratio 2: node2 has room for one more vCPU, and the manager counts at the ratio.
    let raised = Instant::now();
    ratio(2.0);
    let v = wait_for("ha1 running on node2", 30, || {
        let v = vm("ha1");
        (v["actual_state"] == "running").then_some(v)
    });
    assert_eq!(v["running_on"], id(2).as_str(), "{v}");
    eprintln!(
        "ha1 ran on node2 {:?} after the ratio was raised",
        raised.elapsed()
    );
    wait_for("ha1 counting on node2", 30, || {
        (counts(&console(&node_dir(dir, 2), "ha1")).last() >= Some(&3)).then_some(())
    });
    assert!(
        console(&node_dir(dir, 3), "ha1").is_empty(),
        "ha1 ran on node3 (in maintenance)"
    );
    drop(cluster);
}
