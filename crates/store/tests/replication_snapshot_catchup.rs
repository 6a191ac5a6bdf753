//! Catch-up carries snapshots (issue #8): a copy out of the in-sync set when a snapshot
//! was taken gets it once caught up, holding what the primary's holds. Three
//! `tessera-store` processes as in `replication.rs`, one start: node3 is killed, a
//! snapshot is taken (it completes on node1 and node2 once node3 is out of the in-sync
//! set), the volume is written again, node3 comes back and is caught up: it holds the
//! snapshot, blake3-equal to the primary's (read through each store's own NBD server),
//! and after the rejoin its volume is equal too. Then a store that never had the volume
//! (a rebuild's new copy) is caught up from an empty volume: it gets the snapshot too.
//!
//! Across resizes and bad blocks (two more tests, their own stores):
//!
//! - a copy away while a snapshot was taken and the volume then grew gets the snapshot at
//!   its own size, and a new copy (made at one block, as a rebuild makes it) gets every
//!   snapshot at its own size, in order, even when interrupted (its store killed in the
//!   middle) and caught up again, with no layer more than the primary's copy: each
//!   snapshot and the volume blake3-equal on every copy, read through each store's NBD;
//! - a block failing its checksum in a replica's snapshot layer, met by its catch-up, is
//!   rewritten there with the primary's bytes (counted, with the node and the snapshot);
//! - a copy made larger than a snapshot it lacks (at the volume's grown size, holding
//!   other bytes everywhere) gets it at the snapshot's own size, equal to the primary's,
//!   and a clone of it grown past that size reads as the primary's clone (zeroes there);
//! - a block failing its checksum in a clone's origin layer (another volume's snapshot)
//!   on a replica, met by the clone's catch-up where the clone was written since, is
//!   rewritten there with the primary's bytes of the origin (counted);
//! - the same bad block found by a scrub on the replica, where only the clone is
//!   replicated (its origin a standalone volume on every store, as a template copied to
//!   each node): repaired from the clone's primary, listed as repaired, counted.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use tessera_blockstore::ScrubReport;
use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaState, ReplicationRole};

mod support;
use support::rot::{bytes_at, file_holding, rot};
use support::*;

const SIZE: u64 = 16 * MIB;

fn caught_up(primary: &Node, node: &str) -> bool {
    caught_up_on(primary, "v", node)
}

fn caught_up_on(primary: &Node, volume: &str, node: &str) -> bool {
    primary
        .replication(volume)
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
    set_role_of(n, "v", generation, role);
}

fn set_role_of(n: &Node, volume: &str, generation: u64, role: ReplicationRole) {
    n.admin(AdminOp::SetReplication {
        volume: volume.into(),
        generation,
        role,
    })
    .unwrap();
}

/// The primary's role (no cluster answers here: a request fails 1 s after a replica).
fn primary(replicas: &[&Node], catching_up: &[&Node]) -> ReplicationRole {
    primary_with(replicas, catching_up, serde_json::json!({}))
}

/// [`primary`] with more settings (the catch-up rate).
fn primary_with(
    replicas: &[&Node],
    catching_up: &[&Node],
    more: serde_json::Value,
) -> ReplicationRole {
    let mut base = serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000});
    if let (Some(b), Some(m)) = (base.as_object_mut(), more.as_object()) {
        b.extend(m.clone());
    }
    primary_role(replicas, catching_up, base)
}

/// Makes `node` (caught up by `p` in `generation`) an in-sync replica in the next one.
fn rejoin(p: &Node, in_sync: &[&Node], node: &Node, generation: u64) {
    set_role(p, generation, primary(in_sync, &[]));
    set_role(
        node,
        generation,
        ReplicationRole::Replica { catching_up: false },
    );
}

/// Asks `n` for snapshot `name` of v.
fn snapshot(n: &Node, name: &str) -> Result<AdminReply, String> {
    n.admin(AdminOp::CreateSnapshot {
        volume: "v".into(),
        snapshot: name.into(),
    })
}

/// Grows v to `size` through `n`.
fn grow(n: &Node, size: u64) {
    n.admin(AdminOp::ResizeVolume {
        name: "v".into(),
        size,
    })
    .unwrap();
}

/// Grows volume `v` on `n` to `big` and writes, flushed, over the start (after the
/// snapshot the tests take first) and past the old end.
fn grow_and_write_past_the_old_end(n: &Node, big: u64) {
    grow(n, big);
    let mut c = n.nbd("v");
    c.write(MIB, &pattern("after-s1", (2 * MIB) as usize), false)
        .unwrap();
    c.write(
        SIZE + MIB,
        &pattern("past-the-old-end", MIB as usize),
        false,
    )
    .unwrap();
    c.flush().unwrap();
}

