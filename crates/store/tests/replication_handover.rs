//! A live migration's hand-over of a volume's primary (issue #12, store side of 14ee20e):
//! the cluster tells both stores their new roles at once, so the new primary's first
//! question (its reconciliation's `Unsettled`) can reach the previous primary's store
//! while that one still serves as the old primary and answers "not a replica". The new
//! primary must ask it again until it is a replica of the new generation (up to 2 s),
//! keep it in sync, and take no client request before; a store that stays "not a
//! replica" past that bound counts as failed, and the new primary does not wait longer.
//!
//! Deterministic: the test itself holds the old primary's demotion back until that store
//! has refused the new primary's question (its log says so), then for a fixed delay
//! during which the new primary must keep asking and a client's write through it must
//! not complete.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tessera_nbd::Client;
use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, ReplicaState};

mod support;
use support::*;

const SIZE: u64 = 16 * MIB;
/// How long the test holds the old primary's demotion back once it refused: many of the
/// new primary's 2 ms retries, well inside its 2 s bound.
const HOLD: Duration = Duration::from_millis(300);
/// The store's bound on asking again (`NOT_REPLICA_WAIT` in `repl/primary/reconcile.rs`).
const NOT_REPLICA_WAIT: Duration = Duration::from_secs(2);

/// `n`'s log, without the terminal colours its fields are written with (each escape
/// sequence runs from ESC to its final letter).
fn log(n: &Node) -> String {
    let raw = std::fs::read_to_string(n.dir.with_extension("log")).unwrap_or_default();
    let mut parts = raw.split('\u{1b}');
    let mut out = parts.next().unwrap_or_default().to_string();
    for p in parts {
        out.push_str(
            p.find(|c: char| c.is_ascii_alphabetic())
                .map_or("", |i| &p[i + 1..]),
        );
    }
    out
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `n`'s log says it refused a replication message of `v` as not a replica.
fn refused_as_not_replica(n: &Node) -> bool {
    log(n).lines().any(|l| {
        l.contains("replication message for volume v refused")
            && l.contains("not a replica of this volume")
    })
}

/// The in-sync state `primary` reports of the copy on `copy`.
fn copy_state(primary: &Node, copy: &Node) -> Option<ReplicaState> {
    primary
        .replication("v")
        .replicas
        .into_iter()
        .find(|r| r.node == copy.id)
        .map(|r| r.state)
}

/// node2 becomes the primary of generation 3 with node1 (still the primary of
/// generation 2) and node3 in sync: the moment a switch-over is committed and node2's
/// reconciler was quicker than node1's.
fn switch_over_to_node2(nodes: &[Node]) {
    nodes[1]
        .admin(AdminOp::SetReplication {
            volume: "v".into(),
            generation: 3,
            role: primary_role(
                &[&nodes[0], &nodes[2]],
                &[],
                serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000}),
            ),
        })
        .unwrap();
}

/// Three stores of a new CA named `ca` under a fresh directory, each with a copy of `v`:
/// node1 its primary in generation 2, node2 and node3 in sync.
fn three_stores(ca: &str) -> (tempfile::TempDir, Vec<Node>) {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint(ca).unwrap();
    let nodes = three_copies(root.path(), &ca, "v", SIZE);
    (root, nodes)
}

#[test]
fn a_new_primary_asks_the_previous_one_again_until_it_is_a_replica() {
    let (root, nodes) = three_stores("repl-handover-test");
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let a = pattern("a", 64 << 10);
    let mut c1 = n1.nbd("v");
    c1.write(0, &a, false).unwrap();
    c1.flush().unwrap();

    switch_over_to_node2(&nodes);
    // A client's write through the new primary, from another thread: it must wait for
    // the reconciliation, which waits for node1.
    let b = pattern("b", 4096);
    let (sock, b2) = (n2.dir.join("nbd.sock"), b.clone());
    let writer = std::thread::spawn(move || {
        let mut c2 = Client::connect_unix(&sock, "v").unwrap();
        c2.write(MIB, &b2, false).unwrap();
        c2.flush().unwrap();
        Instant::now()
    });
    wait_until(
        "node1, still the old primary, refused node2's question as not a replica",
        Duration::from_secs(10),
        || refused_as_not_replica(n1),
    );
    std::thread::sleep(HOLD);
    assert!(
        !writer.is_finished(),
        "the new primary completed a write before the previous primary was a replica of its generation"
    );
    n1.replica_of("v", 3);
    let demoted = Instant::now();
    let written = writer.join().unwrap();
    assert!(
        written >= demoted,
        "the write completed before node1's demotion"
    );
    assert!(
        written - demoted < Duration::from_secs(1),
        "the write took {:?} after node1 became a replica",
        written - demoted
    );

    // node2 said it asked again, more than once, and both copies stayed in sync: no
    // copy counted failed, no catch-up, no other generation.
    let said = log(n2);
    let line = said
        .lines()
        .find(|l| l.contains("the previous primary's store became a replica of this generation"))
        .unwrap_or_else(|| panic!("node2 did not log asking node1 again:\n{said}"));
    let refused: u32 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("refused="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refused= count in: {line}"));
    assert!(
        refused >= 2,
        "node2 asked node1 again only {refused} times: {line}"
    );
    assert!(
        line.contains("node1"),
        "the line names another copy: {line}"
    );
    for copy in [n1, n3] {
        assert_eq!(
            copy_state(n2, copy),
            Some(ReplicaState::InSync {}),
            "{} is not in sync after the hand-over",
            copy.id
        );
    }
    assert_eq!(n2.replication("v").generation, 3);
    assert_eq!(n1.replication("v").generation, 3);
    let want = n2.export_hash(root.path(), "v");
    for copy in [n1, n3] {
        assert_eq!(
            copy.read("v", 0, a.len()),
            a,
            "{} lost the flushed write",
            copy.id
        );
        assert_eq!(
            copy.read("v", MIB, b.len()),
            b,
            "{} lacks the new write",
            copy.id
        );
        assert_eq!(
            copy.export_hash(root.path(), "v"),
            want,
            "{}'s copy differs from the new primary's",
            copy.id
        );
    }
}

#[test]
fn a_previous_primary_that_stays_one_counts_as_failed_after_the_bound() {
    let (_root, nodes) = three_stores("repl-handover-bound-test");
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);

    let told = Instant::now();
    switch_over_to_node2(&nodes);
    // node1 is never demoted: node2 stops asking after the bound and counts it out of
    // sync, and does not wait for it beyond that.
    wait_until(
        "node2 no longer counts node1 in sync",
        Duration::from_secs(15),
        || !matches!(copy_state(n2, n1), Some(ReplicaState::InSync {}) | None),
    );
    let took = told.elapsed();
    assert!(
        took >= NOT_REPLICA_WAIT,
        "node2 gave node1 up after {took:?}, before its bound of {NOT_REPLICA_WAIT:?}"
    );
    assert!(
        refused_as_not_replica(n1),
        "node1 never refused node2's question"
    );
    assert!(
        !log(n2).contains("the previous primary's store became a replica of this generation"),
        "node2 says node1 became a replica, which it never did"
    );
    assert_eq!(
        copy_state(n2, n3),
        Some(ReplicaState::InSync {}),
        "node3, which answered, is not in sync"
    );
}
