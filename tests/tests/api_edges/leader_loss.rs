//! The leader killed under load: creates in flight are answered with an outcome and
//! retried safely; a task for the dead node fails in bounded time naming it.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::devcluster::pids_where;

use super::call;
use super::idempotency::create_volume;

/// The devcluster node (1-3) that leads, by its name `nodeN`.
pub fn leader(ca: &str, node: u8, token: &str) -> u8 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = call(ca, node, "GET", "cluster", Some(token), None, &[]);
        if let Some(n) = a.json()["leader_name"]
            .as_str()
            .and_then(|n| n.strip_prefix("node"))
        {
            return n.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no leader: {}", a.body);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pid of node `i`'s tesserad under `dir` (its command line names its seed).
fn tesserad_pid(dir: &std::path::Path, i: u8) -> i32 {
    let seed = dir.join(format!("node{i}/seed.toml"));
    let seed = seed.to_string_lossy();
    let pids = pids_where(|cmd| cmd.contains("tesserad") && cmd.contains(seed.as_ref()));
    *pids
        .first()
        .unwrap_or_else(|| panic!("no tesserad for node {i}"))
}

/// Creates in flight on follower `f` while the leader `l` is killed: each is 202 or 503
/// with an outcome, and a 503 comes only after waiting for a new leader (a create asked
/// during the election waits it out instead of being refused at once); a retry with the
/// same key is then 202, never 409; every volume exists.
pub fn creates_survive_the_leader_dying(
    dir: &std::path::Path,
    ca: &str,
    f: u8,
    l: u8,
    token: &str,
) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answers = std::thread::scope(|s| {
        let worker = {
            let done = done.clone();
            s.spawn(move || {
                (0..30)
                    .map(|i| {
                        let body = json!({"name": format!("kill-{i}"), "size_bytes": 1048576, "replicas": 1});
                        let t = Instant::now();
                        let a = create_volume(ca, f, token, &body, Some(&format!("kill-{i}")));
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        (i, a, t.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        };
        while done.load(std::sync::atomic::Ordering::SeqCst) < 5 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = nix::unistd::Pid::from_raw(tesserad_pid(dir, l));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        worker.join().unwrap()
    });
    let mut retried = 0;
    let slowest = answers.iter().map(|(_, _, took)| *took).max();
    for (i, a, took) in answers {
        if a.code == 202 {
            continue;
        }
        assert_eq!(a.code, 503, "kill-{i}: {}", a.body);
        // tessera_state::LEADER_WAIT (3 s) for the barrier and a write not yet sent.
        assert!(
            took >= Duration::from_millis(2500),
            "kill-{i} was refused after {took:?}, without waiting for a new leader: {}",
            a.body
        );
        let outcome = a.json()["outcome"].as_str().unwrap_or_default().to_string();
        assert!(
            ["unknown", "not_applied", "committed"].contains(&outcome.as_str()),
            "kill-{i}: {}",
            a.body
        );
        retried += 1;
        let body = json!({"name": format!("kill-{i}"), "size_bytes": 1048576, "replicas": 1});
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = create_volume(ca, f, token, &body, Some(&format!("kill-{i}")));
            if r.code == 202 {
                break;
            }
            assert_eq!(r.code, 503, "retry of kill-{i} ({outcome}): {}", r.body);
            assert!(Instant::now() < deadline, "kill-{i}: {}", r.body);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    eprintln!(
        "creates while the leader died: {retried} of 30 answered 503 and retried; the \
         slowest answer took {slowest:?}"
    );
    for i in 0..30 {
        let a = call(
            ca,
            f,
            "GET",
            &format!("volumes/kill-{i}"),
            Some(token),
            None,
            &[],
        );
        assert_eq!(a.code, 200, "kill-{i}: {}", a.body);
    }
}

/// A volume asked of the down node `l`: its task fails within a bounded time naming the
/// node, and the name is free again.
pub fn a_task_for_a_down_node_fails_naming_it(ca: &str, f: u8, l: u8, token: &str) {
    let nodes = call(ca, f, "GET", "nodes", Some(token), None, &[]).json();
    let id = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == format!("node{l}"))
        .unwrap_or_else(|| panic!("no node{l}: {nodes}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = json!({"name": "on-a-down-node", "size_bytes": 1048576, "node": id, "replicas": 1});
    let a = create_volume(ca, f, token, &body, None);
    assert_eq!(a.code, 202, "{}", a.body);
    let task = a.json()["id"].as_str().unwrap().to_string();
    let start = Instant::now();
    let t = loop {
        let t = call(
            ca,
            f,
            "GET",
            &format!("tasks/{task}"),
            Some(token),
            None,
            &[],
        )
        .json();
        if t["state"] != "queued" && t["state"] != "running" {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "a task for down node{l} still waits after {:?}: {t}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(t["state"], "failed", "{t}");
    let err = t["error"].as_str().unwrap_or_default();
    assert!(err.contains(&format!("node{l} is down")), "{t}");
    let v = call(
        ca,
        f,
        "GET",
        "volumes/on-a-down-node",
        Some(token),
        None,
        &[],
    );
    assert_eq!(v.code, 404, "the failed create left {}", v.body);
}