fn snapshots(n: &Node) -> Vec<String> {
    match n.admin(AdminOp::VolumeInfo { name: "v".into() }).unwrap() {
        AdminReply::Volume(v) => v.snapshots.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// The blake3 of `export` read through `n`'s own NBD server.
fn hash(root: &Path, n: &Node, export: &str) -> blake3::Hash {
    sized_hash(root, n, export, SIZE)
}

/// [`hash`] of an export of `size` bytes.
fn sized_hash(root: &Path, n: &Node, export: &str, size: u64) -> blake3::Hash {
    let (hash, len) = n.export_hash(root, export);
    assert_eq!(len, size, "the size of {export} on {}", n.id);
    hash
}

/// The layers of `n`'s store holding a data file.
fn layers(n: &Node) -> usize {
    std::fs::read_dir(n.dir.join("layers"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "data")
        })
        .count()
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
    let e = snapshot(&nodes[0], "s1").unwrap_err();
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

#[test]
fn snapshots_older_than_a_resize_reach_every_copy_at_their_own_size() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let ca = ClusterCa::mint("repl-catchup-snapshots-test").unwrap();
    // As `three_copies`, with catch-ups at 2 MiB/s (a primary keeps the rate it started
    // with), so that a catch-up can be interrupted below.
    let mut nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(r, id, &ca))
        .collect();
    for n in &nodes {
        n.create("v", SIZE);
    }
    for n in &nodes[1..] {
        set_role(n, 2, ReplicationRole::Replica { catching_up: false });
    }
    let slow = serde_json::json!({"catch_up_bytes_per_sec": 2 * MIB});
    set_role(
        &nodes[0],
        2,
        primary_with(&[&nodes[1], &nodes[2]], &[], slow),
    );
    let mut c = nodes[0].nbd("v");
    c.write(0, &pattern("base", (4 * MIB) as usize), true)
        .unwrap();

    // node3 dies while s1 is in the stream: s1 completes on node1 and node2 once node3 is
    // out of the in-sync set; then the volume grows and is written past its old end.
    nodes[2].kill();
    let e = snapshot(&nodes[0], "s1").unwrap_err();
    assert!(e.contains("s1"), "{e}");
    set_role(&nodes[0], 3, primary(&[&nodes[1]], &[&nodes[2]]));
    wait_until("s1 completed on node1", || snapshots(&nodes[0]) == ["s1"]);
    let big = SIZE + 8 * MIB;
    grow_and_write_past_the_old_end(&nodes[0], big);
    let s1 = sized_hash(r, &nodes[0], "v@s1", SIZE);
    assert_eq!(s1, sized_hash(r, &nodes[1], "v@s1", SIZE));

    // node3 comes back: s1 at 16 MiB, the volume at 24 MiB, both the primary's.
    nodes[2].restart();
    set_role(&nodes[2], 3, ReplicationRole::Replica { catching_up: true });
    wait_until("node3 caught up", || caught_up(&nodes[0], "node3"));
    assert_eq!(snapshots(&nodes[2]), ["s1"], "node3 lacks s1");
    assert_eq!(sized_hash(r, &nodes[2], "v@s1", SIZE), s1, "node3's s1");
    rejoin(&nodes[0], &[&nodes[1], &nodes[2]], &nodes[2], 4);
    let head = sized_hash(r, &nodes[0], "v", big);
    assert_eq!(sized_hash(r, &nodes[2], "v", big), head, "node3's volume");

    // Every copy in sync: s2 at 24 MiB, then the volume grows to 32 MiB.
    snapshot(&nodes[0], "s2").unwrap();
    let s2 = sized_hash(r, &nodes[0], "v@s2", big);
    let bigger = big + 8 * MIB;
    grow(&nodes[0], bigger);
    let mut c = nodes[0].nbd("v");
    c.write(big + MIB, &pattern("past-24", MIB as usize), true)
        .unwrap();
    let head = sized_hash(r, &nodes[0], "v", bigger);

    // A new copy, made at one block as tesserad makes a rebuild's, caught up slowly
    // (2 MiB/s) so that its store can be killed in the middle; back, it is caught up
    // again: s1 at 16 MiB, s2 at 24 MiB, the volume at 32 MiB, each the primary's, in
    // no more layers than the primary's copy.
    let mut node4 = Node::start(r, "node4", &ca);
    node4.create("v", 4096);
    set_role(&nodes[0], 5, primary(&[&nodes[1], &nodes[2]], &[&node4]));
    set_role(&node4, 5, ReplicationRole::Replica { catching_up: true });
    wait_until("node4 got some of its first snapshot", || {
        nodes[0]
            .replication("v")
            .replicas
            .iter()
            .any(|x| x.node == "node4" && x.catch_up_sent_bytes > 0)
    });
    node4.kill();
    node4.restart();
    eprintln!(
        "node4 killed during its catch-up, holding {:?}",
        snapshots(&node4)
    );
    assert!(
        snapshots(&node4) != ["s1", "s2"],
        "node4 was caught up before it was killed: the test proves nothing"
    );
    set_role(&node4, 5, ReplicationRole::Replica { catching_up: true });
    wait_until("node4 caught up", || caught_up(&nodes[0], "node4"));
    assert_eq!(snapshots(&node4), ["s1", "s2"]);
    assert_eq!(sized_hash(r, &node4, "v@s1", SIZE), s1, "node4's s1");
    assert_eq!(sized_hash(r, &node4, "v@s2", big), s2, "node4's s2");
    rejoin(&nodes[0], &[&nodes[1], &nodes[2], &node4], &node4, 6);
    assert_eq!(sized_hash(r, &node4, "v", bigger), head, "node4's volume");
    assert_eq!(
        layers(&node4),
        layers(&nodes[0]),
        "node4 holds layers the primary's copy does not"
    );
}

