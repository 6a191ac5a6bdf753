//! Reconciliation after a failover (issue #8, finding 1 of the fault schedule): a write the
//! old primary sent to one replica and never completed must not leave the copies
//! different once a new primary takes over. Built deterministically: the replica that
//! will become the primary is fenced in a newer generation first, so it refuses the old
//! primary's write while the other replica applies it (the moment a cluster's fence
//! reaches one copy before the other). The new primary must make every in-sync copy equal
//! to its own before it completes anything. On the code before the fix the two copies
//! differ on that write's blocks for good.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaState, ReplicationRole};

mod support;
use support::*;

const SIZE: u64 = 16 * MIB;

fn set_role(n: &Node, generation: u64, role: ReplicationRole) {
    n.admin(AdminOp::SetReplication {
        volume: "v".into(),
        generation,
        role,
    })
    .unwrap_or_else(|e| panic!("{}: set_replication {generation}: {e}", n.id));
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn whole(n: &Node) -> blake3::Hash {
    blake3::hash(&n.read("v", 0, SIZE as usize))
}

#[test]
fn a_write_only_one_replica_applied_is_reconciled_by_the_new_primary() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-reconcile-test").unwrap();
    let nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    for n in &nodes {
        n.create("v", SIZE);
    }
    n2.replica_of("v", 2);
    n3.replica_of("v", 2);
    n1.primary_of("v", 2, &[n2, n3]);

    // An acknowledged, flushed write: on every copy.
    let a = pattern("a", 64 << 10);
    let mut c1 = n1.nbd("v");
    c1.write(0, &a, false).unwrap();
    c1.flush().unwrap();

    // node2 learns generation 3 (the cluster's fence reached it first); the old primary's
    // next write is refused there and applied on node3, and never completed.
    n2.replica_of("v", 3);
    let b = pattern("b", 64 << 10);
    assert!(
        c1.write(MIB, &b, false).is_err(),
        "the old primary completed a write a fenced replica refused"
    );
    wait_until("node3 applied the old primary's last write", 10, || {
        n3.read("v", MIB, b.len()) == b
    });
    assert!(
        n2.read("v", MIB, b.len()).iter().all(|x| *x == 0),
        "node2 (fenced first) must not hold the old primary's last write"
    );

    // Failover: node2 the primary in generation 4 with node3 in sync, node1 caught up.
    set_role(
        n2,
        4,
        primary_role(
            &[n3],
            &[n1],
            serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000}),
        ),
    );
    set_role(n1, 4, ReplicationRole::Replica { catching_up: true });
    // A client's write and flush through the new primary complete after everything it
    // sent before them, the reconciliation included.
    let c = pattern("c", 4096);
    let mut c2 = n2.nbd("v");
    c2.write(2 * MIB, &c, false).unwrap();
    c2.flush().unwrap();
    assert!(
        n3.read("v", MIB, b.len()).iter().all(|x| *x == 0),
        "node3 still holds the write the old primary never completed: the copies differ"
    );
    assert!(
        n3.read("v", 0, a.len()) == a,
        "node3 lost the flushed write"
    );
    assert!(
        n3.read("v", 2 * MIB, c.len()) == c,
        "node3 lacks the new write"
    );
    assert_eq!(whole(n2), whole(n3), "the in-sync copies differ");

    // The old primary, caught up, rejoins: three equal copies.
    wait_until("node1 caught up by node2", 30, || {
        match n2.admin(AdminOp::ReplicationStatus {}) {
            Ok(AdminReply::Replication(all)) => all.iter().any(|v| {
                v.volume == "v"
                    && v.replicas
                        .iter()
                        .any(|r| r.node == "node1" && r.state == ReplicaState::CaughtUp {})
            }),
            _ => false,
        }
    });
    set_role(
        n2,
        5,
        primary_role(
            &[n3, n1],
            &[],
            serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000}),
        ),
    );
    wait_until("node1 holds generation 5", 10, || {
        matches!(n1.admin(AdminOp::ReplicationStatus {}),
            Ok(AdminReply::Replication(all)) if all.iter().any(|v| v.volume == "v" && v.generation >= 5))
    });
    set_role(n1, 5, ReplicationRole::Replica { catching_up: false });
    let d = pattern("d", 4096);
    c2.write(3 * MIB, &d, false).unwrap();
    c2.flush().unwrap();
    let h = whole(n2);
    assert_eq!(whole(n1), h, "node1's copy differs from the primary's");
    assert_eq!(whole(n3), h, "node3's copy differs from the primary's");
}
