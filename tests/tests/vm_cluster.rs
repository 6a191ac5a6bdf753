//! VMs run on a three-node cluster (network namespaces, a `tessera-store` per node, the
//! test guest counting on its console and writing its disk): placement on the node that
//! holds the VM's volume, start/pause/resume/stop observed from the guest's counter, a
//! refused oversized VM naming each node's free memory, bad input refused with nothing
//! changed, a `tesserad` killed and restarted while its VM runs (the VM keeps running and
//! is re-adopted), a killed VMM restarted by the `on-crash` policy and left `crashed`
//! with the reason under `never`, the disk's content checked with nbdcopy, the CLI, a
//! VM pinned to another node than its volume writing that volume over TLS NBD, a stop
//! that the guest obeys (power button) and one forced after the VM's stop timeout, a
//! stop during a crash-restart backoff, and vCPU overcommit (more one-vCPU VMs than CPUs
//! on a node; the ratio as a cluster setting).

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for, wait_task, ClusterNode};
use tessera_tests::vms::{
    self, act, alive, console, counting, last_count, node_ids, vm, vm_pid, wait_state, VmCluster,
    GUEST,
};
use tessera_tests::{bin, counts, output, require, Lan};

#[test]
fn vms_run_on_the_cluster_and_survive_a_tesserad_restart() {
    let test = "vms_run_on_the_cluster_and_survive_a_tesserad_restart";
    let Some(mut c) = VmCluster::start(test, 3, "vm-cluster-password-1") else {
        return;
    };
    require("nbdcopy");
    let (lan, d, t) = (&c.lan, &c.dir, c.token.as_str());
    let nodes = &mut c.nodes;
    let ids = node_ids(lan, t, 3);

    // A volume on node1 and a VM booting the test guest from it.
    let body = json!({ "name": "boot", "size_bytes": 16 << 20, "node": ids[1], "replicas": 1 })
        .to_string();
    let (code, v) = api(lan, 0, "POST", "volumes", Some(t), Some(&body));
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        wait_task(lan, 0, t, v["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    let body = json!({
        "name": "vm1", "vcpus": 1, "memory_mib": 64, "disks": ["boot"],
        "kernel": GUEST, "cmdline": "console=ttyS0 tessera.mode=count",
    })
    .to_string();
    let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["actual_state"], "stopped");
    assert_eq!(v["restart_policy"], "on-crash");

    // Oversized: refused naming each node's free memory; nothing changes.
    let body =
        json!({ "name": "big", "vcpus": 1, "memory_mib": 1048576, "kernel": GUEST }).to_string();
    assert_eq!(api(lan, 0, "POST", "vms", Some(t), Some(&body)).0, 201);
    let (code, v) = act(lan, 2, t, "big", "start");
    assert_eq!(code, 409, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("no node can take 1024 GiB and 1 vCPU:"),
        "{msg}"
    );
    for n in ["node0", "node1", "node2"] {
        assert!(
            msg.contains(&format!("{n} has ")) && msg.contains("free"),
            "{msg}"
        );
    }
    assert!(
        msg.contains("vCPUs free (") && msg.contains(" x 4 overcommit)"),
        "{msg}"
    );
    let big = vm(lan, 0, t, "big");
    assert_eq!(
        (big["desired_state"].as_str(), big["actual_state"].as_str()),
        (Some("stopped"), Some("stopped"))
    );

    // Start: placed on node1 (its disk's node) by a request to node0; the guest counts.
    // The answer is the request's task, on the node it was placed on; it ends once that
    // node reports the VM running.
    let (code, v) = act(lan, 0, t, "vm1", "start");
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["node"], ids[1].as_str(), "{v}");
    assert_eq!(
        (v["vm"]["vm"].as_str(), v["vm"]["action"].as_str()),
        (Some("vm1"), Some("start"))
    );
    let task = wait_task(lan, 2, t, v["id"].as_str().unwrap());
    assert_eq!(
        (task["state"].as_str(), task["progress"].as_u64()),
        (Some("succeeded"), Some(100)),
        "{task}"
    );
    assert!(
        task["log"].to_string().contains("done: VM running"),
        "{task}"
    );
    let v = vm(lan, 2, t, "vm1");
    assert_eq!(v["actual_state"], "running", "{v}");
    assert_eq!(v["running_on"], ids[1].as_str());
    counting(&nodes[1].dir, "vm1");
    // GET /nodes accounts for it on node1 only (big is stopped: not counted).
    let (code, list) = api(lan, 2, "GET", "nodes", Some(t), None);
    assert_eq!(code, 200, "{list}");
    for n in list.as_array().unwrap() {
        let a = &n["allocation"];
        let mine = n["id"] == ids[1].as_str();
        assert_eq!(a["memory_mib_allocated"], if mine { 64 } else { 0 }, "{n}");
        assert_eq!(a["vcpus_allocated"], if mine { 1 } else { 0 }, "{n}");
        assert_eq!(a["vms"], if mine { 1 } else { 0 }, "{n}");
        assert!(a["memory_mib"].as_u64().unwrap() > 0, "{n}");
        assert!(a["cpus"].as_u64().unwrap() > 0, "{n}");
    }
    overcommit(lan, &nodes[0], t, &ids, &list);

    // A refused request creates no task.
    let tasks_before = api(lan, 0, "GET", "tasks", Some(t), None).1;
    assert_eq!(act(lan, 0, t, "vm1", "start").0, 409, "a second start");
    assert_eq!(
        api(lan, 0, "GET", "tasks", Some(t), None)
            .1
            .as_array()
            .map(Vec::len),
        tasks_before.as_array().map(Vec::len),
        "a refused start left a task"
    );

    // Pause: the counter stands still; resume: it counts on.
    assert_eq!(act(lan, 1, t, "vm1", "pause").0, 202);
    wait_state(lan, 1, t, "vm1", "paused");
    let frozen = last_count(&nodes[1].dir, "vm1");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        last_count(&nodes[1].dir, "vm1"),
        frozen,
        "a paused guest counted"
    );
    assert_eq!(act(lan, 2, t, "vm1", "resume").0, 202);
    wait_state(lan, 2, t, "vm1", "running");
    counting(&nodes[1].dir, "vm1");

    // Bad input: delete while running; nothing changes.
    let (code, v) = api(lan, 0, "DELETE", "vms/vm1", Some(t), None);
    assert_eq!(code, 409, "{v}");
    assert_eq!(vm(lan, 0, t, "vm1")["actual_state"], "running");

    let home = d.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cli = |args: &[&str], stdin: &str| vms::cli(lan, 0, &home, args, stdin);
    let (ok, out, err) = cli(&["login", "--user", "admin"], "vm-cluster-password-1\n");
    assert!(ok, "{out}{err}");

    // tesserad on the VM's node is killed and started again: the VMM kept running and
    // is re-adopted (same pid, state running, pause, resume and the console work through
    // it).
    let pid = wait_for("the VMM's pid", 20, || vm_pid(&nodes[1].dir, "vm1"));
    nodes[1].kill_tesserad();
    std::thread::sleep(Duration::from_secs(2));
    assert!(alive(pid), "the VMM died with tesserad");
    counting(&nodes[1].dir, "vm1");
    nodes[1].start_tesserad(lan);
    wait_for("node1's API after the restart", 60, || {
        (api(lan, 1, "GET", "vms/vm1", Some(t), None).0 == 200).then_some(())
    });
    assert_eq!(
        vm_pid(&nodes[1].dir, "vm1"),
        Some(pid),
        "the VMM was replaced"
    );
    assert_eq!(act(lan, 1, t, "vm1", "pause").0, 202);
    wait_state(lan, 1, t, "vm1", "paused");
    assert_eq!(act(lan, 1, t, "vm1", "resume").0, 202);
    let v = wait_state(lan, 1, t, "vm1", "running");
    assert_eq!(v["running_on"], ids[1].as_str());
    assert!(alive(pid), "{}", nodes[1].logs());
    counting(&nodes[1].dir, "vm1");
    console_streams(lan, 1, &home, &nodes[1]);

    // The VMM is killed: on-crash restarts it (a new process) and says why.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let v = wait_for("the VMM restarted by the policy", 60, || {
        let v = vm(lan, 0, t, "vm1");
        let new = vm_pid(&nodes[1].dir, "vm1").is_some_and(|p| p != pid);
        (new && v["actual_state"] == "running").then_some(v)
    });
    // An adopted VMM is not this tesserad's child: its exit status is unknown.
    let reason = v["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("restarted after: the VMM process ended"),
        "{v}"
    );
    counting(&nodes[1].dir, "vm1");

    // Under `never` a killed VMM leaves the VM crashed with the reason.
    let body = json!({ "restart_policy": "never" }).to_string();
    assert_eq!(api(lan, 0, "PATCH", "vms/vm1", Some(t), Some(&body)).0, 200);
    let pid2 = vm_pid(&nodes[1].dir, "vm1").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid2 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let v = wait_state(lan, 2, t, "vm1", "crashed");
    let reason = v["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("signal 9") && reason.contains("never"),
        "{v}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        vm(lan, 0, t, "vm1")["actual_state"],
        "crashed",
        "restarted under never"
    );

    // Started again, then stopped through the CLI (which waits until it is stopped).
    let (code, v) = act(lan, 0, t, "vm1", "start");
    assert_eq!(code, 202, "{v}");
    wait_state(lan, 0, t, "vm1", "running");
    counting(&nodes[1].dir, "vm1");
    // Reboot: a new VMM on the same node, the guest counting again.
    let before = vm_pid(&nodes[1].dir, "vm1").unwrap();
    let (code, v) = act(lan, 2, t, "vm1", "reboot");
    assert_eq!(code, 202, "{v}");
    let v = wait_for("the VM rebooted", 60, || {
        let v = vm(lan, 0, t, "vm1");
        let new = vm_pid(&nodes[1].dir, "vm1").is_some_and(|p| p != before);
        // The node reports the reboot after it started the new VMM.
        let rebooted = v["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("rebooted"));
        (new && rebooted && v["actual_state"] == "running").then_some(v)
    });
    assert!(
        v["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("rebooted on request"),
        "{v}"
    );
    counting(&nodes[1].dir, "vm1");
    let (ok, out, err) = cli(&["cluster", "settings"], "");
    assert!(ok && out.contains("vcpu_overcommit: 4"), "{out}{err}");
    let (ok, out, err) = cli(&["vm", "ls"], "");
    assert!(
        ok && out.contains("vm1") && out.contains("running") && out.contains("node1"),
        "{out}{err}"
    );

    // The serial console through the API's WebSocket, with the CLI: the scrollback
    // first, then the counter as it counts, on the node the VM runs on. A plain GET is
    // told to upgrade.
    let (code, v) = api(lan, 1, "GET", "vms/vm1/console", Some(t), None);
    assert_eq!(code, 426, "{v}");
    // Then through node0, which does not run it: forwarded to node1 over node-to-node
    // HTTPS.
    for i in [1, 0] {
        console_streams(lan, i, &home, &nodes[1]);
    }
    // An Auditor may not attach (403); nothing changes.
    let body = json!({ "role": "auditor", "expires_in_s": 600 }).to_string();
    let (code, v) = api(lan, 0, "POST", "tokens", Some(t), Some(&body));
    assert_eq!(code, 201, "{v}");
    let auditor = v["token"].as_str().unwrap();
    let (code, _) = api(lan, 1, "GET", "vms/vm1/console", Some(auditor), None);
    assert_eq!(code, 403);
    assert_eq!(vm(lan, 0, t, "vm1")["actual_state"], "running");

    let (ok, out, err) = cli(&["vm", "stop", "vm1"], "");
    assert!(ok && out.contains("stopped"), "{out}{err}");
    let (ok, out, err) = cli(&["task", "ls"], "");
    assert!(ok && out.contains("vm_stop vm1"), "{out}{err}");
    let (ok, out, err) = cli(&["vm", "stop", "vm1"], "");
    assert!(!ok && err.contains("409"), "a second stop: {out}{err}");
    assert!(
        vm_pid(&nodes[1].dir, "vm1").is_none(),
        "the VMM is still recorded"
    );

    // The guest wrote its disk: the marker and a count, read through the store.
    let sock = nodes[1].dir.join("store/nbd.sock");
    let mut c = std::process::Command::new("nbdcopy");
    c.arg(format!("nbd+unix:///boot?socket={}", sock.display()))
        .arg("--")
        .arg("-");
    let o = output(&mut c);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = String::from_utf8_lossy(&o.stdout[..1024]).into_owned();
    assert!(
        data.contains("TESSERA-MARK") && data.contains("COUNT="),
        "{data:?}"
    );

    // Pinned to another node than its volume: it runs there and its disk is the same
    // volume, reached over TLS NBD on node1's store with node2's certificate. The disk is
    // zeroed first, so the marker and count read back after are the remote guest's.
    let zeros = d.path().join("zeros.img");
    std::fs::write(&zeros, vec![0u8; 16 << 20]).unwrap();
    let mut c = std::process::Command::new("nbdcopy");
    c.arg(&zeros)
        .arg(format!("nbd+unix:///boot?socket={}", sock.display()));
    let o = output(&mut c);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let body = json!({ "node": ids[2] }).to_string();
    assert_eq!(api(lan, 0, "PATCH", "vms/vm1", Some(t), Some(&body)).0, 200);
    let (code, v) = act(lan, 0, t, "vm1", "start");
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["node"], ids[2].as_str(), "{v}");
    let v = wait_state(lan, 0, t, "vm1", "running");
    assert_eq!(v["running_on"], ids[2].as_str());
    // The guest writes COUNT= every fifth count: wait past two of those.
    wait_for("the remote guest to count past 11", 60, || {
        (last_count(&nodes[2].dir, "vm1") >= Some(11)).then_some(())
    });
    let (code, v) = act(lan, 0, t, "vm1", "stop");
    assert_eq!(code, 202, "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}");
    // The stop pressed the guest's power button and the guest powered itself off.
    assert!(
        task["log"]
            .to_string()
            .contains("VM stopped: the guest shut down"),
        "{task}"
    );
    assert!(
        console(&nodes[2].dir, "vm1")
            .contains("TESSERA-GUEST: power button pressed, shutting down"),
        "{}",
        console(&nodes[2].dir, "vm1")
    );
    wait_state(lan, 0, t, "vm1", "stopped");
    let mut c = std::process::Command::new("nbdcopy");
    c.arg(format!("nbd+unix:///boot?socket={}", sock.display()))
        .arg("--")
        .arg("-");
    let o = output(&mut c);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = String::from_utf8_lossy(&o.stdout[..1024]).into_owned();
    assert!(
        data.contains("TESSERA-MARK") && data.contains("COUNT="),
        "the guest on node2 did not write its volume on node1: {data:?}"
    );

    // Stopped: it can be deleted.
    let (code, v) = api(lan, 0, "DELETE", "vms/vm1", Some(t), None);
    assert_eq!(code, 200, "{v}");

    // A guest that ignores the power button is forced after its stop timeout.
    let body = json!({
        "name": "stubborn", "vcpus": 1, "memory_mib": 64, "kernel": GUEST,
        "cmdline": "console=ttyS0 tessera.mode=count tessera.power_button=ignore",
        "stop_timeout_s": 2, "node": ids[0],
    })
    .to_string();
    let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["stop_timeout_s"], 2, "{v}");
    let (code, v) = act(lan, 0, t, "stubborn", "start");
    assert_eq!(code, 202, "{v}");
    wait_state(lan, 0, t, "stubborn", "running");
    counting(&nodes[0].dir, "stubborn");
    let (code, v) = act(lan, 0, t, "stubborn", "stop");
    assert_eq!(code, 202, "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}");
    // The reason gives the time the stop actually waited: its timeout (2 s) or, on a
    // loaded machine, a little more.
    let log = task["log"].to_string();
    let forced = log
        .split("VM stopped: forced after ")
        .nth(1)
        .and_then(|rest| rest.split(" s: the guest did not shut down").next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(matches!(forced, Some(2..=10)), "{task}");
    assert!(
        console(&nodes[0].dir, "stubborn").contains("power button pressed, ignored"),
        "{}",
        console(&nodes[0].dir, "stubborn")
    );

    // A VM stopped while it waits for its crash-restart backoff has no VMM to stop: it is
    // reported stopped, and its stop task ends (it waited for its deadline before).
    let body = json!({
        "name": "crasher", "vcpus": 1, "memory_mib": 64,
        "kernel": "/nonexistent/tessera-kernel", "node": ids[0],
    })
    .to_string();
    assert_eq!(api(lan, 0, "POST", "vms", Some(t), Some(&body)).0, 201);
    assert_eq!(act(lan, 0, t, "crasher", "start").0, 202);
    // The third restart waits 4 s: room for the stop to land in the backoff.
    wait_for("crasher's third restart backoff", 60, || {
        let v = vm(lan, 0, t, "crasher");
        let r = v["state_reason"].as_str().unwrap_or_default().to_string();
        (v["actual_state"] == "starting"
            && r.contains("restarting in")
            && r.contains("(restart 3)"))
        .then_some(())
    });
    let (code, v) = act(lan, 0, t, "crasher", "stop");
    assert_eq!(code, 202, "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}");
    let v = wait_state(lan, 0, t, "crasher", "stopped");
    assert!(
        v["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("while waiting to restart"),
        "{v}"
    );
}

/// vCPU overcommit (default 4 per CPU): more one-vCPU VMs than node0 has CPUs run there at
/// once, and `GET /nodes` counts them against the limit; at ratio 1 the next one is
/// refused naming node0's free memory and vCPUs; a ratio out of range is refused. The
/// VMs are killed and deleted after, and the ratio put back.
fn overcommit(lan: &Lan, node0: &ClusterNode, t: &str, ids: &[String], nodes: &Value) {
    let (code, s) = api(lan, 0, "GET", "settings", Some(t), None);
    assert_eq!(
        (code, s["vcpu_overcommit"].as_f64()),
        (200, Some(4.0)),
        "{s}"
    );
    for n in nodes.as_array().unwrap() {
        let a = &n["allocation"];
        assert_eq!(
            a["vcpus_limit"].as_u64(),
            a["cpus"].as_u64().map(|c| c * 4),
            "{n}"
        );
    }
    let node = |list: &Value| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == ids[0].as_str())
            .unwrap()["allocation"]
            .clone()
    };
    let cpus = node(nodes)["cpus"].as_u64().unwrap();
    let names: Vec<String> = (0..=cpus).map(|i| format!("oc{i}")).collect();
    let mut tasks = Vec::new();
    for name in &names {
        let body = json!({
            "name": name, "vcpus": 1, "memory_mib": 32, "kernel": GUEST,
            "cmdline": "console=ttyS0 tessera.mode=count", "node": ids[0],
        })
        .to_string();
        assert_eq!(api(lan, 0, "POST", "vms", Some(t), Some(&body)).0, 201);
        let (code, v) = act(lan, 0, t, name, "start");
        assert_eq!(code, 202, "{v}");
        tasks.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &tasks {
        let task = wait_task(lan, 0, t, id);
        assert_eq!(task["state"], "succeeded", "{task}");
    }
    for name in &names {
        counting(&node0.dir, name);
    }
    let (_, list) = api(lan, 1, "GET", "nodes", Some(t), None);
    let a = node(&list);
    assert_eq!(a["vcpus_allocated"].as_u64(), Some(cpus + 1), "{a}");
    assert_eq!(
        a["memory_mib_allocated"].as_u64(),
        Some(32 * (cpus + 1)),
        "{a}"
    );

    // Out of range: 400, nothing changed. At 1 (no overcommit) node0 is full.
    for bad in ["0.5", "65", "\"4\"", "null"] {
        let body = format!("{{\"vcpu_overcommit\": {bad}}}");
        let (code, v) = api(lan, 2, "PATCH", "settings", Some(t), Some(&body));
        if bad == "null" {
            // null is "unchanged", as for every optional field of a PATCH.
            assert_eq!(
                (code, v["vcpu_overcommit"].as_f64()),
                (200, Some(4.0)),
                "{v}"
            );
        } else {
            assert_eq!(code, 400, "{bad}: {v}");
        }
    }
    let body = json!({ "vcpu_overcommit": 1 }).to_string();
    let (code, v) = api(lan, 2, "PATCH", "settings", Some(t), Some(&body));
    assert_eq!(
        (code, v["vcpu_overcommit"].as_f64()),
        (200, Some(1.0)),
        "{v}"
    );
    let body = json!({
        "name": "oc-more", "vcpus": 1, "memory_mib": 32, "kernel": GUEST, "node": ids[0],
    })
    .to_string();
    assert_eq!(api(lan, 0, "POST", "vms", Some(t), Some(&body)).0, 201);
    let (code, v) = act(lan, 1, t, "oc-more", "start");
    assert_eq!(code, 409, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("node node0 (pinned) cannot take 32 MiB and 1 vCPU: node0 has ")
            && msg.contains(&format!(
                "free and 0 of {cpus} vCPUs free ({cpus} CPUs x 1 overcommit)"
            )),
        "{msg}"
    );
    let body = json!({ "vcpu_overcommit": 4 }).to_string();
    assert_eq!(
        api(lan, 2, "PATCH", "settings", Some(t), Some(&body)).0,
        200
    );

    let mut tasks = Vec::new();
    for name in &names {
        let (code, v) = act(lan, 0, t, name, "kill");
        assert_eq!(code, 202, "{v}");
        tasks.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &tasks {
        let task = wait_task(lan, 0, t, id);
        assert_eq!(task["state"], "succeeded", "{task}");
    }
    for name in names.iter().chain([&"oc-more".to_string()]) {
        let (code, v) = api(lan, 0, "DELETE", &format!("vms/{name}"), Some(t), None);
        assert_eq!(code, 200, "{name}: {v}");
    }
}

/// `tessera vm console vm1` through node `i`: the scrollback (the guest's banner), then
/// the counter as it counts, three counts past the scrollback.
fn console_streams(lan: &Lan, i: usize, home: &Path, runs_it: &ClusterNode) {
    let mut c = lan.command(i, &bin("tessera"));
    c.env("HOME", home)
        .arg("--api")
        .arg(format!("https://{}:8006", Lan::addr(i)))
        .arg("--ca-file")
        .arg(lan.ca_file().unwrap())
        .args(["vm", "console", "vm1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
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
    let mut seen: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let scrollback_end = loop {
        // The scrollback is what the console held at attach; wait for counts after it.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                let o = child.wait_with_output().unwrap();
                panic!(
                    "console: {seen:?} {}\n{}",
                    String::from_utf8_lossy(&o.stderr),
                    runs_it.logs()
                );
            }
        }
        if let Some(&last) = counts(&seen.join("\n")).last() {
            break last;
        }
    };
    while counts(&seen.join("\n")).last() < Some(&(scrollback_end + 3)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("the console stopped streaming: {seen:?}");
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("tessera test guest")),
        "no scrollback through node{i}: {seen:?}"
    );
}
