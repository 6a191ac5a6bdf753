//! Exports from any node (issue #8), on the README's local three-node cluster: a volume
//! of three copies with its primary on node 3 is written with nbdcopy through node 1's
//! store, then through node 2's: each time the node becomes the primary through the
//! cluster (the API's volume view shows the primary there and a higher generation) and
//! the write succeeds; a client that wrote through node 1 before the move and is still
//! connected there gets an error on its next write, and nothing of that write lands
//! anywhere; every copy, read through its own store (reads never move the primary), is
//! blake3-equal to what was written. A volume of two copies is served through the node
//! holding none as well (forwarded: `volume_forward`).

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::Instant;

use tessera_tests::devcluster::{api, DevCluster, VmmKiller};
use tessera_tests::replicas::{
    all_in_sync, copy_nodes, create_volume, has_event, read_hash, serves, start_idle_vm,
    store_logs, take_snapshot, unix_uri, wait_volume, write, QemuIo,
};
use tessera_tests::{kvm_or_skip, require};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 16 * MIB;
/// Where the client left on the old primary wrote before the move (0xAA) and tries to
/// write after it (0xCC).
const BEFORE_AT: u64 = 8 * MIB;
const AFTER_AT: u64 = 12 * MIB;
/// The test guest (built by tests/build.rs).
const GUEST: &str = env!("TESSERA_TEST_GUEST");

#[test]
fn any_nodes_nbd_server_writes_a_volume_by_becoming_its_primary_and_fences_the_old_one() {
    require("curl");
    require("nbdcopy");
    require("qemu-io");
    require("stdbuf");
    require("qemu-img");
    let cluster = DevCluster::admin_with_nodes("volume any node admin password");
    let (dir, tmp) = (cluster.dir(), cluster.scratch());
    let (ca, t) = (cluster.ca(), cluster.token());
    let id = |i: u8| cluster.id(i);
    let v = create_volume(ca, t, "any", SIZE, 3, &id(3));
    assert_eq!(copy_nodes(&v)[0], id(3), "{v}");
    let mut generation = v["replication"]["generation"].as_u64().unwrap();

    // A reader of a replica's copy does not move the primary.
    let zero = blake3::hash(&vec![0u8; SIZE as usize]);
    assert_eq!(read_hash(dir, 1, "any", tmp), zero);
    let (_, v) = api(ca, 1, "GET", "volumes/any", Some(t), None);
    assert_eq!(v["node"], id(3).as_str(), "a read moved the primary: {v}");

    // Written through node 1, then node 2: each becomes the primary, fencing the last.
    let mut expected = vec![0u8; SIZE as usize];
    for (writer, len) in [(1u8, 6 * MIB), (2u8, 4 * MIB)] {
        let mut data = vec![0u8; len as usize];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
        let f = tmp.join(format!("pattern{writer}"));
        std::fs::write(&f, &data).unwrap();
        // The client left on node 1 joins before the move to node 2.
        let old = (writer == 2).then(|| {
            let mut c = QemuIo::start(&unix_uri(dir, 1, "any"));
            let a = c.run(&format!("write -P 0xaa {BEFORE_AT} 4096"));
            assert!(
                a.contains("wrote 4096/4096"),
                "{a}\n{}",
                store_logs(dir, 30)
            );
            expected[BEFORE_AT as usize..][..4096].fill(0xaa);
            c
        });
        let began = Instant::now();
        assert!(write(dir, writer, "any", &f), "{}", store_logs(dir, 30));
        eprintln!(
            "nbdcopy through node{writer}: {:?} (the primary moved on its first write)",
            began.elapsed()
        );
        expected[..len as usize].copy_from_slice(&data);
        let (_, v) = api(ca, 1, "GET", "volumes/any", Some(t), None);
        assert_eq!(v["node"], id(writer).as_str(), "{v}");
        let g = v["replication"]["generation"].as_u64().unwrap();
        assert!(g > generation, "generation {g} after {generation}: {v}");
        generation = g;
        assert!(has_event(ca, 1, t, "volume.primary_moved", "any"));

        if let Some(mut c) = old {
            let a = c.run(&format!("write -P 0xcc {AFTER_AT} 4096"));
            assert!(
                a.contains("failed") && a.contains("not permitted"),
                "the client left on the old primary: {a}\n{}",
                store_logs(dir, 30)
            );
        }
    }

    // Every copy, through its own store, holds what was written, and nothing of the
    // fenced client's last write. Reads do not move the primary (node 2 keeps it).
    let want = blake3::hash(&expected);
    let v = wait_volume(ca, 1, t, "any", 30, all_in_sync);
    for i in [3u8, 1, 2] {
        if read_hash(dir, i, "any", tmp) != want {
            let got = std::fs::read(tmp.join(format!("read-any-{i}"))).unwrap();
            let at = got.iter().zip(&expected).position(|(a, b)| a != b);
            panic!(
                "node{i}'s copy differs first at {at:?} (0xAA at {BEFORE_AT}, 0xCC at {AFTER_AT}): {:?}\n{}",
                at.map(|a| &got[a..a + 16]),
                store_logs(dir, 30)
            );
        }
    }
    let (_, v2) = api(ca, 1, "GET", "volumes/any", Some(t), None);
    assert_eq!(v2["node"], id(2).as_str(), "{v2}");
    assert_eq!(
        v2["replication"]["generation"],
        v["replication"]["generation"]
    );

    // A volume whose copies are on two nodes is served through the third too (its store
    // forwards to the primary's: tests/tests/volume_forward.rs).
    let v = create_volume(ca, t, "two", SIZE, 2, &id(1));
    let held = copy_nodes(&v);
    let none = (1..=3u8).find(|i| !held.contains(&id(*i))).unwrap();
    assert!(serves(dir, none, "two"), "{}", store_logs(dir, 30));
    // Then the store still serves what it holds.
    assert_eq!(read_hash(dir, none, "any", tmp), want);

    let test =
        "any_nodes_nbd_server_writes_a_volume_by_becoming_its_primary_and_fences_the_old_one";
    if kvm_or_skip(test) {
        a_running_vms_volume_is_not_written_through_another_node(ca, t, dir, tmp, &id);
    }
}

