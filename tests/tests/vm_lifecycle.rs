//! VM lifecycle details on a three-node cluster (network namespaces, a `tessera-store`
//! per node), with the test guest:
//!
//! - Starts racing for a node's last room: at overcommit 1, more one-vCPU starts pinned
//!   to node2 than it has CPUs, sent at once through all three nodes: exactly as many
//!   as it has CPUs are accepted, the others refused (409 naming node2), and node2 is not
//!   over its limit.
//! - Restart policies when the guest powers itself off: `always` starts it again (a new
//!   VMM, `restarted after: the guest powered off`), five times in a row without ever
//!   calling it a crash loop (events `vm.restart` up to `(restart 5)`, no `vm.crashed`),
//!   `on-crash` leaves it stopped. A VM whose VMM fails at once crashes in a loop: four
//!   restarts, then `crashed` with `crash loop: 5 crashes ...` and no more restarts; a
//!   stop of it then ends at once with the VM `stopped`.
//! - A stop's `stopping` state, observed while a guest that ignores its power button
//!   waits out the stop timeout set with `tessera vm set --stop-timeout`.
//! - `tessera vm console` on a terminal (a pty through `script`): the scrollback and the
//!   guest's answers appear, typed keys reach the guest, `Ctrl-]` leaves with exit code 0.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for, wait_task, ClusterNode};
use tessera_tests::vms::{
    act, cli, cli_command, console, counting, node_ids, vm, vm_pid, wait_state, VmCluster, GUEST,
};
use tessera_tests::{require, Lan, VmApi};

const PASSWORD: &str = "vm-lifecycle-password-1";

fn create(lan: &Lan, t: &str, body: Value) {
    let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
}

fn start(lan: &Lan, t: &str, name: &str) {
    let (code, v) = act(lan, 0, t, name, "start");
    assert_eq!(code, 202, "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}");
}

/// Types `text` into VM `name`'s console through its VMM's control socket.
fn type_into(dir: &Path, name: &str, text: &str) {
    let mut c = VmApi::connect(&dir.join(format!("data/vms/{name}/api.sock")));
    c.call(json!({ "type": "serial_write", "data": text }));
}

#[test]
fn vm_lifecycle_races_policies_stops_and_the_console_terminal() {
    let test = "vm_lifecycle_races_policies_stops_and_the_console_terminal";
    let Some(c) = VmCluster::start(test, 3, PASSWORD) else {
        return;
    };
    require("script");
    let (lan, nodes, d, t) = (&c.lan, &c.nodes, &c.dir, c.token.as_str());
    let ids = node_ids(lan, t, 3);
    let home = d.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (ok, out, err) = cli(
        lan,
        0,
        &home,
        &["login", "--user", "admin"],
        &format!("{PASSWORD}\n"),
    );
    assert!(ok, "{out}{err}");

    racing_starts(lan, t, &ids, nodes);
    guest_power_off(lan, t, &ids, nodes);
    stopping(lan, t, &ids, nodes, &home);
    console_terminal(lan, t, &ids, nodes, &home);
}

