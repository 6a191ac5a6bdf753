//! Secrets at rest on the README's local cluster: a local user who is not root reads
//! nothing the nodes keep — not the replicated state (the CA and password hashes), the
//! seeds and join secret, the keys, the first administrator's password, the disks' WAL
//! and layers, nor the logs — and the founding node's CA key file is gone once the CA is
//! in the replicated state, where its key is sealed (no private key in the clear in any
//! state.redb; after a restart every node opens it to issue NBD credentials). A cluster
//! directory left readable (by an older version, or by hand) is private again after a
//! restart.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_tests::cluster::wait_for;
use tessera_tests::devcluster::DevCluster;
use tessera_tests::{bin, require, run, skip};

const TEST: &str = "a_local_user_reads_no_secret_of_the_local_cluster";

/// Every path at or under `root` (symlinks not followed) whose mode lets group or others
/// in at all, with that mode. Nothing the cluster keeps is meant to be public: the CA
/// certificate goes to clients through the launcher's report and the API, not through
/// others reading the node's directory.
fn open_to_others(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            continue;
        }
        let mode = m.permissions().mode();
        if mode & 0o077 != 0 {
            found.push(format!("{:o} {}", mode & 0o7777, p.display()));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    found.sort();
    found
}

/// Every regular file at or under `root` whose name ends with `suffix`.
fn files_ending(root: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else if m.is_file() && p.to_string_lossy().ends_with(suffix) {
            found.push(p);
        }
    }
    found.sort();
    found
}

/// What user `nobody` gets trying to read `path`: None when refused with "Permission
/// denied", else what happened.
fn nobody_reads(path: &Path) -> Option<String> {
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"])
        .arg(path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && err.contains("Permission denied") {
        return None;
    }
    Some(format!(
        "{}: exit {}, {} bytes read, stderr {err:?}",
        path.display(),
        out.status,
        out.stdout.len()
    ))
}

/// Widens every mode under `root` the way an older Tessera (umask 022) left them.
fn widen(root: &Path) {
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else if m.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// Puts a disk's contents into node 1's store: a volume with a pattern written through
/// NBD, so its WAL holds guest data.
fn write_a_disk(dir: &Path) {
    let store = dir.join("node1/store");
    run(Command::new(bin("tessera-store"))
        .arg("--admin-socket")
        .arg(store.join("admin.sock"))
        .args(["volume", "create", "secret-disk", "--size", "4M"]));
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 64k",
        &format!(
            "nbd+unix:///secret-disk?socket={}",
            store.join("nbd.sock").display()
        ),
    ]));
}

