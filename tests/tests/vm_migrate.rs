//! Live migration on a cluster (three nodes in network namespaces, a `tessera-store`
//! each): the test guest, booted from an uploaded image with a three-copy volume, counts
//! on its console and writes every fifth count to its disk. `tessera vm migrate` moves it
//! node0 -> node1 while it runs: the count goes on from where it was with no boot
//! banner, the VM runs on node1, node0's VMM is gone, the volume's primary moved to node1
//! in the next generation with every copy still in sync and holds node1's writes, the
//! console follows (read through another node), and the task reached 100% with its
//! figures. Then: a move to a node without room is refused with the reason; a target
//! VMM killed in the middle and a cancel leave the VM running (and counting) on node1;
//! and it moves back to node0 the same way (one raise, copies in sync). Then node0 goes into maintenance and the guest leaves it the same way (`maintenance`).
//! Last, a migration to a node that is down is refused and changes nothing.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

#[path = "vm_migrate/maintenance.rs"]
mod maintenance;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for, wait_task};
use tessera_tests::vms::{cli, console, last_count, node_ids, upload_guest, vm, vm_pid, VmCluster};
use tessera_tests::{bin, counts, output, require, Lan};

const SIZE: u64 = 16 << 20;

/// Sector 1 of volume `name` (the guest's `COUNT=<k>`) read through the store in
/// `node_dir`, as a count.
fn disk_count(node_dir: &Path, name: &str) -> u64 {
    let sock = node_dir.join("store/nbd.sock");
    let mut c = std::process::Command::new("nbdcopy");
    c.arg(format!("nbd+unix:///{name}?socket={}", sock.display()))
        .arg("--")
        .arg("-");
    let o = output(&mut c);
    assert!(
        o.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = String::from_utf8_lossy(&o.stdout[512..1024]);
    s.trim_end_matches('\0')
        .strip_prefix("COUNT=")
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("not a count sector: {s:?}"))
}

/// The counts of consoles in order: each exactly one more than the one before, and the
/// guest's boot banner only once (in the first).
fn assert_one_run(consoles: &[&str]) {
    // One stream: a line cut by the switch-over ends in the next console.
    let all = counts(&consoles.concat());
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the count jumped: {all:?}");
    }
    let banners: usize = consoles
        .iter()
        .map(|c| c.matches("tessera test guest").count())
        .sum();
    assert_eq!(banners, 1, "the guest booted again: {consoles:?}");
}

fn volume(lan: &Lan, t: &str, name: &str) -> Value {
    let (code, v) = api(lan, 0, "GET", &format!("volumes/{name}"), Some(t), None);
    assert_eq!(code, 200, "{v}");
    v
}

/// `POST /vms/{name}/migrate` through node 2 with `body`.
fn migrate(lan: &Lan, t: &str, name: &str, body: Value) -> (u16, Value) {
    api(
        lan,
        2,
        "POST",
        &format!("vms/{name}/migrate"),
        Some(t),
        Some(&body.to_string()),
    )
}

/// Waits (20 s) until task `id` shows memory moving.
fn wait_moving(lan: &Lan, t: &str, id: &str) {
    wait_for("memory to move", 20, || {
        let (_, v) = api(lan, 0, "GET", &format!("tasks/{id}"), Some(t), None);
        (v["vm"]["migration"]["bytes"].as_u64() > Some(0)).then_some(())
    });
}

