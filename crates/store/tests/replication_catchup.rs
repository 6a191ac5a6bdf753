//! Replication across store restarts, and catch-up (issue #8, store side): three
//! `tessera-store` processes as in `replication.rs`, one cluster start for every check.
//! `replication_status` through the admin socket; a replica killed with SIGKILL comes
//! back refusing writes until caught up; the primary catches it up sending only the
//! blocks that differ (counted by the primary), it rejoins and every copy is
//! blake3-equal; a primary killed and restarted refuses NBD writes until configured.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_pki::ClusterCa;
use tessera_store_admin::{
    AdminOp, AdminReply, ReplicaPeer, ReplicaState, ReplicationRole, VolumeReplication,
};

mod support;
use support::*;

const SIZE: u64 = 32 * MIB;
const KIB: u64 = 1024;

fn status(n: &Node, volume: &str) -> VolumeReplication {
    match n.admin(AdminOp::ReplicationStatus {}).unwrap() {
        AdminReply::Replication(all) => all
            .into_iter()
            .find(|v| v.volume == volume)
            .unwrap_or_else(|| panic!("{} reports nothing about {volume}", n.id)),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn replica_state(n: &Node, volume: &str, node: &str) -> (ReplicaState, u64, u64) {
    let s = status(n, volume);
    let r = s
        .replicas
        .iter()
        .find(|r| r.node == node)
        .unwrap_or_else(|| panic!("{} does not list replica {node}: {s:?}", n.id));
    (
        r.state.clone(),
        r.catch_up_sent_bytes,
        r.catch_up_wire_bytes,
    )
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn peer(n: &Node) -> ReplicaPeer {
    ReplicaPeer {
        node: n.id.clone(),
        addr: n.repl.to_string(),
    }
}

fn set_role(n: &Node, generation: u64, role: ReplicationRole) -> Result<AdminReply, String> {
    n.admin(AdminOp::SetReplication {
        volume: "v".into(),
        generation,
        role,
    })
}

fn primary(replicas: &[&Node], catching_up: &[&Node]) -> ReplicationRole {
    ReplicationRole::Primary {
        replicas: replicas.iter().map(|n| peer(n)).collect(),
        timeout_ms: Some(1500),
        // No cluster answers here unless the test does: a request fails soon after.
        cluster_wait_ms: Some(1000),
        catching_up: catching_up.iter().map(|n| peer(n)).collect(),
        catch_up_bytes_per_sec: None,
        operator_override: false,
        rebuilding: vec![],
        out_of_sync: None,
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
fn roles_survive_restarts_and_a_returning_replica_gets_only_what_differs() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-catchup-test").unwrap();
    let mut nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    for n in &nodes {
        n.create("v", SIZE);
    }
    nodes[1].replica_of("v", 2);
    nodes[2].replica_of("v", 2);
    set_role(&nodes[0], 2, primary(&[&nodes[1], &nodes[2]], &[])).unwrap();

    // Status, from memory, through the admin socket.
    let s1 = status(&nodes[0], "v");
    assert_eq!(
        (s1.role.as_str(), s1.generation, s1.configured),
        ("primary", 2, true)
    );
    assert_eq!(s1.replicas.len(), 2);
    assert!(s1
        .replicas
        .iter()
        .all(|r| r.state == ReplicaState::InSync {} && r.missed_bytes == 0));
    let s2 = status(&nodes[1], "v");
    assert_eq!(
        (s2.role.as_str(), s2.configured, s2.must_catch_up),
        ("replica", true, false)
    );

    // What every copy holds before the replica goes away: 8 MiB, flushed.
    let base = pattern("base", (8 * MIB) as usize);
    let mut c = nodes[0].nbd("v");
    for (i, chunk) in base.chunks(MIB as usize).enumerate() {
        c.write(i as u64 * MIB, chunk, false).unwrap();
    }
    c.flush().unwrap();
    let s2 = status(&nodes[1], "v");
    assert!(
        s2.last_applied
            .is_some_and(|p| p.generation == 2 && p.seq >= 9),
        "{s2:?}"
    );

    // node3 killed (SIGKILL) and started again: still a replica of generation 2, but it
    // may have lost acknowledged writes, so it refuses them until caught up.
    nodes[2].kill_and_restart();
    let s3 = status(&nodes[2], "v");
    assert_eq!(
        (
            s3.role.as_str(),
            s3.generation,
            s3.configured,
            s3.must_catch_up
        ),
        ("replica", 2, false, true),
        "{s3:?}"
    );
    let t = Instant::now();
    assert!(
        c.write(0, &[0x11; 4096], true).is_err(),
        "a write was acknowledged by a replica that restarted"
    );
    assert!(t.elapsed() < Duration::from_secs(8));
    wait_until("node1 reports node3 failed", || {
        matches!(
            replica_state(&nodes[0], "v", "node3").0,
            ReplicaState::Failed { .. }
        )
    });
    // The cluster's reconfiguration again refuses nothing of the restarted copy's role:
    // told it is a replica in the same generation, it still refuses.
    nodes[2].replica_of("v", 2);
    assert!(status(&nodes[2], "v").must_catch_up);

    // The cluster's answer (by hand here): generation 3, node3 out of sync and caught up
    // in the background. The primary is told first (the replica refuses its catch-up
    // until it is told too; the primary tries again).
    set_role(&nodes[0], 3, primary(&[&nodes[1]], &[&nodes[2]])).unwrap();
    set_role(&nodes[2], 3, ReplicationRole::Replica { catching_up: true }).unwrap();
    let mut c = nodes[0].nbd("v");
    // Written while node3 is out of sync: 16 x 64 KiB that differ from its copy, and
    // 1 MiB rewritten with what every copy has already (missed, but equal: not sent).
    for i in 0..16u64 {
        let data = pattern(&format!("away{i}"), (64 * KIB) as usize);
        c.write(9 * MIB + i * 512 * KIB, &data, false).unwrap();
    }
    c.write(
        2 * MIB,
        &base[(2 * MIB) as usize..(3 * MIB) as usize],
        false,
    )
    .unwrap();
    c.flush().unwrap();
    wait_until("node1 reports node3 caught up", || {
        let (state, _, _) = replica_state(&nodes[0], "v", "node3");
        state == ReplicaState::CaughtUp {} && status(&nodes[0], "v").replicas[1].missed_bytes == 0
    });
    let (_, sent, wire) = replica_state(&nodes[0], "v", "node3");
    // The write refused at offset 0 (applied on the primary and node2) and the 16
    // writes: 4 KiB + 1 MiB. The equal megabyte and the rest of the volume stay home.
    assert_eq!(sent, 4 * KIB + MIB, "catch-up data bytes sent");
    assert!(
        wire > sent && wire < sent + 512 * KIB,
        "catch-up UDP bytes {wire} for {sent} bytes of data (the volume is {SIZE})"
    );

    // Rejoin in generation 4: the primary first (it sends what is left, then fences node3
    // in the new generation), then the replica is told it is in sync again.
    set_role(&nodes[0], 4, primary(&[&nodes[1], &nodes[2]], &[])).unwrap();
    set_role(
        &nodes[2],
        4,
        ReplicationRole::Replica { catching_up: false },
    )
    .unwrap();
    assert!(!status(&nodes[2], "v").must_catch_up);
    let tail = pattern("after", (256 * KIB) as usize);
    c.write(20 * MIB, &tail, true).unwrap();
    c.flush().unwrap();
    let s1 = status(&nodes[0], "v");
    assert!(
        s1.replicas
            .iter()
            .all(|r| r.state == ReplicaState::InSync {}),
        "{s1:?}"
    );
    let hashes: Vec<_> = nodes.iter().map(|n| copy_hash(root.path(), n)).collect();
    assert_eq!(
        hashes[0], hashes[1],
        "node2's copy differs from the primary's"
    );
    assert_eq!(hashes[0], hashes[2], "node3's copy differs after catch-up");

    // The primary killed and restarted: it serves reads, but refuses NBD writes until it
    // is configured again (the cluster may have moved the primary meanwhile).
    drop(c);
    nodes[0].kill_and_restart();
    let s1 = status(&nodes[0], "v");
    assert_eq!(
        (s1.role.as_str(), s1.configured, s1.generation),
        ("primary", false, 4),
        "{s1:?}"
    );
    let mut c = nodes[0].nbd("v");
    assert!(c.write(0, &[0x22; 4096], true).is_err());
    assert_eq!(nodes[0].read("v", 20 * MIB, tail.len()), tail);
    set_role(&nodes[0], 5, primary(&[&nodes[1], &nodes[2]], &[])).unwrap();
    let mut c = nodes[0].nbd("v");
    c.write(0, &[0x33; 4096], true).unwrap();
    c.flush().unwrap();
    assert_eq!(nodes[2].read("v", 0, 4096), vec![0x33; 4096]);
}
