//! A replica's store restarted under a running primary (issue #8, the bug once seen as
//! `KNOWN BUG` in tests/tests/volume_replication.rs): the client's write must neither be
//! acknowledged without the replica nor fail because the cluster took a moment to take
//! the replica out of the in-sync set. Three `tessera-store` processes; the test plays
//! the cluster's part (what tesserad's `resync` does) through the admin sockets, and the
//! client is `nbdcopy`.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaState, ReplicationRole};

mod support;
use support::*;

const SIZE: u64 = 16 * MIB;
/// The primary's replica timeout in this test.
const TIMEOUT: Duration = Duration::from_secs(4);

fn primary(replicas: &[&Node], catching_up: &[&Node]) -> ReplicationRole {
    primary_role(
        replicas,
        catching_up,
        serde_json::json!({"timeout_ms": TIMEOUT.as_millis() as u64}),
    )
}

fn set_role(n: &Node, generation: u64, role: ReplicationRole) {
    n.admin(AdminOp::SetReplication {
        volume: "v".into(),
        generation,
        role,
    })
    .unwrap_or_else(|e| panic!("{}: set_replication {generation}: {e}", n.id));
}

/// How the primary `n` sees replica `node`.
fn replica_state(n: &Node, node: &str) -> ReplicaState {
    let AdminReply::Replication(all) = n.admin(AdminOp::ReplicationStatus {}).unwrap() else {
        panic!("not a replication report");
    };
    let v = all.into_iter().find(|v| v.volume == "v").unwrap();
    v.replicas
        .into_iter()
        .find(|r| r.node == node)
        .unwrap_or_else(|| panic!("{} does not list {node}", n.id))
        .state
}

/// `nbdcopy --flush src` to the start of `v` on `n`, running.
fn spawn_write(n: &Node, src: &std::path::Path) -> Child {
    Command::new("nbdcopy")
        .arg("--flush")
        .arg(src)
        .arg(n.uri("v"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn copy_hash(root: &std::path::Path, n: &Node) -> blake3::Hash {
    let out = root.join(format!("{}-copy.img", n.id));
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(n.uri("v")).arg(&out));
    blake3::hash(&std::fs::read(&out).unwrap())
}

#[test]
fn a_replica_restarted_is_noticed_at_once_and_the_write_waits_for_the_cluster() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-restart-test").unwrap();
    let mut nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    for n in &nodes {
        n.create("v", SIZE);
    }
    set_role(
        &nodes[1],
        2,
        ReplicationRole::Replica { catching_up: false },
    );
    set_role(
        &nodes[2],
        2,
        ReplicationRole::Replica { catching_up: false },
    );
    set_role(&nodes[0], 2, primary(&[&nodes[1], &nodes[2]], &[]));
    // The streams to both replicas are up and carrying writes.
    let first = root.path().join("first.img");
    std::fs::write(&first, pattern("first", (4 * MIB) as usize)).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&first)
        .arg(nodes[0].uri("v")));

    // node3's store killed and started again on its data and address: the primary's
    // QUIC connection to the old process is dead, and nothing told it so.
    nodes[2].kill_and_restart();
    let second = root.path().join("second.img");
    std::fs::write(&second, pattern("second", (4 * MIB) as usize)).unwrap();
    let written = Instant::now();
    let mut writer = spawn_write(&nodes[0], &second);

    // The restarted store answers the old connection's next packet with a stateless
    // reset the primary can verify (same reset key), so the primary reconnects and hears
    // the copy refuse writes (it may have lost unflushed ones) long before its timeout.
    let deadline = written + TIMEOUT * 3;
    loop {
        if matches!(
            replica_state(&nodes[0], "node3"),
            ReplicaState::Failed { .. }
        ) {
            break;
        }
        assert!(Instant::now() < deadline, "node3 never reported failed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let noticed = written.elapsed();
    eprintln!("the primary reported the restarted replica failed {noticed:?} after the write");
    assert!(
        noticed < TIMEOUT - Duration::from_secs(1),
        "the restart was noticed only after {noticed:?} (the replica timeout is {TIMEOUT:?})"
    );

    // The cluster may take its time to answer (a Raft round trip, a reconciler round):
    // meanwhile the write is neither acknowledged (node3 lacks it) nor failed, past the
    // replica timeout and its old one-second margin.
    let hold = written + TIMEOUT + Duration::from_secs(2);
    while Instant::now() < hold {
        if let Some(status) = writer.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut writer.stderr.take().unwrap(), &mut err).unwrap();
            panic!(
                "the write ended ({status}) {:?} after it started, before the cluster answered: {err}",
                written.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The cluster's answer: generation 3, node3 out of the in-sync set and caught up in
    // the background (the primary first, then the replica). The write completes.
    set_role(&nodes[0], 3, primary(&[&nodes[1]], &[&nodes[2]]));
    set_role(&nodes[2], 3, ReplicationRole::Replica { catching_up: true });
    let status = writer.wait_with_output().unwrap();
    assert!(
        status.status.success(),
        "the write failed after the cluster's answer: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    eprintln!(
        "the write completed {:?} after it started",
        written.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while replica_state(&nodes[0], "node3") != (ReplicaState::CaughtUp {}) {
        assert!(Instant::now() < deadline, "node3 was never caught up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let want = blake3::hash(
        &[
            pattern("second", (4 * MIB) as usize),
            vec![0u8; (SIZE - 4 * MIB) as usize],
        ]
        .concat(),
    );
    for n in &nodes {
        assert_eq!(copy_hash(root.path(), n), want, "{}'s copy", n.id);
    }

    // With no answer from the cluster, the wait is bounded: a two-copy volume whose
    // replica's store is gone for good (removing it would leave one copy in sync, which
    // the cluster refuses) fails the write with an error once the replica timeout and
    // the cluster wait have passed, not before and never with an acknowledgement.
    for n in &nodes[..2] {
        n.create("w", SIZE);
    }
    nodes[1]
        .admin(AdminOp::SetReplication {
            volume: "w".into(),
            generation: 2,
            role: ReplicationRole::Replica { catching_up: false },
        })
        .unwrap();
    nodes[0]
        .admin(AdminOp::SetReplication {
            volume: "w".into(),
            generation: 2,
            role: primary_role(
                &[&nodes[1]],
                &[],
                serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000}),
            ),
        })
        .unwrap();
    nodes[1].kill();
    let mut c = nodes[0].nbd("w");
    let t = Instant::now();
    let r = c.write(0, &[0x77; 4096], true);
    let took = t.elapsed();
    assert!(
        r.is_err(),
        "a write was acknowledged without the only replica"
    );
    assert!(
        took >= Duration::from_millis(2400) && took < Duration::from_secs(8),
        "the write failed after {took:?}, not after the 1.5 s timeout and the 1 s cluster wait"
    );
}