#[test]
fn a_bad_block_in_a_replicas_snapshot_layer_is_repaired_by_its_catch_up() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let ca = ClusterCa::mint("repl-catchup-layers-test").unwrap();
    let mut nodes = three_copies(r, &ca, "v", SIZE);
    let base = pattern("base", (4 * MIB) as usize);
    let mut c = nodes[0].nbd("v");
    c.write(0, &base, true).unwrap();
    snapshot(&nodes[0], "s1").unwrap();
    let s1 = hash(r, &nodes[0], "v@s1");

    // node3 away; the block at 1 MiB is written anew meanwhile (so its catch-up compares
    // it), and on node3 the old bytes, in s1's layer, rot.
    nodes[2].kill();
    set_role(&nodes[0], 3, primary(&[&nodes[1]], &[&nodes[2]]));
    let mut c = nodes[0].nbd("v");
    c.write(MIB, &pattern("after-s1", 64 * 1024), true).unwrap();
    nodes[2].restart();
    let b = support::rot::B as usize;
    let file = file_holding(&nodes[2], MIB, &base[MIB as usize..MIB as usize + b]);
    rot(&file, MIB);

    set_role(&nodes[2], 3, ReplicationRole::Replica { catching_up: true });
    wait_until("node3 caught up", || caught_up(&nodes[0], "node3"));
    // Its s1 reads again (it failed with EIO at 1 MiB before), equal to the primary's.
    assert_eq!(sized_hash(r, &nodes[2], "v@s1", SIZE), s1, "node3's s1");
    let status = nodes[0].replication("v");
    assert!(
        status.repairs.iter().any(|x| x.offset == MIB
            && x.on.as_deref() == Some("node3")
            && x.snapshot.as_deref() == Some("s1")
            && x.from == "primary"),
        "the repair is not listed: {:?}",
        status.repairs
    );
    assert!(status.repaired_blocks >= 1);
    rejoin(&nodes[0], &[&nodes[1], &nodes[2]], &nodes[2], 4);
    assert_eq!(
        sized_hash(r, &nodes[2], "v", SIZE),
        sized_hash(r, &nodes[0], "v", SIZE),
        "node3's volume"
    );
}