/// At overcommit 1 node2 takes as many one-vCPU VMs as it has CPUs. More starts than
/// that, pinned there and sent at the same moment through the three nodes, must not all
/// count the same free room: exactly `cpus` are accepted.
fn racing_starts(lan: &Lan, t: &str, ids: &[String], nodes: &[ClusterNode]) {
    let body = json!({ "vcpu_overcommit": 1 }).to_string();
    let (code, v) = api(lan, 0, "PATCH", "settings", Some(t), Some(&body));
    assert_eq!(code, 200, "{v}");
    let allocation = |list: &Value| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == ids[2].as_str())
            .unwrap()["allocation"]
            .clone()
    };
    let (_, list) = api(lan, 0, "GET", "nodes", Some(t), None);
    let cpus = allocation(&list)["cpus"].as_u64().unwrap() as usize;
    let names: Vec<String> = (0..cpus + 4).map(|i| format!("race{i}")).collect();
    for name in &names {
        create(
            lan,
            t,
            json!({
                "name": name, "vcpus": 1, "memory_mib": 32, "kernel": GUEST,
                "cmdline": "console=ttyS0 tessera.mode=count", "node": ids[2],
            }),
        );
    }
    let answers: Vec<(String, u16, Value)> = std::thread::scope(|s| {
        let go = Arc::new(std::sync::Barrier::new(names.len()));
        let handles: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let go = go.clone();
                s.spawn(move || {
                    go.wait();
                    let (code, v) = act(lan, i % 3, t, name, "start");
                    (name.clone(), code, v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let accepted: Vec<&String> = answers
        .iter()
        .filter(|(_, c, _)| *c == 202)
        .map(|(n, _, _)| n)
        .collect();
    for (name, code, v) in &answers {
        if *code != 202 {
            assert_eq!(*code, 409, "{name}: {v}");
            let msg = v["error"].as_str().unwrap_or_default();
            assert!(
                msg.contains("node node2 (pinned) cannot take 32 MiB and 1 vCPU")
                    || msg.contains("node2") && msg.contains("room changed meanwhile"),
                "{name}: {msg}"
            );
        }
    }
    assert_eq!(
        accepted.len(),
        cpus,
        "node2 has {cpus} CPUs at overcommit 1: {answers:?}"
    );
    // How often a start lost the race and was placed again (it depends on timing, so it
    // is reported, not required).
    let again: usize = nodes
        .iter()
        .map(|n| n.logs().matches("placing again").count())
        .sum();
    eprintln!("racing starts: {again} placed again after losing a race for node2's room");
    let (_, list) = api(lan, 1, "GET", "nodes", Some(t), None);
    let a = allocation(&list);
    assert_eq!(a["vcpus_allocated"].as_u64(), Some(cpus as u64), "{a}");
    assert_eq!(a["vcpus_limit"].as_u64(), Some(cpus as u64), "{a}");
    for name in &accepted {
        wait_state(lan, 0, t, name, "running");
    }
    for (name, code, _) in &answers {
        if *code != 202 {
            let v = vm(lan, 0, t, name);
            assert_eq!(
                v["desired_state"], "stopped",
                "a refused start changed it: {v}"
            );
        }
    }
    // Put back: kill and delete them, overcommit 4 again.
    for name in &accepted {
        let (code, v) = act(lan, 0, t, name, "kill");
        assert_eq!(code, 202, "{v}");
        wait_state(lan, 0, t, name, "stopped");
    }
    for name in &names {
        let (code, v) = api(lan, 0, "DELETE", &format!("vms/{name}"), Some(t), None);
        assert_eq!(code, 200, "{name}: {v}");
    }
    let body = json!({ "vcpu_overcommit": 4 }).to_string();
    assert_eq!(
        api(lan, 0, "PATCH", "settings", Some(t), Some(&body)).0,
        200
    );
}

/// The echo guest powers off when it reads "bye": under `always` it is started again (a
/// new VMM), under `on-crash` (the default) it stays stopped.
fn guest_power_off(lan: &Lan, t: &str, ids: &[String], nodes: &[ClusterNode]) {
    // Meanwhile a VM whose VMM fails at once (no such kernel) crashes in a loop: restarted
    // after 1, 2, 4 and 8 s, then left crashed at the fifth crash (checked at the end).
    create(
        lan,
        t,
        json!({
            "name": "looper", "vcpus": 1, "memory_mib": 32,
            "kernel": "/nonexistent/tessera-kernel", "node": ids[0],
        }),
    );
    let (code, v) = act(lan, 0, t, "looper", "start");
    assert_eq!(code, 202, "{v}");
    for (name, policy) in [("always", "always"), ("oncrash", "on-crash")] {
        create(
            lan,
            t,
            json!({
                "name": name, "vcpus": 1, "memory_mib": 32, "kernel": GUEST,
                "cmdline": "console=ttyS0 tessera.mode=echo", "node": ids[0],
                "restart_policy": policy,
            }),
        );
        start(lan, t, name);
    }
    let dir = &nodes[0].dir;
    for name in ["always", "oncrash"] {
        wait_for(&format!("{name}'s guest to echo"), 60, || {
            console(dir, name).contains("echo ready").then_some(())
        });
    }
    let first = vm_pid(dir, "always").unwrap();
    type_into(dir, "always", "bye\n");
    let v = wait_for("the always VM started again", 60, || {
        let v = vm(lan, 0, t, "always");
        let new = vm_pid(dir, "always").is_some_and(|p| p != first);
        (new && v["actual_state"] == "running").then_some(v)
    });
    let reason = v["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("restarted after: the guest powered off"),
        "{v}"
    );
    assert_eq!(v["desired_state"], "running", "{v}");
    wait_for("the restarted guest to echo", 60, || {
        console(dir, "always").contains("echo ready").then_some(())
    });
    type_into(dir, "always", "again\n");
    wait_for("the restarted guest to answer", 60, || {
        console(dir, "always").contains("echo: AGAIN").then_some(())
    });
    // Powered off by its guest again and again (on tessera-vmm a guest's reboot looks
    // the same): never a crash loop under `always`. The fifth ending within 10 minutes
    // once ended it `crashed` ("crash loop: 5 crashes"), as five crashes do.
    for n in 2..=5 {
        let before = vm_pid(dir, "always").unwrap();
        type_into(dir, "always", "bye\n");
        // Each VMM writes its console afresh: the new guest's has no "bye" in it.
        wait_for(&format!("the always VM's restart {n}"), 60, || {
            let v = vm(lan, 0, t, "always");
            let new = vm_pid(dir, "always").is_some_and(|p| p != before);
            let text = console(dir, "always");
            let ready = text.contains("echo ready") && !text.contains("echo: BYE");
            (new && ready && v["actual_state"] == "running").then_some(())
        });
    }
    // Every ending was a restart (the node's event says which), none a crash.
    let (code, events) = api(lan, 0, "GET", "events?limit=1000", Some(t), None);
    assert_eq!(code, 200, "{events}");
    let of = |kind: &str| -> Vec<String> {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind && e["target"] == "always")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let restarts = of("vm.restart");
    assert!(
        restarts.iter().any(|m| m.contains("(restart 5)")),
        "{restarts:?}"
    );
    assert_eq!(of("vm.crashed"), Vec::<String>::new());
    let v = vm(lan, 0, t, "always");
    assert_eq!(v["actual_state"], "running", "{v}");
    assert!(
        v["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("restarted after: the guest powered off"),
        "{v}"
    );

    type_into(dir, "oncrash", "bye\n");
    let v = wait_state(lan, 0, t, "oncrash", "stopped");
    assert_eq!(v["desired_state"], "stopped", "{v}");
    assert!(
        v["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("the guest powered off"),
        "{v}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let v = vm(lan, 0, t, "oncrash");
    assert_eq!(
        v["actual_state"], "stopped",
        "restarted under on-crash: {v}"
    );
    assert!(
        vm_pid(dir, "oncrash").is_none(),
        "a VMM runs under on-crash"
    );

    for name in ["always", "oncrash"] {
        let (code, v) = act(lan, 0, t, name, "kill");
        assert!(
            code == 202 || name == "oncrash" && code == 409,
            "{name}: {v}"
        );
        wait_state(lan, 0, t, name, "stopped");
    }

    let v = wait_state(lan, 0, t, "looper", "crashed");
    let reason = v["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("crash loop: 5 crashes within 10 minutes; not restarted"),
        "{v}"
    );
    let (code, events) = api(lan, 0, "GET", "events?limit=1000", Some(t), None);
    assert_eq!(code, 200, "{events}");
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "looper" && e["user"] == "tesserad")
        .map(|e| e["kind"].as_str().unwrap_or_default())
        .collect();
    let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
    assert_eq!(
        (count("vm.restart"), count("vm.crashed")),
        (4, 1),
        "{kinds:?}"
    );
    // Nothing restarts it now: its node reported it crashed once and for all.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm(lan, 0, t, "looper")["actual_state"], "crashed");
    // Stopped, it is stopped: nothing is left to stop, and the task ends at once (it once
    // waited for its deadline, the VM reported crashed for good).
    let (code, v) = act(lan, 0, t, "looper", "stop");
    assert_eq!(code, 202, "{v}");
    let task = wait_task(lan, 0, t, v["id"].as_str().unwrap());
    assert_eq!(task["state"], "succeeded", "{task}");
    let v = vm(lan, 0, t, "looper");
    assert_eq!(v["actual_state"], "stopped", "{v}");
    assert!(
        v["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("stopped on request after it crashed: "),
        "{v}"
    );
}

/// `tessera vm set --stop-timeout 6` on a guest that ignores its power button: the stop
/// reports `stopping` while it waits, then forces the VMM off after about 6 s.
fn stopping(lan: &Lan, t: &str, ids: &[String], nodes: &[ClusterNode], home: &Path) {
    create(
        lan,
        t,
        json!({
            "name": "slow", "vcpus": 1, "memory_mib": 32, "kernel": GUEST,
            "cmdline": "console=ttyS0 tessera.mode=count tessera.power_button=ignore",
            "node": ids[1],
        }),
    );
    let (ok, out, err) = cli(lan, 0, home, &["vm", "show", "slow"], "");
    assert!(ok && out.contains("30 s (default)"), "{out}{err}");
    let (ok, out, err) = cli(
        lan,
        0,
        home,
        &["vm", "set", "slow", "--stop-timeout", "6"],
        "",
    );
    assert!(
        ok && out.contains("stop_timeout") && out.contains("6 s"),
        "{out}{err}"
    );
    assert_eq!(vm(lan, 0, t, "slow")["stop_timeout_s"], 6);
    let (ok, out, err) = cli(
        lan,
        0,
        home,
        &["vm", "set", "slow", "--stop-timeout", "0"],
        "",
    );
    assert!(!ok && err.contains("400"), "{out}{err}");
    assert_eq!(vm(lan, 0, t, "slow")["stop_timeout_s"], 6);

    start(lan, t, "slow");
    counting(&nodes[1].dir, "slow");
    let asked = Instant::now();
    let (code, v) = act(lan, 0, t, "slow", "stop");
    assert_eq!(code, 202, "{v}");
    let task = v["id"].as_str().unwrap().to_string();
    let v = wait_for("the VM reported stopping", 20, || {
        let v = vm(lan, 2, t, "slow");
        (v["actual_state"] == "stopping").then_some(v)
    });
    assert_eq!(v["desired_state"], "stopped", "{v}");
    assert_eq!(v["running_on"], ids[1].as_str(), "{v}");
    assert!(
        vm_pid(&nodes[1].dir, "slow").is_some(),
        "stopping, but no VMM"
    );
    let task = wait_task(lan, 0, t, &task);
    assert_eq!(task["state"], "succeeded", "{task}");
    let log = task["log"].to_string();
    let forced = log
        .split("VM stopped: forced after ")
        .nth(1)
        .and_then(|rest| rest.split(" s: the guest did not shut down").next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(matches!(forced, Some(6..=15)), "{task}");
    assert!(asked.elapsed() >= Duration::from_secs(6), "{task}");
    wait_state(lan, 0, t, "slow", "stopped");
}

/// `tessera vm console` with a terminal: `script` gives it a pty; the typed line reaches
/// the echo guest and its answer comes back; Ctrl-] leaves, exit code 0.
fn console_terminal(lan: &Lan, t: &str, ids: &[String], nodes: &[ClusterNode], home: &Path) {
    create(
        lan,
        t,
        json!({
            "name": "tty", "vcpus": 1, "memory_mib": 32, "kernel": GUEST,
            "cmdline": "console=ttyS0 tessera.mode=echo", "node": ids[2],
        }),
    );
    start(lan, t, "tty");
    wait_for("tty's guest to echo", 60, || {
        console(&nodes[2].dir, "tty")
            .contains("echo ready")
            .then_some(())
    });
    // Through node0, which forwards to node2.
    let c = cli_command(lan, 0, home, &["vm", "console", "tty"]);
    let line: Vec<String> = std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| {
            let a = a.to_str().unwrap();
            assert!(
                a.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "/._:-".contains(ch)),
                "needs quoting: {a}"
            );
            a.to_string()
        })
        .collect();
    let mut child = std::process::Command::new("script")
        .args(["--quiet", "--return", "--echo", "never", "--flush"])
        .args(["--command", &line.join(" "), "/dev/null"])
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                return;
            }
            s2.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let wait_seen = |what: &str, ok: &dyn Fn(&str) -> bool| {
        wait_for(what, 30, || {
            let s = seen.lock().unwrap().clone();
            ok(&s).then_some(())
        })
    };
    wait_seen("the console's banner and scrollback", &|s| {
        s.contains("Ctrl-] leaves") && s.contains("echo ready")
    });
    let mut stdin = child.stdin.take().unwrap();
    // Raw mode: Enter is a carriage return, as a terminal sends it.
    stdin.write_all(b"hello pty\r").unwrap();
    stdin.flush().unwrap();
    wait_seen("the guest's answer through the pty", &|s| {
        s.contains("echo: HELLO PTY")
    });
    assert!(
        console(&nodes[2].dir, "tty").contains("echo: HELLO PTY"),
        "the typed line did not reach the guest"
    );
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("Ctrl-] did not leave the console: {}", seen.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(stdin);
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "{status}: {}{err}", seen.lock().unwrap());
    // The guest still runs: leaving the console does not stop it.
    assert_eq!(vm(lan, 0, t, "tty")["actual_state"], "running");
    let (code, v) = act(lan, 0, t, "tty", "kill");
    assert_eq!(code, 202, "{v}");
    wait_state(lan, 0, t, "tty", "stopped");
}
