//! Catch-up carries snapshots (issue #8): a copy out of the in-sync set when a snapshot
//! was taken gets it once caught up, holding what the primary's holds. Three
//! `tessera-store` processes as in `replication.rs`, one start: node3 is killed, a
//! snapshot is taken (it completes on node1 and node2 once node3 is out of the in-sync
//! set), the volume is written again, node3 comes back and is caught up: it holds the
//! snapshot, blake3-equal to the primary's (read through each store's own NBD server),
//! and after the rejoin its volume is equal too. Then a store that never had the volume
//! (a rebuild's new copy) is caught up from an empty volume: it gets the snapshot too.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaState, ReplicationRole};

mod support;
use support::*;

const SIZE: u64 = 16 * MIB;

fn caught_up(primary: &Node, node: &str) -> bool {
    primary
        .replication("v")
        .replicas
        .iter()
        .any(|r| r.node == node && r.state == ReplicaState::CaughtUp {} && r.missed_bytes == 0)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn set_role(n: &Node, generation: u64, role: ReplicationRole) {
    n.admin(AdminOp::SetReplication {
        volume: "v".into(),
        generation,
        role,
    })
    .unwrap();
}

/// The primary's role (no cluster answers here: a request fails 1 s after a replica).
fn primary(replicas: &[&Node], catching_up: &[&Node]) -> ReplicationRole {
    primary_role(
        replicas,
        catching_up,
        serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000}),
    )
}

fn snapshots(n: &Node) -> Vec<String> {
    match n.admin(AdminOp::VolumeInfo { name: "v".into() }).unwrap() {
        AdminReply::Volume(v) => v.snapshots.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// The blake3 of `export` read through `n`'s own NBD server.
fn hash(root: &std::path::Path, n: &Node, export: &str) -> blake3::Hash {
    let (hash, len) = n.export_hash(root, export);
    assert_eq!(len, SIZE, "{export} on {}", n.id);
    hash
}

#[test]
fn a_copy_away_when_a_snapshot_was_taken_gets_it_when_caught_up() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-snapshot-catchup-test").unwrap();
    let mut nodes = three_copies(root.path(), &ca, "v", SIZE);
    let mut c = nodes[0].nbd("v");
    c.write(0, &pattern("base", (4 * MIB) as usize), true)
        .unwrap();

    c.write(MIB, &pattern("before-s1", (2 * MIB) as usize), true)
        .unwrap();

    // node3 dies; a snapshot is asked meanwhile: not acknowledged (node3 does not
    // answer), it completes on node1 and node2 once the cluster (by hand here) took node3
    // out of the in-sync set, listing it to be caught up.
    nodes[2].kill();
    let e = nodes[0]
        .admin(AdminOp::CreateSnapshot {
            volume: "v".into(),
            snapshot: "s1".into(),
        })
        .unwrap_err();
    assert!(e.contains("s1"), "{e}");
    set_role(&nodes[0], 3, primary(&[&nodes[1]], &[&nodes[2]]));
    let mut c = nodes[0].nbd("v");
    // Written after the snapshot, over what it holds and elsewhere.
    c.write(MIB, &pattern("after-s1", (2 * MIB) as usize), false)
        .unwrap();
    c.write(10 * MIB, &pattern("later", (MIB) as usize), false)
        .unwrap();
    c.flush().unwrap();
    wait_until("the snapshot completed on node1", || {
        snapshots(&nodes[0]).contains(&"s1".to_string())
    });
    let s1 = hash(root.path(), &nodes[0], "v@s1");
    assert_eq!(s1, hash(root.path(), &nodes[1], "v@s1"));
    assert_ne!(s1, hash(root.path(), &nodes[0], "v"), "no write after s1");

    // node3 comes back and is caught up: it holds s1 as the primary's, and its volume
    // is the primary's after the rejoin.
    nodes[2].restart();
    assert!(!snapshots(&nodes[2]).contains(&"s1".to_string()));
    set_role(&nodes[2], 3, ReplicationRole::Replica { catching_up: true });
    wait_until("node1 reports node3 caught up", || {
        caught_up(&nodes[0], "node3")
    });
    assert_eq!(
        snapshots(&nodes[2]),
        vec!["s1".to_string()],
        "node3 lacks the snapshot after catch-up"
    );
    assert_eq!(
        hash(root.path(), &nodes[2], "v@s1"),
        s1,
        "node3's s1 differs from the primary's"
    );
    set_role(&nodes[0], 4, primary(&[&nodes[1], &nodes[2]], &[]));
    set_role(
        &nodes[2],
        4,
        ReplicationRole::Replica { catching_up: false },
    );
    let mut c = nodes[0].nbd("v");
    c.write(12 * MIB, &pattern("rejoined", 64 * 1024), true)
        .unwrap();
    let head = hash(root.path(), &nodes[0], "v");
    assert_eq!(head, hash(root.path(), &nodes[1], "v"));
    assert_eq!(
        head,
        hash(root.path(), &nodes[2], "v"),
        "node3's volume differs"
    );

    // A new copy (as a rebuild makes one): an empty volume on a store that never held
    // v, caught up from nothing recorded. It gets the snapshot and the head.
    let node4 = Node::start(root.path(), "node4", &ca);
    node4.create("v", SIZE);
    set_role(&nodes[0], 5, primary(&[&nodes[1], &nodes[2]], &[&node4]));
    set_role(&node4, 5, ReplicationRole::Replica { catching_up: true });
    wait_until("node1 reports node4 caught up", || {
        caught_up(&nodes[0], "node4")
    });
    assert_eq!(snapshots(&node4), vec!["s1".to_string()]);
    assert_eq!(hash(root.path(), &node4, "v@s1"), s1, "node4's s1 differs");
    set_role(&nodes[0], 6, primary(&[&nodes[1], &nodes[2], &node4], &[]));
    set_role(&node4, 6, ReplicationRole::Replica { catching_up: false });
    assert_eq!(
        hash(root.path(), &node4, "v"),
        head,
        "node4's volume differs"
    );
}