#[test]
fn a_copy_larger_than_a_snapshot_it_lacks_gets_it_at_the_snapshots_size() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let ca = ClusterCa::mint("repl-catchup-larger-copy-test").unwrap();
    let nodes = three_copies(r, &ca, "v", SIZE);
    let mut c = nodes[0].nbd("v");
    c.write(0, &pattern("base", (4 * MIB) as usize), true)
        .unwrap();
    snapshot(&nodes[0], "s1").unwrap();
    let big = SIZE + 8 * MIB;
    grow_and_write_past_the_old_end(&nodes[0], big);
    let s1 = sized_hash(r, &nodes[0], "v@s1", SIZE);
    let head = sized_hash(r, &nodes[0], "v", big);

    // node4: a copy made at the volume's grown size (as an earlier version made a
    // rebuild's, or by hand), holding other bytes everywhere, past s1's size too. It
    // lacks s1 and is larger than s1 was: before, the catch-up left s1 out (a warning).
    // First as a store of an older release speaks on the wire (protocol version 1, which
    // has no snapshot with a size): it must not be sent one, and waits for its upgrade.
    let mut node4 = Node::start_with(r, "node4", &ca, &["--repl-max-version", "1"]);
    node4.create("v", big);
    let mut w = node4.nbd("v");
    for at in (0..big).step_by((4 * MIB) as usize) {
        w.write(
            at,
            &pattern(&format!("stale-{at}"), (4 * MIB) as usize),
            false,
        )
        .unwrap();
    }
    w.flush().unwrap();
    set_role(&nodes[0], 3, primary(&[&nodes[1], &nodes[2]], &[&node4]));
    set_role(&node4, 3, ReplicationRole::Replica { catching_up: true });
    let primary_log = nodes[0].dir.with_extension("log");
    wait_until("the primary tells why node4's copy cannot take s1", || {
        std::fs::read_to_string(&primary_log).is_ok_and(|l| {
            l.contains("speaks replication protocol version 1")
                && l.contains("cannot take snapshot s1")
        })
    });
    assert!(!caught_up(&nodes[0], "node4"), "node4 caught up without s1");
    assert!(snapshots(&node4).is_empty(), "node4 took a snapshot");
    let node4_log = node4.dir.with_extension("log");
    let refused = std::fs::read_to_string(&node4_log).unwrap();
    assert!(
        !refused.contains("protocol version 2"),
        "node4 was sent a frame of version 2: {refused}"
    );

    // Upgraded (the same store, now offering version 2): the catch-up completes.
    node4.args.clear();
    node4.kill_and_restart();
    set_role(&node4, 3, ReplicationRole::Replica { catching_up: true });
    wait_until("node4 caught up", || caught_up(&nodes[0], "node4"));
    assert_eq!(snapshots(&node4), ["s1"], "node4 lacks s1");
    assert_eq!(sized_hash(r, &node4, "v@s1", SIZE), s1, "node4's s1");
    rejoin(&nodes[0], &[&nodes[1], &nodes[2], &node4], &node4, 4);
    assert_eq!(sized_hash(r, &node4, "v", big), head, "node4's volume");

    // A clone of s1 grown to 24 MiB reads on node4 what it reads on node1 (zeroes past
    // 16 MiB), not the bytes node4's copy held there before s1 was carried.
    for n in [&nodes[0], &node4] {
        n.admin(AdminOp::CloneSnapshot {
            volume: "v".into(),
            snapshot: "s1".into(),
            name: "c".into(),
        })
        .unwrap();
        n.admin(AdminOp::ResizeVolume {
            name: "c".into(),
            size: big,
        })
        .unwrap();
    }
    assert_eq!(
        sized_hash(r, &node4, "c", big),
        sized_hash(r, &nodes[0], "c", big),
        "a clone of node4's s1, grown"
    );
}

#[test]
fn a_bad_block_in_a_clones_origin_layer_on_a_replica_is_repaired_by_its_catch_up() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let ca = ClusterCa::mint("repl-catchup-origin-test").unwrap();
    let mut nodes = three_copies(r, &ca, "v", SIZE);
    let base = pattern("base", (4 * MIB) as usize);
    nodes[0].nbd("v").write(0, &base, true).unwrap();
    snapshot(&nodes[0], "s1").unwrap();
    replicated_clone(&nodes, "v");

    // node3 away; the clone is written at 1 MiB meanwhile (so its catch-up compares that
    // block, and the primary's clone no longer holds the origin's bytes there), and on
    // node3 the origin's bytes, in v's layer under s1, rot.
    nodes[2].kill();
    set_role_of(&nodes[0], "c", 3, primary(&[&nodes[1]], &[&nodes[2]]));
    nodes[0]
        .nbd("c")
        .write(MIB, &pattern("clone-write", 64 * 1024), true)
        .unwrap();
    nodes[2].restart();
    let b = support::rot::B;
    let good = &base[MIB as usize..(MIB + b) as usize];
    let file = file_holding(&nodes[2], MIB, good);
    rot(&file, MIB);
    assert!(bytes_at(&file, MIB, b) != good, "the block did not rot");

    set_role_of(
        &nodes[2],
        "c",
        3,
        ReplicationRole::Replica { catching_up: true },
    );
    wait_until("node3 caught up on c", || {
        caught_up_on(&nodes[0], "c", "node3")
    });
    // The origin's layer file holds its bytes again (before, the catch-up's write
    // repaired the clone's head only and left it bad, for v@s1 and v on node3).
    assert!(
        bytes_at(&file, MIB, b) == good,
        "node3's origin layer still holds the flipped block"
    );
    let status = nodes[0].replication("c");
    assert!(
        status.repairs.iter().any(|x| x.offset == MIB
            && x.on.as_deref() == Some("node3")
            && x.snapshot.is_none()
            && x.from == "primary"),
        "the repair is not listed: {:?}",
        status.repairs
    );
    set_role_of(&nodes[0], "c", 4, primary(&[&nodes[1], &nodes[2]], &[]));
    set_role_of(
        &nodes[2],
        "c",
        4,
        ReplicationRole::Replica { catching_up: false },
    );
    assert_eq!(
        sized_hash(r, &nodes[2], "c", SIZE),
        sized_hash(r, &nodes[0], "c", SIZE),
        "node3's clone"
    );
    assert_eq!(
        sized_hash(r, &nodes[2], "v@s1", SIZE),
        sized_hash(r, &nodes[0], "v@s1", SIZE),
        "node3's origin snapshot"
    );
}

