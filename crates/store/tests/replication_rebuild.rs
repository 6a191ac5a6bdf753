//! A lost copy rebuilt on another store while the writer goes on (issue #8, store side):
//! the running primary is told, in a newer generation, of a new copy to catch up
//! (`rebuilding`: compared over the whole volume, whatever was recorded for its node
//! before) and that the lost one is no longer a copy (not in `out_of_sync`): it adds the
//! one and drops the other without stopping, so no request of a client writing all along
//! fails. The new copy catches up, rejoins, and equals the others; the dropped copy's
//! record is gone.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaState, ReplicationRole, VolumeReplication};

mod support;
use support::*;

const SIZE: u64 = 32 * MIB;

fn status(n: &Node) -> VolumeReplication {
    match n.admin(AdminOp::ReplicationStatus {}).unwrap() {
        AdminReply::Replication(all) => all
            .into_iter()
            .find(|v| v.volume == "v")
            .unwrap_or_else(|| panic!("{} reports nothing about v", n.id)),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn set_role(n: &Node, generation: u64, role: serde_json::Value) {
    let role: ReplicationRole = serde_json::from_value(role).unwrap();
    n.admin(AdminOp::SetReplication {
        volume: "v".into(),
        generation,
        role,
    })
    .unwrap_or_else(|e| panic!("{}: set_replication {generation}: {e}", n.id));
}

fn peers(list: &[&Node]) -> serde_json::Value {
    json!(list
        .iter()
        .map(|n| json!({"node": n.id, "addr": n.repl.to_string()}))
        .collect::<Vec<_>>())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn copy_hash(root: &std::path::Path, n: &Node) -> blake3::Hash {
    let out = root.join(format!("{}-copy.img", n.id));
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(n.uri("v")).arg(&out));
    let copy = std::fs::read(&out).unwrap();
    assert_eq!(copy.len() as u64, SIZE);
    blake3::hash(&copy)
}

#[test]
fn a_new_copy_is_built_and_a_lost_one_dropped_while_every_write_completes() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-rebuild-test").unwrap();
    let mut nodes: Vec<Node> = ["node1", "node2", "node3", "node4"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    for n in &nodes[..3] {
        n.create("v", SIZE);
    }
    nodes[1].replica_of("v", 2);
    nodes[2].replica_of("v", 2);
    let timeout = json!(1500);
    set_role(
        &nodes[0],
        2,
        json!({"type": "primary", "replicas": peers(&[&nodes[1], &nodes[2]]), "timeout_ms": timeout}),
    );
    let base = pattern("base", (8 * MIB) as usize);
    let mut c = nodes[0].nbd("v");
    for (i, chunk) in base.chunks(MIB as usize).enumerate() {
        c.write(i as u64 * MIB, chunk, false).unwrap();
    }
    c.flush().unwrap();

    // node3 is lost; the cluster takes it out of the in-sync set: what it misses is
    // recorded (it is listed out of sync).
    nodes[2].kill();
    set_role(
        &nodes[0],
        3,
        json!({"type": "primary", "replicas": peers(&[&nodes[1]]), "timeout_ms": timeout,
               "out_of_sync": peers(&[&nodes[2]])}),
    );
    c.write(9 * MIB, &pattern("away", MIB as usize), true)
        .unwrap();
    let missed_dir = nodes[0].dir.join("replication");
    assert!(missed_dir.join("v.node3.missed").exists());
    // An old record for node4 (as if it held a copy of `v` once): a new copy must not be
    // caught up from it alone.
    std::fs::write(missed_dir.join("v.node4.missed"), "0 4096\n").unwrap();

    // A client writes without pause from here to the end; every request must complete.
    let (stop, written, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let writer = {
        let (stop, written, failed) = (stop.clone(), written.clone(), failed.clone());
        let mut c = nodes[0].nbd("v");
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let data = pattern(&format!("w{i}"), 64 * 1024);
                let at = 12 * MIB + (i % 64) * 64 * 1024;
                let r = c.write(at, &data, i % 8 == 0).and_then(|()| {
                    if i % 16 == 0 {
                        c.flush()
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = r {
                    eprintln!("write {i} failed: {e}");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                written.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    wait_until("the writer is under way", || {
        written.load(Ordering::SeqCst) > 10
    });

    // The rebuild: node4 gets an empty copy, to be caught up by the running primary in
    // generation 4 (the primary first); node3 is no longer a copy.
    nodes[3].create("v", SIZE);
    let before = written.load(Ordering::SeqCst);
    set_role(
        &nodes[0],
        4,
        json!({"type": "primary", "replicas": peers(&[&nodes[1]]), "timeout_ms": timeout,
               "catching_up": peers(&[&nodes[3]]), "rebuilding": ["node4"],
               "out_of_sync": []}),
    );
    set_role(
        &nodes[3],
        4,
        json!({"type": "replica", "catching_up": true}),
    );
    // Caught up: what is left (the writer never pauses) goes in the rejoin's last pass.
    wait_until("node4 is caught up", || {
        status(&nodes[0])
            .replicas
            .iter()
            .any(|r| r.node == "node4" && r.state == ReplicaState::CaughtUp {})
    });
    let s = status(&nodes[0]);
    assert_eq!(s.generation, 4, "{s:?}");
    assert!(
        s.replicas.iter().all(|r| r.node != "node3"),
        "the dropped copy is still listed: {s:?}"
    );
    assert!(
        !missed_dir.join("v.node3.missed").exists(),
        "the dropped copy's record is left"
    );
    let sent = s
        .replicas
        .iter()
        .find(|r| r.node == "node4")
        .unwrap()
        .catch_up_sent_bytes;
    assert!(
        sent >= 8 * MIB,
        "only {sent} bytes sent to the new copy: its old record was used"
    );

    // Rejoin in generation 5: primary first, then the new copy's store.
    set_role(
        &nodes[0],
        5,
        json!({"type": "primary", "replicas": peers(&[&nodes[1], &nodes[3]]),
               "timeout_ms": timeout, "out_of_sync": []}),
    );
    set_role(&nodes[3], 5, json!({"type": "replica"}));
    assert!(!status(&nodes[3]).must_catch_up);
    let more = written.load(Ordering::SeqCst);
    wait_until("the writer went on after the rejoin", || {
        written.load(Ordering::SeqCst) > more + 10
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let total = written.load(Ordering::SeqCst);
    eprintln!(
        "{total} writes of 64 KiB, {} of them during the rebuild",
        more - before
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "writes failed");
    assert!(more > before, "no write during the rebuild");
    c.flush().unwrap();
    let s = status(&nodes[0]);
    assert!(
        s.replicas.len() == 2
            && s.replicas
                .iter()
                .all(|r| r.state == ReplicaState::InSync {}),
        "{s:?}"
    );
    let h: Vec<_> = [0, 1, 3]
        .iter()
        .map(|i| copy_hash(root.path(), &nodes[*i]))
        .collect();
    if h[0] != h[2] {
        // Which of the writer's slots differ, and whose write each copy holds there.
        let a = std::fs::read(root.path().join("node1-copy.img")).unwrap();
        let b = std::fs::read(root.path().join("node4-copy.img")).unwrap();
        for slot in 0..64u64 {
            let at = (12 * MIB + slot * 65536) as usize;
            let who = |img: &[u8]| {
                (0..total).find(|i| {
                    i % 64 == slot && img[at..at + 65536] == pattern(&format!("w{i}"), 65536)[..]
                })
            };
            if who(&a) != who(&b) {
                eprintln!(
                    "slot {slot}: the primary holds write {:?}, node4 {:?}",
                    who(&a),
                    who(&b)
                );
            }
        }
    }
    assert_eq!(h[0], h[1], "node2 differs from the primary");
    assert_eq!(h[0], h[2], "the rebuilt copy differs from the primary");
    drop(nodes.remove(2));
}
