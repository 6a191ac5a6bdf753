//! A node removed from the cluster knows it (issue #15): on the README's local three-node
//! cluster, node 3 is removed through the API while it runs; it notices by itself and its
//! API answers every request at once with 503 naming the removal and telling the operator
//! to wipe it (GET /cluster, GET /nodes, POST /login, any path; the `tessera` CLI prints
//! that). Restarted unwiped, it is the same within a bound, its log grows by a few lines
//! at most, and so again after a second restart. The other two nodes go on without it.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::devcluster::{self, Answer, DevCluster};
use tessera_tests::{bin, require, run_with_stdin};

/// A request to `https://127.0.0.<node>:8006<path>` with curl, 5 s at most.
fn call(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    devcluster::call(ca, node, method, path, token, body, Duration::from_secs(5))
}

fn login(ca: &str, node: u8, password: &str) -> Answer {
    call(
        ca,
        node,
        "POST",
        "/api/v1/login",
        None,
        Some(&json!({"username": "admin", "password": password})),
    )
}

/// Whether `a` is the removed node's answer: 503 at once, naming the removal and the wipe.
fn says_removed(a: &Answer) -> bool {
    a.code == 503 && a.body.contains("removed from the cluster") && a.body.contains("wipe")
}

/// Waits (at most `within`) until node 3 answers as a removed node; returns how long.
fn wait_removed(ca: &str, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let a = call(ca, 3, "GET", "/api/v1/cluster", None, None);
        if says_removed(&a) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "node 3 did not answer as removed within {within:?}: {} {}",
            a.code,
            a.body
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every request node 3 gets is answered at once with 503 and the reason, JSON included.
fn node3_answers_removed(ca: &str, token: &str, password: &str) {
    let answers = [
        (
            "GET /cluster",
            call(ca, 3, "GET", "/api/v1/cluster", Some(token), None),
        ),
        (
            "GET /nodes",
            call(ca, 3, "GET", "/api/v1/nodes", Some(token), None),
        ),
        ("POST /login", login(ca, 3, password)),
        ("GET /healthz", call(ca, 3, "GET", "/healthz", None, None)),
        (
            "POST /volumes",
            call(
                ca,
                3,
                "POST",
                "/api/v1/volumes",
                Some(token),
                Some(&json!({"name": "x", "size_bytes": 1048576})),
            ),
        ),
    ];
    for (what, a) in answers {
        assert!(says_removed(&a), "{what}: {} {}", a.code, a.body);
        assert_eq!(a.json()["removed"], json!(true), "{what}: {}", a.body);
        assert!(a.took < Duration::from_secs(2), "{what} took {:?}", a.took);
    }
}

/// The pid of node `i`'s tesserad under `dir` (its command line names its seed).
fn tesserad_pid(dir: &Path, i: u8) -> Option<i32> {
    let seed = dir.join(format!("node{i}/seed.toml"));
    let seed = seed.to_string_lossy();
    devcluster::pids_where(|cmd| cmd.contains("tesserad") && cmd.contains(seed.as_ref()))
        .into_iter()
        .next()
}

/// Stops node 3's tesserad (SIGKILL: a crash, nothing said on the way out) and starts
/// it again unwiped, appending to its log as the devcluster does.
fn restart_node3(dir: &Path, previous: Option<Child>) -> Child {
    let pid = tesserad_pid(dir, 3).expect("node 3's tesserad runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    if let Some(mut c) = previous {
        c.wait().unwrap();
    } else {
        let t = Instant::now();
        while tesserad_pid(dir, 3).is_some() {
            assert!(t.elapsed() < Duration::from_secs(10), "node 3 did not die");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("node3/tesserad.log"))
        .unwrap();
    Command::new(bin("tesserad"))
        .arg("--seed")
        .arg(dir.join("node3/seed.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn log_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("node3/tesserad.log"))
        .unwrap()
        .lines()
        .count()
}

/// Node 3's log grows by at most a few lines over 10 s (while it is asked things).
fn log_stays_quiet(dir: &Path, ca: &str) {
    let before = log_lines(dir);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let a = call(ca, 3, "GET", "/api/v1/nodes", None, None);
        assert!(says_removed(&a), "{} {}", a.code, a.body);
        std::thread::sleep(Duration::from_millis(500));
    }
    let grown = log_lines(dir) - before;
    assert!(
        grown <= 3,
        "node 3's log grew by {grown} lines in 10 s:\n{}",
        std::fs::read_to_string(dir.join("node3/tesserad.log")).unwrap()
    );
}

#[test]
fn a_removed_node_knows_it_and_says_so() {
    require("curl");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let cluster = DevCluster::start(dir);
    let (first_password, ca) = (cluster.admin_password(), cluster.ca_file());
    let first = login(&ca, 1, &first_password).json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let password = "removed node admin password";
    let a = call(
        &ca,
        1,
        "POST",
        "/api/v1/password",
        Some(&first),
        Some(&json!({"old_password": first_password, "new_password": password})),
    );
    assert_eq!(a.code, 200, "{}", a.body);
    let token = login(&ca, 1, password).json()["token"]
        .as_str()
        .unwrap()
        .to_string();

    // Node 3's id, from the node list.
    let nodes = call(&ca, 1, "GET", "/api/v1/nodes", Some(&token), None).json();
    let id = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n.to_string().contains("127.0.0.3:"))
        .unwrap_or_else(|| panic!("no node at 127.0.0.3: {nodes}"))["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Removed through the API while it runs (retried while a leader change, when node 3
    // led, makes the cluster answer "try again").
    let t = Instant::now();
    loop {
        let a = call(
            &ca,
            1,
            "DELETE",
            &format!("/api/v1/nodes/{id}?force=true"),
            Some(&token),
            None,
        );
        if a.code == 200 {
            break;
        }
        assert!(
            [409, 503, 0].contains(&a.code) && t.elapsed() < Duration::from_secs(30),
            "removing node 3: {} {}",
            a.code,
            a.body
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // It notices by itself, without a restart.
    wait_removed(&ca, Duration::from_secs(30));
    node3_answers_removed(&ca, &token, password);
    assert!(dir.join("node3/data/removed.json").exists());

    // Restarted unwiped: the same within a bound, and quiet.
    let child = restart_node3(dir, None);
    let took = wait_removed(&ca, Duration::from_secs(20));
    eprintln!("node 3 answered as removed {took:?} after its restart");
    node3_answers_removed(&ca, &token, password);
    log_stays_quiet(dir, &ca);

    // The CLI prints the reason.
    let home = tempfile::tempdir().unwrap();
    let mut cli = Command::new(bin("tessera"));
    cli.env("HOME", home.path()).args([
        "--api",
        "https://127.0.0.3:8006",
        "--ca-file",
        &ca,
        "login",
    ]);
    let (ok, out, err) = run_with_stdin(cli, &format!("{password}\n"));
    assert!(!ok, "login on the removed node succeeded: {out}");
    assert!(
        err.contains("HTTP 503")
            && err.contains("removed from the cluster")
            && err.contains("wipe"),
        "the CLI did not say why: {err}"
    );

    // A second restart: still so.
    let mut child = restart_node3(dir, Some(child));
    wait_removed(&ca, Duration::from_secs(20));
    node3_answers_removed(&ca, &token, password);

    // The others go on without it.
    let nodes = call(&ca, 1, "GET", "/api/v1/nodes", Some(&token), None).json();
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    assert!(!nodes.to_string().contains(&id), "{nodes}");

    child.kill().unwrap();
    child.wait().unwrap();
    cluster.stop();
}
