//! Dirty-page tracking for live migration: pages the guest writes (KVM's dirty log) and
//! pages only the VMM writes (the virtio used ring) both show up, and the record clears.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tessera_tests::{bin, counts, wait_console, VmApi};

const GUEST: &str = env!("TESSERA_TEST_GUEST");

/// Runs an operation that must succeed; returns its result.
fn api(sock: &Path, op: Value) -> Value {
    VmApi::connect(sock).call(op)
}

fn wait_count(path: &Path, at_least: u64) -> String {
    wait_console(path, "the count", |t| {
        counts(t).last().is_some_and(|n| *n >= at_least)
    })
}

fn hex_after(text: &str, key: &str) -> u64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        + key.len()..];
    let hex: String = rest
        .trim_start_matches("0x")
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u64::from_str_radix(&hex, 16).unwrap()
}

fn contains(report: &Value, page: u64) -> bool {
    report["ranges"].as_array().unwrap().iter().any(|r| {
        let (start, len) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        (start..start + len).contains(&page)
    })
}

#[test]
fn guest_and_vmm_writes_are_both_tracked() {
    if !tessera_tests::kvm_or_skip("guest_and_vmm_writes_are_both_tracked") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (sock, con) = (d.path().join("vm.sock"), d.path().join("console.log"));
    let mut child = Command::new(bin("tessera-vmm"))
        .args([
            "--kernel",
            GUEST,
            "--memory-mib",
            "64",
            "--track-dirty-pages",
        ])
        .args(["--cmdline", "console=ttyS0 tessera.mode=count"])
        .arg("--disk")
        .arg(&disk)
        .arg("--api-socket")
        .arg(&sock)
        .arg("--serial-out")
        .arg(&con)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let text = wait_count(&con, 1);
    let used_page = hex_after(&text, "used ring page ");
    let buf_page = hex_after(&text, "buffer page ");

    // The first report covers everything since boot, then the record is clear.
    assert!(
        api(&sock, json!({ "type": "dirty_pages" }))["pages"]
            .as_u64()
            .unwrap()
            > 0
    );
    let n = *counts(&std::fs::read_to_string(&con).unwrap())
        .last()
        .unwrap();
    // Counting goes on; every fifth count writes the disk (guest fills the buffer, the
    // device writes the used ring).
    wait_count(&con, n + 11);
    api(&sock, json!({ "type": "pause" }));
    let report = api(&sock, json!({ "type": "dirty_pages" })).clone();
    assert!(
        contains(&report, buf_page),
        "guest-written buffer page {buf_page:#x} missing: {report}"
    );
    assert!(
        contains(&report, used_page),
        "VMM-written used-ring page {used_page:#x} missing: {report}"
    );
    let pages = report["pages"].as_u64().unwrap();
    assert!(
        pages < (64 << 20) / 4096 / 2,
        "everything reported dirty ({pages} pages): the record does not clear"
    );

    // Paused: nothing runs, so nothing new is dirty.
    let quiet = api(&sock, json!({ "type": "dirty_pages" })).clone();
    assert_eq!(quiet["pages"], 0, "pages dirtied while paused: {quiet}");
    api(&sock, json!({ "type": "power_off" }));
    assert!(child.wait().unwrap().success());
}
