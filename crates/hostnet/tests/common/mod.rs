//! What the netns tests share: a fresh network namespace per test, and reading the
//! kernel's view through iproute2's JSON output (`ip -j`, `bridge -j`).
// Helpers outside `#[test]`s unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]
// Each test file uses some of these.
#![allow(dead_code)]

use std::process::Command;

use serde_json::Value;
use tessera_hostnet::{reconcile, NetworkDef, Report};

// The workspace's one skip policy and allow-list (tests/skip-allowlist), shared with
// tessera-tests.
#[path = "../../../../tests/src/skip_policy.rs"]
mod skip_policy;

/// Reports a skipped test on the real standard error (the harness captures `eprintln!`);
/// in CI (`CI=true`) panics unless `tests/skip-allowlist` expects this skip.
pub fn skip(test: &str, reason: &str) {
    skip_policy::report(test, reason);
}

/// Runs `body` on a thread in a fresh network namespace with a tokio runtime of its own,
/// or prints SKIP when this process cannot make one.
pub fn in_fresh_netns(test: &str, body: impl FnOnce(&tokio::runtime::Runtime) + Send) {
    if !nix::unistd::geteuid().is_root() {
        skip(test, "needs root to create a network namespace");
        return;
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            // Only this thread moves; the runtime below is current-thread, so its netlink
            // socket and every `ip` it spawns live in the new namespace too.
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                skip(test, &format!("cannot unshare a network namespace: {e}"));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            body(&rt);
        })
        .join()
        .unwrap();
    });
}

pub fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}: {st}");
}

/// `ip -j -d link show`: every interface with its details.
pub fn ip_links() -> Vec<Value> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show"])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

pub fn ip_link(name: &str) -> Option<Value> {
    ip_links().into_iter().find(|l| l["ifname"] == name)
}

pub fn is_up(l: &Value) -> bool {
    l["flags"].as_array().unwrap().iter().any(|f| f == "UP")
}

/// `bridge -j link`: the bridge ports and their bridge.
pub fn bridge_master_of(port: &str) -> Option<String> {
    let out = Command::new("bridge")
        .args(["-j", "link"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["ifname"] == port)
        .and_then(|p| p["master"].as_str().map(str::to_string))
}

/// What the tests compare between two passes: names, kinds, flags, masters, aliases.
pub fn snapshot() -> Vec<String> {
    let mut v: Vec<String> = ip_links()
        .iter()
        .map(|l| {
            format!(
                "{} {} {} {} {}",
                l["ifname"], l["linkinfo"]["info_kind"], l["flags"], l["master"], l["ifalias"]
            )
        })
        .collect();
    v.sort();
    v
}

pub fn net(name: &str, vlan: Option<u16>, uplink: Option<&str>) -> NetworkDef {
    NetworkDef {
        name: name.into(),
        vlan,
        uplink: uplink.map(str::to_string),
    }
}

pub fn run(rt: &tokio::runtime::Runtime, defs: &[NetworkDef]) -> Report {
    rt.block_on(reconcile(defs)).unwrap()
}

/// A veth pair standing in for the node's physical uplink.
pub fn uplink(name: &str) {
    sh(&[
        "ip",
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{name}p"),
    ]);
}