/// A volume a running VM uses (primary on node 1, where the VM runs): a write through
/// node 2 is refused, the store saying which VM uses it where; its primary stays; a
/// snapshot of it reads through node 2, equal on every copy.
fn a_running_vms_volume_is_not_written_through_another_node(
    ca: &str,
    t: &str,
    dir: &Path,
    tmp: &Path,
    id: &dyn Fn(u8) -> String,
) {
    let _reaper = VmmKiller::of(dir);
    create_volume(ca, t, "vmdisk", SIZE, 3, &id(1));
    start_idle_vm(ca, t, "user", "vmdisk", &id(1), GUEST);
    let (_, before) = api(ca, 1, "GET", "volumes/vmdisk", Some(t), None);
    assert_eq!(before["node"], id(1).as_str(), "{before}");

    let f = tmp.join("intruder");
    std::fs::write(&f, vec![0x5au8; MIB as usize]).unwrap();
    assert!(
        !write(dir, 2, "vmdisk", &f),
        "a write through node2 was accepted"
    );
    let log = std::fs::read_to_string(dir.join("node2/store.log")).unwrap();
    assert!(
        log.contains("volume vmdisk is in use by VM user")
            && log.contains(&format!("on node {}", "node1")),
        "{}",
        store_logs(dir, 30)
    );
    let (_, after) = api(ca, 1, "GET", "volumes/vmdisk", Some(t), None);
    assert_eq!(after["node"], id(1).as_str(), "{after}");
    assert_eq!(
        after["replication"]["generation"], before["replication"]["generation"],
        "{after}"
    );

    // Reading a snapshot of it through node 2 is fine, and equal on every copy.
    take_snapshot(ca, t, "vmdisk", "s");
    let h2 = read_hash(dir, 2, "vmdisk@s", tmp);
    for i in [1u8, 3] {
        assert_eq!(read_hash(dir, i, "vmdisk@s", tmp), h2, "node{i}'s snapshot");
    }
    // Nothing of the refused write is in it.
    let mut zeros_then = vec![0u8; MIB as usize];
    let snap = tmp.join("read-vmdisk@s-2");
    let mut fh = std::fs::File::open(&snap).unwrap();
    std::io::Read::read_exact(&mut fh, &mut zeros_then).unwrap();
    assert!(
        !zeros_then.iter().all(|b| *b == 0x5a),
        "the refused write landed"
    );
}