#[test]
fn a_local_user_reads_no_secret_of_the_local_cluster() {
    require("qemu-io");
    let root = tempfile::tempdir().unwrap();
    // The test's own directory is open to everyone, as /var/tmp (the launcher's default)
    // is: whatever keeps others out must be what Tessera creates.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = root.path().join("cluster");
    let launcher = DevCluster::start(&dir);
    write_a_disk(&dir);
    // The founding node (whichever formed the cluster) has the password file.
    let (founder, password) = wait_for("the initial admin password file", 40, || {
        (1..=3).find_map(|i| {
            let f = dir.join(format!("node{i}/data"));
            std::fs::read_to_string(f.join("initial-admin-password"))
                .ok()
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .map(|p| (f, p))
        })
    });
    let password_file = founder.join("initial-admin-password");

    let mut failures = Vec::new();
    // docs/cluster.md: the founding node keeps the CA key in a file only until the CA
    // record is committed in the replicated state (the write is asynchronous, hence the
    // bounded wait).
    let ca_key = founder.join("tls/ca.key");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ca_key.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if ca_key.exists() {
        failures.push(format!(
            "{} is still there 30 s after the cluster formed",
            ca_key.display()
        ));
    }
    // The CA record is in every node's state with its key sealed: no private key in the
    // clear in any state.redb (the record itself is there, as the positive control).
    let mut sealed_seen = false;
    for i in 1..=3 {
        let redb = dir.join(format!("node{i}/data/state/state.redb"));
        let bytes = std::fs::read(&redb).unwrap();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        if has(b"PRIVATE KEY") {
            failures.push(format!(
                "{} holds a private key in the clear",
                redb.display()
            ));
        }
        sealed_seen |= has(b"sealed_key");
    }
    if !sealed_seen {
        failures.push("no state.redb holds the sealed CA record".into());
    }
    for p in open_to_others(&dir) {
        failures.push(format!("open to group or others: {p}"));
    }
    let logs = files_ending(&dir, ".log");
    assert!(
        logs.len() >= 6,
        "a tesserad.log and a store.log per node: {logs:?}"
    );
    for log in &logs {
        if std::fs::read_to_string(log).unwrap().contains(&password) {
            failures.push(format!(
                "{} holds the first administrator's password",
                log.display()
            ));
        }
    }
    if nix::unistd::geteuid().is_root() {
        require("setpriv");
        let wal = files_ending(&dir.join("node1/store/wal"), ".wal");
        let layers = files_ending(&dir.join("node1/store/layers"), ".data");
        assert!(!wal.is_empty() && !layers.is_empty(), "{wal:?} {layers:?}");
        let secrets = [
            founder.join("state/state.redb"),
            dir.join("node1/seed.toml"),
            dir.join("join-secret"),
            founder.join("tls/node.key"),
            founder.join("identity.json"),
            password_file.clone(),
            dir.join("node1/tesserad.log"),
            dir.join("node1/store.log"),
            dir.join("node1/store/catalog.json"),
            wal[0].clone(),
            layers[0].clone(),
        ];
        for f in &secrets {
            assert!(f.is_file(), "{} is missing", f.display());
            if let Some(what) = nobody_reads(f) {
                failures.push(format!("user nobody was not refused: {what}"));
            }
        }
    } else {
        skip(
            TEST,
            "reading as user nobody needs root (the mode checks ran)",
        );
    }
    assert!(
        failures.is_empty(),
        "a local user can read the cluster's secrets:\n{}",
        failures.join("\n")
    );

    // A cluster directory an older version left readable is private again after a restart
    // (the launcher tightens its own files, each daemon its data directory), and the CA key
    // file does not come back.
    launcher.stop();
    widen(&dir);
    assert!(!open_to_others(&dir).is_empty());
    let launcher = DevCluster::start(&dir);
    // The launcher tightened its files before starting the daemons, and each tesserad
    // before serving the status the launcher waits for; a store does it when it starts,
    // which is not what "up" waits for, hence the bounded wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = open_to_others(&dir);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still open to group or others after a restart:\n{}",
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!ca_key.exists(), "tls/ca.key came back after a restart");
    // No node holds the CA key in a file now: each opens the sealed record with its join
    // secret to issue NBD client credentials.
    let ca = launcher.ca_file();
    let token = admin_token(&ca, &password);
    for i in 1..=3 {
        let (code, body) = curl(
            &ca,
            &format!("https://127.0.0.{i}:8006/api/v1/nbd/credentials"),
            Some(&token),
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert!(
            code == 200
                && v["client_key_pem"]
                    .as_str()
                    .is_some_and(|k| k.contains("PRIVATE KEY")),
            "node {i} issued no NBD credentials from the sealed CA: {code} {body}"
        );
    }
    launcher.stop();
}

/// A POST with curl, checking the API's certificate with `ca`; (status, body).
fn curl(ca: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-m",
        "30",
        "--cacert",
        ca,
        "-X",
        "POST",
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data", b]);
    }
    let out = cmd.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Logs in as admin with the first password, changes it, and logs in again: a session
/// that may do more than change its password.
fn admin_token(ca: &str, first: &str) -> String {
    let login = |password: &str| {
        let (code, body) = curl(
            ca,
            "https://127.0.0.1:8006/api/v1/login",
            None,
            Some(&serde_json::json!({ "username": "admin", "password": password }).to_string()),
        );
        assert_eq!(code, 200, "login: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let t = login(first);
    let new = "a sealed CA opens with the secret";
    let (code, body) = curl(
        ca,
        "https://127.0.0.1:8006/api/v1/password",
        Some(&t),
        Some(&serde_json::json!({ "old_password": first, "new_password": new }).to_string()),
    );
    assert_eq!(code, 200, "password change: {body}");
    login(new)
}