/// Clone `c` of `origin@s1`, as tesserad makes one: each store clones its own copy of
/// the snapshot, then the clone is replicated like a new volume (primary on the first).
fn replicated_clone(nodes: &[Node], origin: &str) {
    for n in nodes {
        n.admin(AdminOp::CloneSnapshot {
            volume: origin.into(),
            snapshot: "s1".into(),
            name: "c".into(),
        })
        .unwrap();
    }
    for n in &nodes[1..] {
        set_role_of(n, "c", 2, ReplicationRole::Replica { catching_up: false });
    }
    set_role_of(&nodes[0], "c", 2, primary(&[&nodes[1], &nodes[2]], &[]));
}

fn scrub(n: &Node) -> ScrubReport {
    match n.admin(AdminOp::Scrub {}).unwrap() {
        AdminReply::Scrub(r) => r,
        other => panic!("unexpected reply {other:?}"),
    }
}

#[test]
fn a_scrub_on_a_replica_repairs_a_bad_block_in_a_clones_origin_layer() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let ca = ClusterCa::mint("repl-scrub-origin-test").unwrap();
    let nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(r, id, &ca))
        .collect();
    // The origin: a standalone volume with the same bytes on every store, its snapshot
    // cloned on each; only the clone is replicated.
    let base = pattern("template", (4 * MIB) as usize);
    for n in &nodes {
        n.create("t", SIZE);
        n.nbd("t").write(0, &base, true).unwrap();
        n.admin(AdminOp::CreateSnapshot {
            volume: "t".into(),
            snapshot: "s1".into(),
        })
        .unwrap();
    }
    replicated_clone(&nodes, "t");
    // The origin's checksums in node3's table (its checkpoint), then its block rots.
    let deadline = Instant::now() + Duration::from_secs(40);
    while scrub(&nodes[2]).blocks_checked < 4 * MIB / support::rot::B {
        assert!(
            Instant::now() < deadline,
            "t's blocks never reached node3's table"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let b = support::rot::B;
    let good = &base[MIB as usize..(MIB + b) as usize];
    let file = file_holding(&nodes[2], MIB, good);
    rot(&file, MIB);
    assert!(bytes_at(&file, MIB, b) != good, "the block did not rot");

    let report = scrub(&nodes[2]);
    assert!(report.bad.is_empty(), "left bad: {:?}", report.bad);
    let fixed = report
        .repaired
        .iter()
        .find(|x| x.offset == MIB)
        .unwrap_or_else(|| panic!("not repaired: {report:?}"));
    assert!(
        fixed.affects.iter().any(|a| a == "c") && fixed.affects.iter().any(|a| a == "t@s1"),
        "{fixed:?}"
    );
    assert!(
        bytes_at(&file, MIB, b) == good,
        "node3's origin layer still holds the flipped block"
    );
    let status = nodes[0].replication("c");
    assert!(
        status
            .repairs
            .iter()
            .any(|x| x.offset == MIB && x.on.as_deref() == Some("node3")),
        "the repair is not listed: {:?}",
        status.repairs
    );
    // Every name reading the block on node3 reads the origin's bytes again.
    for name in ["t@s1", "t", "c"] {
        assert_eq!(
            nodes[2].read(name, MIB, b as usize),
            good,
            "{name} on node3"
        );
    }
}
