//! A replica whose store restarted while nothing was written is not reported caught up
//! before the primary's catch-up reached it (issue #8): reported caught up unreached, the
//! cluster rejoined it, it refused the primary's first request (its copy is lost until
//! configured), left the in-sync set and came back, for good, the volume's generation
//! climbing ~3 a second (seen in tests/tests/volume_rebuild.rs). Two `tessera-store`
//! processes, driven through their admin and NBD sockets as tesserad drives them.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaState, ReplicationRole, VolumeReplication};

mod support;
use support::*;

fn status(n: &Node) -> VolumeReplication {
    match n.admin(AdminOp::ReplicationStatus {}).unwrap() {
        AdminReply::Replication(all) => all.into_iter().find(|v| v.volume == "v").unwrap(),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn state_of(primary: &Node, replica: &Node) -> ReplicaState {
    let s = status(primary);
    s.replicas
        .iter()
        .find(|r| r.node == replica.id)
        .unwrap_or_else(|| panic!("{} does not list {}: {s:?}", primary.id, replica.id))
        .state
        .clone()
}

fn set(n: &Node, generation: u64, role: ReplicationRole) {
    n.admin(AdminOp::SetReplication {
        volume: "v".into(),
        generation,
        role,
    })
    .unwrap_or_else(|e| panic!("{} in generation {generation}: {e}", n.id));
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restarted_replica_is_caught_up_only_once_reached() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-unreached-test").unwrap();
    let mut nodes: Vec<Node> = ["node1", "node2"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    for n in &nodes {
        n.create("v", 8 * MIB);
    }
    let more = || serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000});
    nodes[1].replica_of("v", 2);
    set(&nodes[0], 2, primary_role(&[&nodes[1]], &[], more()));
    let data = pattern("before", MIB as usize);
    let mut c = nodes[0].nbd("v");
    c.write(0, &data, false).unwrap();
    // Flushed: nothing is left that the replica may lack, so its record stays empty.
    c.flush().unwrap();
    drop(c);

    // The replica's store restarts; the cluster takes it out (generation 3) and, with
    // nothing written meanwhile, starts catching it up (generation 4).
    nodes[1].kill_and_restart();
    let s = status(&nodes[1]);
    assert_eq!(
        (s.generation, s.configured, s.must_catch_up),
        (2, false, true),
        "{s:?}"
    );
    // Alone in sync: allowed under the operator's override (the rule of 2).
    let alone = || {
        let mut m = more();
        m["operator_override"] = true.into();
        m
    };
    let mut out = alone();
    out["out_of_sync"] =
        serde_json::json!([{"node": nodes[1].id, "addr": nodes[1].repl.to_string()}]);
    set(&nodes[0], 3, primary_role(&[], &[], out));
    set(&nodes[0], 4, primary_role(&[], &[&nodes[1]], alone()));

    // Nobody told the replica yet: its copy is lost, it refuses the catch-up, which is
    // not caught up however long it tries (before the fix: caught up at once). The fence
    // gave the store the generation, as tesserad waits for before telling it.
    wait_until("the replica's store holds generation 4", || {
        status(&nodes[1]).generation == 4
    });
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let st = state_of(&nodes[0], &nodes[1]);
        assert_ne!(st, ReplicaState::CaughtUp {}, "caught up, never reached");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Told, as tesserad tells it: caught up; then it rejoins and takes writes.
    set(&nodes[1], 4, ReplicationRole::Replica { catching_up: true });
    wait_until("the replica is caught up", || {
        state_of(&nodes[0], &nodes[1]) == ReplicaState::CaughtUp {}
    });
    set(&nodes[0], 5, primary_role(&[&nodes[1]], &[], more()));
    wait_until("the replica's store holds generation 5", || {
        status(&nodes[1]).generation == 5
    });
    set(
        &nodes[1],
        5,
        ReplicationRole::Replica { catching_up: false },
    );
    let after = pattern("after", MIB as usize);
    let mut c = nodes[0].nbd("v");
    c.write(MIB, &after, true).unwrap();
    assert_eq!(state_of(&nodes[0], &nodes[1]), ReplicaState::InSync {});
    assert!(!status(&nodes[1]).must_catch_up);
}
