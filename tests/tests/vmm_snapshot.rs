//! Snapshot and restore: the counting test guest is paused and snapshotted mid-run, the
//! VMM is killed, and a new VMM process restored from the snapshot continues the count
//! where it was, with the disk writes made before the snapshot in place and the disk
//! still working after the restore.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use tessera_tests::{bin, counts, output, wait_console, VmApi};

const GUEST: &str = env!("TESSERA_TEST_GUEST");

fn api(sock: &Path, op: Value) -> Value {
    VmApi::connect(sock).call(op)
}

fn spawn(args: &[&std::ffi::OsStr]) -> Child {
    Command::new(bin("tessera-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The console at a pause, split after its last complete line: the guest may have been
/// paused in the middle of a line ("count " without its number yet), which the restored
/// guest finishes in its own console file, so the cut part goes in front of that file.
fn split_at_cut(console: &str) -> (String, String) {
    let at = console.rfind('\n').map_or(0, |i| i + 1);
    (console[..at].to_string(), console[at..].to_string())
}

#[test]
fn a_restored_vm_continues_counting_and_keeps_its_disk() {
    if !tessera_tests::kvm_or_skip("a_restored_vm_continues_counting_and_keeps_its_disk") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (sock1, con1) = (d.path().join("a.sock"), d.path().join("a.log"));
    let snap = d.path().join("snap");
    let mut first = spawn(&[
        "--kernel".as_ref(),
        GUEST.as_ref(),
        "--memory-mib".as_ref(),
        "64".as_ref(),
        "--cmdline".as_ref(),
        "console=ttyS0 tessera.mode=count".as_ref(),
        "--disk".as_ref(),
        disk.as_os_str(),
        "--api-socket".as_ref(),
        sock1.as_os_str(),
        "--serial-out".as_ref(),
        con1.as_os_str(),
    ]);
    wait_console(&con1, "count 6", |t| {
        counts(t).last().is_some_and(|n| *n >= 6)
    });
    api(&sock1, json!({ "type": "pause" }));
    let (whole, cut) = split_at_cut(&std::fs::read_to_string(&con1).unwrap());
    let last = *counts(&whole).last().unwrap();
    let taken = api(
        &sock1,
        json!({ "type": "snapshot", "dir": snap.to_str().unwrap() }),
    );
    assert_eq!(taken, json!({ "dir": snap.to_str().unwrap() }));
    first.kill().unwrap();
    first.wait().unwrap();

    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        bytes.starts_with(b"TESSERA-MARK-BEFORE-SNAPSHOT"),
        "marker write missing"
    );
    assert!(std::fs::metadata(snap.join("memory")).unwrap().len() == 64 << 20);

    refuses_snapshots_it_cannot_read(d.path(), &snap, &disk);

    // The restore attaches the disk it is given (a copy), not the one in state.json.
    let original = disk.clone();
    let original_bytes = std::fs::read(&original).unwrap();
    let disk = d.path().join("disk-copy.raw");
    std::fs::copy(&original, &disk).unwrap();
    let (sock2, con2) = (d.path().join("b.sock"), d.path().join("b.log"));
    let mut second = spawn(&[
        "--restore".as_ref(),
        snap.as_os_str(),
        "--disk".as_ref(),
        disk.as_os_str(),
        "--api-socket".as_ref(),
        sock2.as_os_str(),
        "--serial-out".as_ref(),
        con2.as_os_str(),
    ]);
    let target = last + 11;
    let text = wait_console(&con2, "the count to go on", |t| {
        counts(t).last().is_some_and(|n| *n >= target)
    });
    assert!(
        !text.contains("tessera test guest"),
        "the guest booted again instead of continuing:\n{text}"
    );
    let after = counts(&format!("{cut}{text}"));
    assert_eq!(
        after[0],
        last + 1,
        "count did not continue from {last}: {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "count skipped: {after:?}"
    );
    // The disk kept the pre-snapshot write and took new ones after the restore.
    let bytes = std::fs::read(&disk).unwrap();
    assert!(bytes.starts_with(b"TESSERA-MARK-BEFORE-SNAPSHOT"));
    let count_text = String::from_utf8_lossy(&bytes[512..540])
        .trim_end_matches('\0')
        .to_string();
    let written: u64 = count_text
        .strip_prefix("COUNT=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("sector 1: {count_text:?}"));
    assert!(
        written > last,
        "no disk write after restore (sector 1 says {written}, snapshot at {last})"
    );

    assert!(
        std::fs::read(&original).unwrap() == original_bytes,
        "the restored VM wrote to the disk recorded in the snapshot"
    );

    let events = api(&sock2, json!({ "type": "events" }));
    assert_eq!(events[0]["kind"], "restored");
    api(&sock2, json!({ "type": "power_off" }));
    assert!(second.wait().unwrap().success());
}

/// Restoring from a snapshot this VMM cannot read fails, saying why, before the guest runs;
/// so does a restore that does not name the disk (the one recorded in the snapshot is
/// never opened).
fn refuses_snapshots_it_cannot_read(dir: &Path, good: &Path, disk: &Path) {
    let restore_fails_with = |snapshot: &Path, disk: Option<&Path>, want: &str| {
        let mut cmd = Command::new(bin("tessera-vmm"));
        cmd.arg("--restore")
            .arg(snapshot)
            .arg("--serial-out")
            .arg(dir.join("refused.log"));
        if let Some(disk) = disk {
            cmd.arg("--disk").arg(disk);
        }
        let out = output(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "restored {want:?}: {err}");
        assert!(err.contains(want), "wanted {want:?}: {err}");
    };
    let restore_fails =
        |snapshot: &Path, want: &str| restore_fails_with(snapshot, Some(disk), want);
    restore_fails_with(
        good,
        None,
        "the snapshotted VM had a disk: name it with --disk",
    );
    // The disk the snapshot names is not opened even when a restore would need it.
    let state: Value =
        serde_json::from_slice(&std::fs::read(good.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["spec"]["disk"], json!(disk.to_str().unwrap()));
    let missing = dir.join("missing");
    restore_fails(
        &missing,
        &format!("{}", missing.join("state.json").display()),
    );

    let bad = dir.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let mut newer = state.clone();
    newer["version"] = json!(99);
    std::fs::write(bad.join("state.json"), newer.to_string()).unwrap();
    restore_fails(
        &bad,
        "invalid snapshot: snapshot version 99 (this VMM reads 1)",
    );

    std::fs::write(bad.join("state.json"), state.to_string()).unwrap();
    std::fs::write(bad.join("memory"), b"too short").unwrap();
    restore_fails(
        &bad,
        "invalid snapshot: memory file size does not match its layout",
    );
}

#[test]
fn a_multi_vcpu_vm_is_snapshotted_and_restored_and_counts_on() {
    if !tessera_tests::kvm_or_skip("a_multi_vcpu_vm_is_snapshotted_and_restored_and_counts_on") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (sock1, con1) = (d.path().join("a.sock"), d.path().join("a.log"));
    let snap = d.path().join("snap");
    // Three vCPUs (ACPI tables, application processors waiting for their SIPI), counting.
    let mut first = spawn(&[
        "--kernel".as_ref(),
        GUEST.as_ref(),
        "--memory-mib".as_ref(),
        "64".as_ref(),
        "--vcpus".as_ref(),
        "3".as_ref(),
        "--cmdline".as_ref(),
        "console=ttyS0 tessera.mode=count".as_ref(),
        "--api-socket".as_ref(),
        sock1.as_os_str(),
        "--serial-out".as_ref(),
        con1.as_os_str(),
    ]);
    wait_console(&con1, "count 3", |t| {
        counts(t).last().is_some_and(|n| *n >= 3)
    });
    api(&sock1, json!({ "type": "pause" }));
    let (whole, cut) = split_at_cut(&std::fs::read_to_string(&con1).unwrap());
    let last = *counts(&whole).last().unwrap();
    let taken = api(
        &sock1,
        json!({ "type": "snapshot", "dir": snap.to_str().unwrap() }),
    );
    assert_eq!(taken, json!({ "dir": snap.to_str().unwrap() }));
    first.kill().unwrap();
    first.wait().unwrap();

    let state: Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).unwrap()).unwrap();
    let aps = state["aps"].as_array().unwrap();
    assert_eq!(aps.len(), 2, "application processors saved");
    for ap in aps {
        // KVM_MP_STATE_UNINITIALIZED (1, little endian): still waiting for INIT/SIPI, as
        // the test guest never starts its application processors.
        assert_eq!(ap["mp_state"], json!([1, 0, 0, 0]), "AP MP state");
    }

    // A snapshot whose vCPU states do not match its vCPU count is refused.
    let bad = d.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let mut short = state.clone();
    short["aps"] = json!([aps[0].clone()]);
    std::fs::write(bad.join("state.json"), short.to_string()).unwrap();
    let out = output(
        Command::new(bin("tessera-vmm"))
            .arg("--restore")
            .arg(&bad)
            .arg("--serial-out")
            .arg(d.path().join("refused.log")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("invalid snapshot: 2 vCPU states for 3 vCPUs"),
        "{err}"
    );

    let (sock2, con2) = (d.path().join("b.sock"), d.path().join("b.log"));
    let mut second = spawn(&[
        "--restore".as_ref(),
        snap.as_os_str(),
        "--api-socket".as_ref(),
        sock2.as_os_str(),
        "--serial-out".as_ref(),
        con2.as_os_str(),
    ]);
    let text = wait_console(&con2, "the count to go on", |t| {
        counts(t).last().is_some_and(|n| *n >= last + 6)
    });
    assert!(
        !text.contains("tessera test guest"),
        "booted again:\n{text}"
    );
    let after = counts(&format!("{cut}{text}"));
    assert_eq!(after[0], last + 1, "count did not continue: {after:?}");
    let described = api(&sock2, json!({ "type": "describe" }));
    assert_eq!(described["spec"]["vcpus"], json!(3));
    // Pause and resume still reach every vCPU of the restored VM.
    api(&sock2, json!({ "type": "pause" }));
    api(&sock2, json!({ "type": "resume" }));
    api(&sock2, json!({ "type": "power_off" }));
    assert!(second.wait().unwrap().success());
}
