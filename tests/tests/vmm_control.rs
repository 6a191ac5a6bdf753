//! The VMM's control API over its Unix socket: describe, pause (the guest's progress
//! stops), resume (it continues), console read and write, events, power-off, the
//! guest-visible shutdown (the ACPI power button), and bad requests.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::{bin, VmApi};

const GUEST: &str = env!("TESSERA_TEST_GUEST");

/// Starts tessera-vmm with the test guest, a control socket and a console file in `dir`.
fn spawn_vm(dir: &std::path::Path, args: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    let sock = dir.join("vm.sock");
    let child = Command::new(bin("tessera-vmm"))
        .args(args)
        .arg("--api-socket")
        .arg(&sock)
        .arg("--serial-out")
        .arg(dir.join("serial.log"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, sock)
}

struct Api(VmApi);

impl Api {
    fn connect(path: &std::path::Path) -> Api {
        Api(VmApi::connect(path))
    }

    fn raw(&mut self, line: &str) -> Value {
        self.0.raw(line)
    }

    fn call(&mut self, op: Value) -> Value {
        self.0.call(op)
    }

    /// Console output since `since` (returns text and next offset).
    fn serial(&mut self, since: u64) -> (String, u64) {
        let v = self.call(json!({ "type": "serial_read", "since": since }));
        (
            v["data"].as_str().unwrap().to_string(),
            v["next"].as_u64().unwrap(),
        )
    }

    fn wait_for(&mut self, since: u64, needle: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (text, _) = self.serial(since);
            if let Some(pos) = text.find(needle) {
                return since + (pos + needle.len()) as u64;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn pause_stops_the_guest_resume_continues_and_power_off_ends_the_vm() {
    if !tessera_tests::kvm_or_skip(
        "pause_stops_the_guest_resume_continues_and_power_off_ends_the_vm",
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (mut child, sock) = spawn_vm(
        d.path(),
        &[
            "--kernel",
            GUEST,
            "--memory-mib",
            "64",
            "--cmdline",
            "console=ttyS0 tessera.mode=count",
        ],
    );
    let mut api = Api::connect(&sock);
    api.wait_for(0, "count 2\n");

    let desc = api.call(json!({ "type": "describe" }));
    assert_eq!(desc["state"], "running", "{desc}");
    assert_eq!(desc["spec"]["memory_mib"], 64);

    api.call(json!({ "type": "pause" }));
    assert_eq!(api.call(json!({ "type": "describe" }))["state"], "paused");
    let (_, at_pause) = api.serial(0);
    std::thread::sleep(Duration::from_millis(500));
    let (during, _) = api.serial(at_pause);
    assert!(during.is_empty(), "the guest ran while paused: {during:?}");
    let again = api.raw(r#"{"v":1,"op":{"type":"pause"}}"#);
    assert!(
        again["error"].as_str().unwrap().contains("already paused"),
        "{again}"
    );

    api.call(json!({ "type": "resume" }));
    api.wait_for(at_pause, "count ");
    assert_eq!(
        api.call(json!({ "type": "serial_write", "data": "hello" }))["queued"],
        5
    );

    let events = api.call(json!({ "type": "events" }));
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["started", "paused", "resumed"]);

    // Bad requests and requests the state does not allow get an error that says why,
    // no result, and the connection carries on.
    let snapshot_dir = d.path().join("snap");
    let snapshot_running = json!({ "v": 1, "op": { "type": "snapshot", "dir": snapshot_dir } });
    let cases: [(&str, &str); 7] = [
        ("not json", "bad request: "),
        (
            r#"{"v":7,"op":{"type":"describe"}}"#,
            "API version 7 is not supported (this VMM speaks 1)",
        ),
        (
            r#"{"v":1,"op":{"type":"explode"}}"#,
            "bad request: unknown variant `explode`",
        ),
        (
            r#"{"v":1,"op":{"type":"serial_read","extra":1}}"#,
            "bad request: unknown field `extra`",
        ),
        (r#"{"v":1,"op":{"type":"resume"}}"#, "the VM is not paused"),
        (
            &snapshot_running.to_string(),
            "pause the VM before taking a snapshot",
        ),
        (
            r#"{"v":1,"op":{"type":"dirty_pages"}}"#,
            "dirty-page tracking is off (start with --track-dirty-pages)",
        ),
    ];
    for (line, want) in cases {
        let reply = api.raw(line);
        assert_eq!(reply["v"], 1, "{line}: {reply}");
        assert!(reply.get("ok").is_none(), "{line}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(want), "{line}: {reply}");
    }
    assert!(
        !snapshot_dir.exists(),
        "a refused snapshot created its directory"
    );
    assert_eq!(api.call(json!({ "type": "describe" }))["state"], "running");

    api.call(json!({ "type": "power_off" }));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "VMM still running after power_off"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "VMM exited with {status}");
}

#[test]
fn pause_and_resume_reach_every_vcpu_of_a_multi_vcpu_vm() {
    if !tessera_tests::kvm_or_skip("pause_and_resume_reach_every_vcpu_of_a_multi_vcpu_vm") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (mut child, sock) = spawn_vm(
        d.path(),
        &[
            "--kernel",
            GUEST,
            "--memory-mib",
            "64",
            "--vcpus",
            "3",
            "--cmdline",
            "console=ttyS0 tessera.mode=count",
        ],
    );
    let mut api = Api::connect(&sock);
    api.wait_for(0, "count 1\n");
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    for v in ["vcpu0", "vcpu1", "vcpu2"] {
        assert!(names.iter().any(|n| n == v), "no {v} thread: {names:?}");
    }
    api.call(json!({ "type": "pause" }));
    assert_eq!(api.call(json!({ "type": "describe" }))["state"], "paused");
    let (_, at) = api.serial(0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(api.serial(at).0.is_empty(), "the guest ran while paused");
    let snap = api.raw(&json!({ "v": 1, "op": { "type": "snapshot", "dir": d.path().join("s").to_str().unwrap() } }).to_string());
    // Multi-vCPU snapshots are taken (restoring them: tests/tests/vmm_snapshot.rs).
    assert!(snap["ok"]["dir"].is_string(), "{snap}");
    api.call(json!({ "type": "resume" }));
    api.wait_for(at, "count ");
    api.call(json!({ "type": "power_off" }));
    assert!(child.wait().unwrap().success());
}

#[test]
fn typing_on_the_console_through_the_api_reaches_the_guest() {
    if !tessera_tests::kvm_or_skip("typing_on_the_console_through_the_api_reaches_the_guest") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (mut child, sock) = spawn_vm(
        d.path(),
        &[
            "--kernel",
            GUEST,
            "--memory-mib",
            "64",
            "--cmdline",
            "console=ttyS0 tessera.mode=echo",
        ],
    );
    let mut api = Api::connect(&sock);
    let at = api.wait_for(0, "echo ready\n");
    api.call(json!({ "type": "serial_write", "data": "hello tessera\n" }));
    api.wait_for(at, "echo: HELLO TESSERA\n");
    api.call(json!({ "type": "serial_write", "data": "bye\n" }));
    assert!(
        child.wait().unwrap().success(),
        "the guest's power-off did not end the VMM"
    );
}

/// Waits up to 20 s for the VMM to exit.
fn exits_within_20s(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the VMM is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn shutdown_presses_the_power_button_and_the_guest_decides() {
    if !tessera_tests::kvm_or_skip("shutdown_presses_the_power_button_and_the_guest_decides") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (obeys, ignores) = (d.path().join("obeys"), d.path().join("ignores"));
    std::fs::create_dir_all(&obeys).unwrap();
    std::fs::create_dir_all(&ignores).unwrap();
    let guest = |cmdline: &'static str| {
        [
            "--kernel",
            GUEST,
            "--memory-mib",
            "64",
            "--cmdline",
            cmdline,
        ]
    };
    // The VMM's log says why the VM stopped.
    let log = std::fs::File::create(d.path().join("obeys.log")).unwrap();
    let sock = obeys.join("vm.sock");
    let mut a = Command::new(bin("tessera-vmm"))
        .args(guest("console=ttyS0 tessera.mode=count"))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--serial-out")
        .arg(obeys.join("serial.log"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let (mut b, b_sock) = spawn_vm(
        &ignores,
        &guest("console=ttyS0 tessera.mode=count tessera.power_button=ignore"),
    );
    let mut api = Api::connect(&sock);
    let mut b_api = Api::connect(&b_sock);
    api.wait_for(0, "count 1\n");
    let b_at = b_api.wait_for(0, "count 1\n");

    // A paused guest could not act on a press: refused, and nothing is left pending.
    api.call(json!({ "type": "pause" }));
    let paused = api.raw(r#"{"v":1,"op":{"type":"shutdown"}}"#);
    assert!(
        paused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("the VM is paused: its guest cannot see the power button"),
        "{paused}"
    );
    api.call(json!({ "type": "resume" }));
    let (_, at) = api.serial(0);
    api.wait_for(at, "count ");
    assert!(
        !api.serial(0).0.contains("power button"),
        "a refused press reached the guest"
    );
    assert_eq!(api.call(json!({ "type": "shutdown" }))["pressed"], true);
    // The guest powers off at once, taking the control socket with it: read its file.
    let status = exits_within_20s(&mut a);
    assert!(status.success(), "VMM exited with {status}");
    let console = std::fs::read_to_string(obeys.join("serial.log")).unwrap();
    assert!(
        console.ends_with("TESSERA-GUEST: power button pressed, shutting down\n"),
        "{console}"
    );
    let text = std::fs::read_to_string(d.path().join("obeys.log")).unwrap();
    assert!(text.contains("reason=Reset"), "{text}");

    // A guest that ignores the button keeps running; a power-off still ends it.
    b_api.call(json!({ "type": "shutdown" }));
    let after = b_api.wait_for(b_at, "TESSERA-GUEST: power button pressed, ignored\n");
    b_api.wait_for(after, "count ");
    assert_eq!(
        b_api.call(json!({ "type": "describe" }))["state"],
        "running"
    );
    let kinds: Vec<String> = b_api
        .call(json!({ "type": "events" }))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["started", "power_button"]);
    b_api.call(json!({ "type": "power_off" }));
    assert!(exits_within_20s(&mut b).success());
}
