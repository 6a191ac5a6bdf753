//! VM tests' helpers on a cluster of [`ClusterNode`]s: the cluster itself, the VMs' state
//! through the API, their VMMs' pids and consoles in the nodes' runtime directories, the
//! CLI, the test guest as a boot image, and a reaper that leaves no VMM behind a failed
//! test.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cluster::{admin_session, api, curl, wait_for, ClusterNode};
use crate::{bin, counts, kvm_or_skip, Lan};

/// The freestanding test guest (tests/guest).
pub const GUEST: &str = env!("TESSERA_TEST_GUEST");

/// A cluster for a VM test: nodes in network namespaces, each with its `tessera-store`,
/// and an administrator's session. Dropped, it kills the VMMs first, then the nodes, then
/// removes their directory and the namespaces (the fields' order).
pub struct VmCluster {
    _reaper: VmmReaper,
    pub nodes: Vec<ClusterNode>,
    pub dir: tempfile::TempDir,
    pub lan: Lan,
    /// The administrator's session token.
    pub token: String,
}

impl VmCluster {
    /// Starts `n` nodes for test `test`, the administrator's password changed to
    /// `password`; `None` (after the SKIP line) when this machine cannot run VMs or
    /// network namespaces.
    pub fn start(test: &str, n: usize, password: &str) -> Option<VmCluster> {
        if !kvm_or_skip(test) {
            return None;
        }
        let lan = Lan::new(test, n)?;
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<ClusterNode> = (0..n)
            .map(|i| ClusterNode::start(&lan, i, dir.path(), n, true))
            .collect();
        let reaper = VmmReaper::of(&nodes);
        let token = admin_session(&lan, &nodes, 0, password);
        Some(VmCluster {
            _reaper: reaper,
            nodes,
            dir,
            lan,
            token,
        })
    }
}

/// Kills every VMM the nodes' runtime directories name, so none outlives a failed test
/// (VMMs outlive `tesserad` by design).
pub struct VmmReaper(pub Vec<PathBuf>);

impl VmmReaper {
    /// A reaper of the VMMs of `nodes`.
    pub fn of(nodes: &[ClusterNode]) -> VmmReaper {
        VmmReaper(nodes.iter().map(|n| n.dir.clone()).collect())
    }
}

impl Drop for VmmReaper {
    fn drop(&mut self) {
        for d in &self.0 {
            let Ok(rd) = std::fs::read_dir(d.join("data/vms")) else {
                continue;
            };
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path().join("run.json")).unwrap_or_default();
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if let Some(pid) = v["pid"].as_i64() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// The pid of VM `name`'s VMM on the node in `dir`, if it runs there.
pub fn vm_pid(dir: &Path, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(format!("data/vms/{name}/run.json"))).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["pid"].as_u64().filter(|p| alive(*p))
}

/// The disk writer key `tesserad` gave VMM `pid` (`TESSERA_DISK_WRITER_KEY` in its
/// environment; as root: `/proc/PID/environ` is its owner's only).
pub fn writer_key_of(pid: u64) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"TESSERA_DISK_WRITER_KEY="))
        .map(|k| String::from_utf8(k.to_vec()).unwrap())
        .unwrap_or_else(|| panic!("VMM {pid} has no writer key in its environment"))
}

/// `GET /vms/{name}` through node `i` (must be 200).
pub fn vm(lan: &Lan, i: usize, token: &str, name: &str) -> Value {
    let (code, v) = api(lan, i, "GET", &format!("vms/{name}"), Some(token), None);
    assert_eq!(code, 200, "{v}");
    v
}

/// Waits (60 s) until VM `name`'s `actual_state` is `state`; returns the VM.
pub fn wait_state(lan: &Lan, i: usize, token: &str, name: &str, state: &str) -> Value {
    wait_for(&format!("VM {name} to be {state}"), 60, || {
        let v = vm(lan, i, token, name);
        (v["actual_state"] == state).then_some(v)
    })
}

/// `POST /vms/{name}/{action}` through node `i`.
pub fn act(lan: &Lan, i: usize, token: &str, name: &str, action: &str) -> (u16, Value) {
    api(
        lan,
        i,
        "POST",
        &format!("vms/{name}/{action}"),
        Some(token),
        None,
    )
}

/// VM `name`'s console output on the node in `dir` (its VMM's `console.log`).
pub fn console(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("data/vms/{name}/console.log"))).unwrap_or_default()
}

/// The last `count N` the guest printed on the node in `dir`.
pub fn last_count(dir: &Path, name: &str) -> Option<u64> {
    counts(&console(dir, name)).last().copied()
}

/// Waits until the guest's counter passes what it showed when called.
pub fn counting(dir: &Path, name: &str) {
    let start = last_count(dir, name);
    wait_for(&format!("VM {name}'s counter to advance"), 60, || {
        let now = last_count(dir, name);
        (now.is_some() && now > start).then_some(())
    });
}

/// The nodes' ids in the order of their names (node0, node1, ...), once every node has
/// published its memory (placement needs it).
pub fn node_ids(lan: &Lan, token: &str, n: usize) -> Vec<String> {
    wait_for("every node's metrics", 40, || {
        let (code, v) = api(lan, 0, "GET", "nodes", Some(token), None);
        let list = v.as_array().filter(|_| code == 200)?;
        let ready = list.len() == n
            && list
                .iter()
                .all(|n| n["metrics"]["memory_total"].as_u64().is_some_and(|m| m > 0));
        ready.then(|| {
            let mut by_name: Vec<(String, String)> = list
                .iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or_default().to_string(),
                        n["id"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            by_name.sort();
            by_name.into_iter().map(|(_, id)| id).collect()
        })
    })
}

/// The `tessera` CLI inside node `i`'s namespace, talking to node `i`'s API, with its
/// credentials under `home`: (success, stdout, stderr).
pub fn cli(lan: &Lan, i: usize, home: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    crate::run_with_stdin(cli_command(lan, i, home, args), stdin)
}

/// The command [`cli`] runs, to spawn it another way.
pub fn cli_command(lan: &Lan, i: usize, home: &Path, args: &[&str]) -> std::process::Command {
    let mut c = lan.command(i, &bin("tessera"));
    c.env("HOME", home)
        .arg("--api")
        .arg(format!("https://{}:8006", Lan::addr(i)))
        .arg("--ca-file")
        .arg(lan.ca_file().expect("the cluster CA"))
        .args(args);
    c
}

/// Uploads the test guest as boot image `name` through node 0 and waits (60 s) until
/// every one of the `n` nodes holds a verified copy.
pub fn upload_guest(lan: &Lan, token: &str, name: &str, n: usize) {
    let bytes = std::fs::metadata(GUEST).expect("the test guest").len();
    let bearer = format!("Authorization: Bearer {token}");
    let body = format!("@{GUEST}");
    let (code, text) = curl(
        lan,
        0,
        &format!("images?name={name}&kernel_bytes={bytes}"),
        &[
            "-X",
            "POST",
            "-H",
            &bearer,
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            &body,
        ],
    );
    assert!((200..300).contains(&code), "image upload: {code} {text}");
    wait_for(&format!("a copy of image {name} on every node"), 60, || {
        let (_, v) = api(lan, 0, "GET", &format!("images/{name}"), Some(token), None);
        (v["copies"].as_array().map(Vec::len) == Some(n)).then_some(())
    });
}
