//! Snapshots of a replicated volume (issue #8): taken at one point of the write stream
//! on every copy. Three `tessera-store` processes as in `replication.rs`, one start for
//! every check: snapshots taken through the primary while two clients write without
//! pause are blake3-identical on every copy; a replica's store and a taken name refuse;
//! a replica killed during a snapshot is a failed replica: the snapshot is not
//! acknowledged, completes on the copies in sync once the replica is out of the in-sync
//! set, and later snapshots are refused naming it until it is back.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaPeer, ReplicationRole};

mod support;
use support::*;

const SIZE: u64 = 16 * MIB;

fn snapshot(n: &Node, name: &str) -> Result<AdminReply, String> {
    n.admin(AdminOp::CreateSnapshot {
        volume: "v".into(),
        snapshot: name.into(),
    })
}

/// The blake3 of export `export` read through `n`'s own NBD server.
fn hash(root: &std::path::Path, n: &Node, export: &str) -> blake3::Hash {
    let out = root.join(format!("{}-{export}.img", n.id));
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(n.uri(export)).arg(&out));
    let copy = std::fs::read(&out).unwrap();
    assert_eq!(copy.len() as u64, SIZE);
    blake3::hash(&copy)
}

fn peer(n: &Node) -> ReplicaPeer {
    ReplicaPeer {
        node: n.id.clone(),
        addr: n.repl.to_string(),
    }
}

/// Two clients writing to the primary without pause (4-64 KiB, unflushed, all over the
/// volume) until `stop`; counts the writes acknowledged.
fn storm(
    n: &Node,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..2u64)
        .map(|w| {
            let mut c = n.nbd("v");
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let seed = format!("w{w}-{i}");
                    let len = 4096 * (1 + (i % 16)) as usize;
                    let offset = (blake3::hash(seed.as_bytes()).as_bytes()[0] as u64 * 61
                        + i * 4096)
                        % (SIZE - 64 * 1024);
                    let offset = offset / 4096 * 4096;
                    c.write(offset, &pattern(&seed, len), false).unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect()
}

fn wait_writes(done: &AtomicU64, more: u64) {
    let target = done.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(15);
    while done.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "the writers stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn snapshots_under_a_write_storm_are_identical_on_every_copy() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-snapshot-test").unwrap();
    let mut nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    for n in &nodes {
        n.create("v", SIZE);
    }
    nodes[1].replica_of("v", 2);
    nodes[2].replica_of("v", 2);
    nodes[0].primary_of("v", 2, &[&nodes[1], &nodes[2]]);

    // Two snapshots taken while two clients keep writing to the primary.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writers = storm(&nodes[0], &stop, &done);
    wait_writes(&done, 200);
    snapshot(&nodes[0], "s1").unwrap();
    wait_writes(&done, 200);
    snapshot(&nodes[0], "s2").unwrap();
    wait_writes(&done, 100);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let writes = done.load(Ordering::Relaxed);
    for s in ["v@s1", "v@s2"] {
        let hashes: Vec<_> = nodes.iter().map(|n| hash(root.path(), n, s)).collect();
        assert_eq!(
            hashes[0], hashes[1],
            "{s}: node2's differs from the primary's"
        );
        assert_eq!(
            hashes[0], hashes[2],
            "{s}: node3's differs from the primary's"
        );
    }
    assert_ne!(
        hash(root.path(), &nodes[0], "v@s1"),
        hash(root.path(), &nodes[0], "v@s2"),
        "no write between the snapshots ({writes} writes in all)"
    );
    let volumes: Vec<_> = nodes.iter().map(|n| hash(root.path(), n, "v")).collect();
    assert!(
        volumes.iter().all(|h| *h == volumes[0]),
        "the volumes differ"
    );

    // Refusals: a replica's store takes snapshots only from its primary's stream; a
    // taken name is refused and the primary goes on.
    let e = snapshot(&nodes[1], "s3").unwrap_err();
    assert!(e.contains("replica"), "{e}");
    let e = snapshot(&nodes[0], "s1").unwrap_err();
    assert!(e.contains("exists"), "{e}");
    let mut c = nodes[0].nbd("v");
    c.write(0, &[0x44; 4096], true).unwrap();

    // A replica killed during a snapshot: the snapshot is not acknowledged within the
    // bound (timeout 1.5 s + 1 s); the primary asks for the replica's removal.
    nodes[2].kill();
    let t = Instant::now();
    let e = snapshot(&nodes[0], "s3").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert!(e.contains("s3"), "{e}");
    // The cluster's answer (by hand here): generation 3 without node3. The snapshot
    // still pending completes on the copies in sync, identical there.
    nodes[0]
        .admin(AdminOp::SetReplication {
            volume: "v".into(),
            generation: 3,
            role: ReplicationRole::Primary {
                replicas: vec![peer(&nodes[1])],
                timeout_ms: Some(1500),
                cluster_wait_ms: None,
                catching_up: vec![],
                catch_up_bytes_per_sec: None,
                operator_override: false,
                rebuilding: vec![],
                out_of_sync: None,
            },
        })
        .unwrap();
    let mut c = nodes[0].nbd("v");
    c.write(4096, &[0x55; 4096], true).unwrap();
    assert_eq!(
        hash(root.path(), &nodes[0], "v@s3"),
        hash(root.path(), &nodes[1], "v@s3")
    );
    // While node3 is out of sync, a snapshot is refused naming it (a replica id).
    let e = snapshot(&nodes[0], "s4").unwrap_err();
    assert!(e.contains("in sync") && e.contains("node3"), "{e}");
}
