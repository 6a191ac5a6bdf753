//! Snapshots and clones of a replicated volume taken while a client writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::output;

use super::helpers::{call, payload, read_hash, unix_uri, wait_task, wait_volume, write, MIB};

/// Snapshot `a` (three copies, primary node1) while nbdcopy keeps writing its first
/// 8 MiB (the later checks expect zeros past them): every copy's snapshot is the same; a
/// clone of it has three copies, each equal to it; the clone and then the snapshot are
/// deleted on every copy.
pub(crate) fn snapshot_and_clone_under_writes(ca: &str, t: &str, dir: &Path, tmp: &Path) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let payloads = [payload(tmp, "a0", 8 * MIB), payload(tmp, "a00", 8 * MIB)];
    let (stop, rounds) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let writer = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let files: Vec<PathBuf> = payloads.iter().map(|(f, _)| f.clone()).collect();
        let uri = unix_uri(dir, 1, "a");
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = rounds.load(Ordering::SeqCst);
                let out = output(Command::new("nbdcopy").arg(&files[n % 2]).arg(&uri));
                assert!(out.status.success(), "nbdcopy under the snapshot");
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    while rounds.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (c, task) = call(
        ca,
        2,
        "POST",
        "volumes/a/snapshots",
        Some(t),
        Some(&json!({"name": "s"})),
    );
    assert_eq!(c, 202, "{task}");
    let done = wait_task(ca, 2, t, &task);
    assert_eq!(done["state"], "succeeded", "{done}");
    let after = rounds.load(Ordering::SeqCst);
    while rounds.load(Ordering::SeqCst) < after + 1 {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let last = payloads[(rounds.load(Ordering::SeqCst) - 1) % 2].1;
    eprintln!(
        "{} rounds of 8 MiB written around the snapshot",
        rounds.load(Ordering::SeqCst)
    );
    let snap = read_hash(dir, 1, "a@s", tmp);
    for i in 2..=3 {
        assert_eq!(read_hash(dir, i, "a@s", tmp), snap, "a@s on node{i}");
    }
    for i in 1..=3 {
        assert_eq!(
            read_hash(dir, i, "a", tmp),
            last,
            "a on node{i} after the writes"
        );
    }
    let (c, task) = call(
        ca,
        2,
        "POST",
        "volumes/a/clone",
        Some(t),
        Some(&json!({"name": "a-clone", "snapshot": "s"})),
    );
    assert_eq!(c, 202, "{task}");
    let done = wait_task(ca, 2, t, &task);
    assert_eq!(done["state"], "succeeded", "{done}");
    let v = wait_volume(ca, 2, t, "a-clone", 30, |v| v["state"] == "ready");
    assert_eq!(v["replication"]["replicas"], 3, "{v}");
    assert!(
        v["replication"]["copies"]
            .as_array()
            .is_some_and(|c| c.len() == 3 && c.iter().all(|c| c["state"] == "in_sync")),
        "{v}"
    );
    for i in 1..=3 {
        assert_eq!(
            read_hash(dir, i, "a-clone", tmp),
            snap,
            "a-clone on node{i}"
        );
    }
    // Replicated from birth: a write through its primary reaches every copy.
    // As long as the rounds above: the clone then holds this payload and zeros only.
    let (fc, hc) = payload(tmp, "c0", 8 * MIB);
    assert!(write(dir, 1, "a-clone", &fc));
    for i in 1..=3 {
        assert_eq!(
            read_hash(dir, i, "a-clone", tmp),
            hc,
            "a-clone written, node{i}"
        );
    }
    let (c, task) = call(ca, 2, "DELETE", "volumes/a-clone", Some(t), None);
    assert_eq!(c, 202, "{task}");
    assert_eq!(wait_task(ca, 2, t, &task)["state"], "succeeded");
    let (c, task) = call(ca, 2, "DELETE", "volumes/a/snapshots/s", Some(t), None);
    assert_eq!(c, 202, "{task}");
    assert_eq!(wait_task(ca, 2, t, &task)["state"], "succeeded");
    // Every copy's snapshot goes (each node runs its own task).
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 1..=3 {
        while output(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(unix_uri(dir, i, "a@s")),
        )
        .status
        .success()
        {
            assert!(Instant::now() < deadline, "a@s still on node{i}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