/// The console of VM `name` through node `i`'s API (`tessera vm console`): the counts it
/// streams once it shows one past `past`.
fn console_via(lan: &Lan, i: usize, home: &Path, name: &str, past: u64) -> Vec<u64> {
    let mut c = lan.command(i, &bin("tessera"));
    c.env("HOME", home)
        .arg("--api")
        .arg(format!("https://{}:8006", Lan::addr(i)))
        .arg("--ca-file")
        .arg(lan.ca_file().unwrap())
        .args(["vm", "console", name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while counts(&seen.join("\n")).last() <= Some(&past) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("the console through node{i} showed no count past {past}: {seen:?}");
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    counts(&seen.join("\n"))
}

#[test]
fn a_running_vm_moves_to_another_node_and_carries_on() {
    let Some(mut c) = VmCluster::start(
        "a_running_vm_moves_to_another_node_and_carries_on",
        3,
        "vm-migrate-password-1",
    ) else {
        return;
    };
    require("nbdcopy");
    let (lan, nodes, t) = (&c.lan, &c.nodes, c.token.as_str());
    let home = c.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (ok, out, err) = cli(
        lan,
        0,
        &home,
        &["login", "--user", "admin"],
        "vm-migrate-password-1\n",
    );
    assert!(ok, "{out}{err}");
    let ids = node_ids(lan, t, 3);
    upload_guest(lan, t, "guest", 3);
    let body = json!({"name": "disk3", "size_bytes": SIZE, "replicas": 3, "node": ids[0]});
    let (code, v) = api(lan, 0, "POST", "volumes", Some(t), Some(&body.to_string()));
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        wait_task(lan, 0, t, v["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    let generation = in_sync(lan, t);
    for (name, vcpus, disks) in [("mover", 1, json!(["disk3"])), ("hog", 2, json!([]))] {
        let body = json!({
            "name": name, "vcpus": vcpus, "memory_mib": 64, "disks": disks, "image": "guest",
            "cmdline": "console=ttyS0 tessera.mode=count",
        });
        let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body.to_string()));
        assert_eq!(code, 201, "{v}");
    }
    // Bad requests first: a VM that does not run, unknown nodes, bad figures.
    let (code, v) = migrate(lan, t, "mover", json!({}));
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not running"), "{v}");
    let (code, v) = api(lan, 0, "POST", "vms/mover/start", Some(t), None);
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        wait_task(lan, 0, t, v["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    let v = vm(lan, 0, t, "mover");
    assert_eq!(
        v["running_on"],
        ids[0].as_str(),
        "placed with its disk's primary: {v}"
    );
    wait_for("the guest to count past 5", 60, || {
        (last_count(&nodes[0].dir, "mover") > Some(5)).then_some(())
    });
    let source_pid = vm_pid(&nodes[0].dir, "mover").unwrap();
    for (body, want, words) in [
        (json!({"to": "node0"}), 409, "runs on node node0 already"),
        (json!({"to": "nowhere"}), 404, "no node nowhere"),
        (json!({"to": "node1", "downtime_ms": 0}), 400, "downtime_ms"),
        (
            json!({"to": "node1", "node": "node2"}),
            400,
            "unknown field",
        ),
    ] {
        let (code, v) = migrate(lan, t, "mover", body.clone());
        assert_eq!(code, want, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{body}: {v}");
    }
    let (code, v) = api(lan, 0, "DELETE", "vms/mover/migrate", Some(t), None);
    assert_eq!(code, 404, "no migration to cancel: {v}");

    // --- node0 -> node1 with the CLI.
    let (ok, out, err) = cli(
        lan,
        0,
        &home,
        &["vm", "migrate", "mover", "--to", "node1"],
        "",
    );
    assert!(ok, "{out}{err}\n{}\n{}", nodes[0].logs(), nodes[1].logs());
    assert!(
        out.contains("runs on node1 (from node0): downtime "),
        "{out}"
    );
    let v = vm(lan, 0, t, "mover");
    assert_eq!(v["placed_on"], ids[1].as_str(), "{v}");
    wait_for("node1 to report the VM running", 20, || {
        let v = vm(lan, 0, t, "mover");
        (v["running_on"] == ids[1].as_str() && v["actual_state"] == "running").then_some(())
    });
    wait_for("node0's VMM to be gone", 10, || {
        (!tessera_tests::vms::alive(source_pid)).then_some(())
    });
    assert_eq!(vm_pid(&nodes[0].dir, "mover"), None);
    let target_pid = vm_pid(&nodes[1].dir, "mover").unwrap();
    let cmd =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{target_pid}/cmdline")).unwrap())
            .replace('\0', " ");
    assert!(cmd.contains("--incoming"), "{cmd}");
    assert!(
        cmd.contains("--disk nbd+unix:///disk3?socket="),
        "node1's VMM does not use its own store: {cmd}"
    );
    // The task reached 100% with the figures.
    let (code, tasks) = api(lan, 0, "GET", "tasks", Some(t), None);
    assert_eq!(code, 200);
    let task = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["vm"]["action"] == "migrate" && k["state"] == "succeeded")
        .cloned()
        .unwrap_or_else(|| panic!("no migration task: {tasks}"));
    assert_eq!(task["progress"], 100, "{task}");
    let m = &task["vm"]["migration"];
    assert_eq!(m["phase"], "done", "{task}");
    assert!(m["bytes"].as_u64().unwrap() > 0, "{task}");
    assert!(m["iterations"].as_u64().unwrap() >= 1, "{task}");
    for k in [
        "downtime_ms",
        "total_ms",
        "dirty_bytes_per_s",
        "expected_downtime_ms",
        "bandwidth_bytes_per_s",
    ] {
        assert!(m[k].as_u64().is_some(), "{k}: {task}");
    }
    eprintln!("migration figures: {m}");
    // The guest counts on in node1, from where it was, without booting again.
    let shown_on_node0 = last_count(&nodes[0].dir, "mover").unwrap();
    wait_for("the guest to count on node1", 30, || {
        (last_count(&nodes[1].dir, "mover") > Some(shown_on_node0 + 10)).then_some(())
    });
    let first_run = console(&nodes[0].dir, "mover");
    assert_one_run(&[&first_run, &console(&nodes[1].dir, "mover")]);
    // Its disk: the primary moved to node1 in the next generation, every copy stayed in
    // sync (the old primary's store became a replica before node1's started as the
    // primary: none refused the new primary's fence and had to be caught up again), and
    // it holds node1's writes.
    let generation = moved_once(lan, t, "disk3", &ids[1], generation);
    let written = wait_for("a count written on node1", 30, || {
        let k = disk_count(&nodes[1].dir, "disk3");
        (k > shown_on_node0).then_some(k)
    });
    assert_eq!(written % 5, 0);
    let (code, events) = api(lan, 0, "GET", "events", Some(t), None);
    assert_eq!(code, 200);
    let events = events.to_string();
    for kind in ["vm.migrate", "vm.migrated", "volume.primary_moved"] {
        assert!(events.contains(kind), "no {kind} event: {events}");
    }
    // The console follows: asked of node2, it streams node1's VMM.
    let streamed = console_via(lan, 2, &home, "mover", shown_on_node0 + 10);
    assert!(streamed.last() > Some(&shown_on_node0), "{streamed:?}");

    // --- A node without room: node0 full (one vCPU per CPU, a 2-vCPU VM pinned there).
    let ratio = |r: f64| {
        let body = json!({ "vcpu_overcommit": r }).to_string();
        let (code, v) = api(lan, 0, "PATCH", "settings", Some(t), Some(&body));
        assert_eq!(code, 200, "{v}");
    };
    ratio(1.0);
    let (code, v) = api(
        lan,
        0,
        "PATCH",
        "vms/hog",
        Some(t),
        Some(&json!({"node": ids[0]}).to_string()),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = api(lan, 0, "POST", "vms/hog/start", Some(t), None);
    assert_eq!(code, 202, "{v}");
    let cpus = wait_for("node0's CPU count", 10, || {
        let (_, n) = api(lan, 0, "GET", "nodes", Some(t), None);
        n.as_array()?
            .iter()
            .find(|n| n["id"] == ids[0].as_str())
            .and_then(|n| n["metrics"]["cpus"].as_u64())
    });
    if cpus <= 2 {
        let (code, v) = migrate(lan, t, "mover", json!({"to": "node0"}));
        assert_eq!(code, 409, "{v}");
        let why = v["error"].as_str().unwrap();
        assert!(
            why.contains("node0 (pinned) cannot take") && why.contains("vCPUs free"),
            "{v}"
        );
    } else {
        eprintln!("this machine has {cpus} CPUs: the 2-vCPU VM does not fill node0; the room refusal is not checked here");
    }
    let (code, v) = api(lan, 0, "POST", "vms/hog/kill", Some(t), None);
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        wait_task(lan, 0, t, v["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    ratio(4.0);

    // --- The target VMM killed in the middle: the VM runs on in node1.
    let (code, v) = migrate(
        lan,
        t,
        "mover",
        json!({"to": "node0", "max_bandwidth_kib_s": 16}),
    );
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_moving(lan, t, &id);
    let incoming = vm_pid(&nodes[0].dir, "mover").expect("node0's incoming VMM");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(incoming as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let task = wait_task(lan, 0, t, &id);
    assert_eq!(task["state"], "failed", "{task}");
    let before = last_count(&nodes[1].dir, "mover").unwrap();
    wait_for("the guest to count on in node1", 30, || {
        (last_count(&nodes[1].dir, "mover") > Some(before + 3)).then_some(())
    });
    assert_eq!(vm_pid(&nodes[1].dir, "mover"), Some(target_pid));
    let v = vm(lan, 0, t, "mover");
    assert_eq!(
        (v["placed_on"].as_str(), v["actual_state"].as_str()),
        (Some(ids[1].as_str()), Some("running")),
        "{v}"
    );

    // --- A cancel, with the CLI: the same.
    let (code, v) = migrate(
        lan,
        t,
        "mover",
        json!({"to": "node2", "max_bandwidth_kib_s": 16}),
    );
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_moving(lan, t, &id);
    let (ok, out, err) = cli(lan, 0, &home, &["vm", "migrate", "mover", "--cancel"], "");
    assert!(ok, "{out}{err}");
    let task = wait_task(lan, 0, t, &id);
    assert_eq!(task["state"], "failed", "{task}");
    assert!(
        task["error"]
            .as_str()
            .unwrap()
            .contains("cancelled by admin"),
        "{task}"
    );
    let before = last_count(&nodes[1].dir, "mover").unwrap();
    wait_for("the guest to count on in node1", 30, || {
        (last_count(&nodes[1].dir, "mover") > Some(before + 3)).then_some(())
    });
    assert_eq!(vm_pid(&nodes[1].dir, "mover"), Some(target_pid));
    assert_eq!(vm_pid(&nodes[2].dir, "mover"), None);

    // --- And back to node0 (the scheduler may choose: node2 is as good; name it).
    let second_run_start = last_count(&nodes[1].dir, "mover").unwrap();
    let (code, v) = migrate(lan, t, "mover", json!({"to": ids[0]}));
    assert_eq!(code, 202, "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}\n{}", nodes[0].logs());
    wait_for("the guest to count on node0 again", 30, || {
        (last_count(&nodes[0].dir, "mover") > Some(second_run_start + 5)).then_some(())
    });
    assert_one_run(&[
        &first_run,
        &console(&nodes[1].dir, "mover"),
        &console(&nodes[0].dir, "mover"),
    ]);
    moved_once(lan, t, "disk3", &ids[0], generation);

    // --- node0 in maintenance: drained by live migration.
    let runs = [first_run, console(&nodes[1].dir, "mover")];
    let on =
        maintenance::node0_drained_by_live_migration(&c, t, &home, &ids, &runs, assert_one_run);

    // --- A node that is down is no target: 409, and the guest runs on where it is.
    let down = 3 - on;
    let t = c.token.clone();
    c.nodes[down].kill_tesserad();
    let name = format!("node{down}");
    wait_for("the killed node reported down", 20, || {
        let (_, v) = api(&c.lan, 0, "GET", "nodes", Some(&t), None);
        v.as_array()?
            .iter()
            .any(|n| n["id"] == ids[down].as_str() && n["state"] == "down")
            .then_some(())
    });
    let body = json!({ "to": name }).to_string();
    let (code, v) = wait_for("an answer with a leader", 20, || {
        let (code, v) = api(
            &c.lan,
            0,
            "POST",
            "vms/mover/migrate",
            Some(&t),
            Some(&body),
        );
        (code != 503).then_some((code, v))
    });
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("{name} is not up")),
        "{v}"
    );
    let before = last_count(&c.nodes[on].dir, "mover").unwrap();
    wait_for("the guest to count on where it was", 30, || {
        (last_count(&c.nodes[on].dir, "mover") > Some(before + 3)).then_some(())
    });
    let v = vm(&c.lan, 0, &t, "mover");
    assert_eq!(v["placed_on"], ids[on].as_str(), "{v}");
}

/// Volume `name` after one move of its VM to node `to`: its primary there in generation
/// `before + 1`, and its three copies in sync, none joining, for the next two seconds (a
/// copy dropped by the new primary would be out of sync or catching up, then joining,
/// each step a generation more). Its generation.
fn moved_once(lan: &Lan, t: &str, name: &str, to: &str, before: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let v = volume(lan, t, name);
        assert_eq!(v["node"], to, "{v}");
        assert_eq!(
            v["replication"]["generation"].as_u64(),
            Some(before + 1),
            "one move raises the generation once: {v}"
        );
        let copies = v["replication"]["copies"].as_array().unwrap();
        assert_eq!(copies.len(), 3, "{v}");
        for c in copies {
            assert!(
                c["state"] == "in_sync" && c.get("joining").is_none(),
                "a copy left the in-sync set in the move: {v}"
            );
        }
        if Instant::now() > end {
            return before + 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until disk3's three copies are in sync (none joining); its generation then.
fn in_sync(lan: &Lan, t: &str) -> u64 {
    wait_for("disk3's copies in sync", 60, || {
        let v = volume(lan, t, "disk3");
        let synced = v["state"] == "ready"
            && v["replication"]["copies"].as_array().is_some_and(|c| {
                c.len() == 3
                    && c.iter()
                        .all(|c| c["state"] == "in_sync" && c.get("joining").is_none())
            });
        synced.then(|| v["replication"]["generation"].as_u64().unwrap())
    })
}
