//! Exports from any node through a node that holds no copy (issue #8), on the README's
//! local three-node cluster: a one-copy volume on node 1 is written with nbdcopy through
//! node 2's store and with qemu-img through node 3's, each forwarding to node 1's over
//! the QUIC export; read back through every node (NBD, and QUIC through node 3) it is
//! blake3-equal to what was written; nbdinfo through node 3 gives its size; a trim and a
//! write-zeroes through node 3 read as zeros everywhere; a snapshot of it reads back
//! through node 2, and `nbdinfo --list` on every node lists the volume and the snapshot.
//! A running VM's volume is not
//! written through a node holding no copy (the words name the VM). The primary's store
//! killed, a client still connected through node 2 gets an error within seconds, not a
//! hang.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::devcluster::{api, DevCluster, VmmKiller};
use tessera_tests::replicas::{
    copy_nodes, create_volume, kill, read_hash, start_idle_vm, store_logs, unix_uri, wait_task,
    write, QemuIo,
};
use tessera_tests::{bin, file_hash, kvm_or_skip, output, require};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 16 * MIB;
/// How long a client through node 2 may wait for its error once the primary's store is
/// dead: the forwarder's silence bound (5 s), one attempt to connect again to the one
/// copy's store (5 s), plus room for a loaded machine.
const DEAD_PEER_BOUND: Duration = Duration::from_secs(20);
/// The test guest (built by tests/build.rs).
const GUEST: &str = env!("TESSERA_TEST_GUEST");

/// Asserts that `export` reads as `want` through every node's NBD socket.
fn same_everywhere(dir: &Path, tmp: &Path, export: &str, want: &[u8]) {
    let want = blake3::hash(want);
    for i in [1u8, 2, 3] {
        assert_eq!(
            read_hash(dir, i, export, tmp),
            want,
            "{export} read through node{i}\n{}",
            store_logs(dir, 30)
        );
    }
}

/// The export names node `i`'s store lists (`nbdinfo --list`, NBD_OPT_LIST).
fn listed_exports(dir: &Path, i: u8) -> Vec<String> {
    let out = output(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(unix_uri(dir, i, "")),
    );
    assert!(
        out.status.success(),
        "nbdinfo --list through node{i}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listed["exports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["export-name"].as_str().map(str::to_string))
        .collect()
}

fn random(len: u64) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    data
}

#[test]
fn a_node_without_a_copy_serves_the_volume_by_forwarding_to_its_primary() {
    for tool in [
        "curl", "nbdcopy", "nbdinfo", "qemu-img", "qemu-io", "stdbuf",
    ] {
        require(tool);
    }
    let cluster = DevCluster::admin_with_nodes("volume forward admin password");
    let (dir, tmp) = (cluster.dir(), cluster.scratch());
    let (ca, t) = (cluster.ca(), cluster.token());
    let id = |i: u8| cluster.id(i);
    create_volume(ca, t, "solo", SIZE, 1, &id(1));

    // nbdcopy through node 2, which holds no copy.
    let mut expected = random(SIZE);
    let a = tmp.join("a");
    std::fs::write(&a, &expected).unwrap();
    let began = Instant::now();
    assert!(write(dir, 2, "solo", &a), "{}", store_logs(dir, 30));
    eprintln!(
        "nbdcopy of 16 MiB through node2 (forwarded): {:?}",
        began.elapsed()
    );
    same_everywhere(dir, tmp, "solo", &expected);

    // qemu-img through node 3: the first half anew, the rest as it was.
    let b = tmp.join("b");
    let half = random(SIZE / 2);
    expected[..half.len()].copy_from_slice(&half);
    std::fs::write(&b, &expected).unwrap();
    let out = output(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        b.to_str().unwrap(),
        &unix_uri(dir, 3, "solo"),
    ]));
    assert!(
        out.status.success(),
        "qemu-img through node3: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        store_logs(dir, 30)
    );
    same_everywhere(dir, tmp, "solo", &expected);

    // nbdinfo through node 3 gives the size.
    let out = output(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(unix_uri(dir, 3, "solo")),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        SIZE.to_string()
    );

    // A trim and a write-zeroes through node 3 read as zeros through every node.
    let out = output(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "discard 1M 1M",
        "-c",
        "write -z 5M 512k",
        "-c",
        "flush",
        &unix_uri(dir, 3, "solo"),
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("discard 1048576/1048576"),
        "{said}\n{}",
        store_logs(dir, 30)
    );
    expected[MIB as usize..2 * MIB as usize].fill(0);
    expected[5 * MIB as usize..][..512 * 1024].fill(0);
    same_everywhere(dir, tmp, "solo", &expected);

    // The QUIC export of node 3 forwards too (node 3's own credentials as the client's).
    let got = tmp.join("quic.raw");
    let out = output(Command::new(bin("tessera")).args([
        "volume",
        "cp",
        "--creds",
        dir.join("node3/data/tls").to_str().unwrap(),
        "quic://127.0.0.3:10809/solo",
        got.to_str().unwrap(),
    ]));
    assert!(
        out.status.success(),
        "volume cp through node3's QUIC export: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        store_logs(dir, 30)
    );
    assert_eq!(file_hash(&got), blake3::hash(&expected));

    // A snapshot of it reads back through a node holding no copy, and every node lists
    // the volume and the snapshot by the names node 1 uses (NBD_OPT_LIST).
    let (c, task) = api(
        ca,
        1,
        "POST",
        "volumes/solo/snapshots",
        Some(t),
        Some(&json!({"name": "s"})),
    );
    assert_eq!(c, 202, "{task}");
    assert_eq!(wait_task(ca, 1, t, &task)["state"], "succeeded");
    assert_eq!(
        read_hash(dir, 2, "solo@s", tmp),
        blake3::hash(&expected),
        "{}",
        store_logs(dir, 30)
    );
    for i in [1u8, 2, 3] {
        let listed = listed_exports(dir, i);
        assert!(
            listed.contains(&"solo".to_string()) && listed.contains(&"solo@s".to_string()),
            "node{i} lists {listed:?}\n{}",
            store_logs(dir, 30)
        );
    }

    let test = "a_node_without_a_copy_serves_the_volume_by_forwarding_to_its_primary";
    if kvm_or_skip(test) {
        a_running_vms_volume_is_not_written_through_a_node_without_a_copy(ca, t, dir, tmp, &id);
    }

    // A two-copy volume with its primary on node 1, and the node holding no copy of it.
    let v = create_volume(ca, t, "pair", SIZE, 2, &id(1));
    let held = copy_nodes(&v);
    let none = (1..=3u8).find(|i| !held.contains(&id(*i))).unwrap();
    let other = (2..=3u8).find(|i| *i != none).unwrap();
    let mut pair = random(4 * MIB);
    let f = tmp.join("pair");
    std::fs::write(&f, &pair).unwrap();
    assert!(write(dir, none, "pair", &f), "{}", store_logs(dir, 30));
    pair.resize(SIZE as usize, 0);

    // The primary's store dies under a client connected through node 2: its next
    // request fails within a bounded time.
    let mut c = QemuIo::start(&unix_uri(dir, 2, "solo"));
    let r = c.run("read 0 4096");
    assert!(r.contains("read 4096/4096"), "{r}\n{}", store_logs(dir, 30));
    kill(dir, 1, &["tessera-store"]);
    let began = Instant::now();
    let r = c.run("write -P 0x77 0 4096");
    let waited = began.elapsed();
    eprintln!("a write through node2 after the primary's store died: {r:?} after {waited:?}");
    assert!(r.contains("failed"), "{r}\n{}", store_logs(dir, 30));
    assert!(waited < DEAD_PEER_BOUND, "the error took {waited:?}");
    let log = std::fs::read_to_string(dir.join("node2/store.log")).unwrap();
    assert!(
        log.contains("a forwarded request failed"),
        "{}",
        store_logs(dir, 30)
    );

    // With the primary's store dead, the two-copy volume is read through the node
    // holding no copy: forwarded to the other copy's node (node 1's store does not
    // answer), which serves its in-sync copy; the read moves nothing.
    let began = Instant::now();
    assert_eq!(
        read_hash(dir, none, "pair", tmp),
        blake3::hash(&pair),
        "{}",
        store_logs(dir, 30)
    );
    eprintln!(
        "pair read through node{none} with the primary's store dead: {:?}",
        began.elapsed()
    );
    let log = std::fs::read_to_string(dir.join(format!("node{none}/store.log"))).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("forwarding a client's volume")
                && l.contains("pair")
                && l.contains(&format!("127.0.0.{other}:10809"))),
        "{}",
        store_logs(dir, 30)
    );
    let (_, v) = api(ca, 1, "GET", "volumes/pair", Some(t), None);
    assert_eq!(v["node"], id(1).as_str(), "a read moved the primary: {v}");
}

/// A volume a running VM on node 1 uses, its one copy there: a write through node 2 is
/// refused naming the VM, nothing of it lands, and the VM's volume keeps its primary.
fn a_running_vms_volume_is_not_written_through_a_node_without_a_copy(
    ca: &str,
    t: &str,
    dir: &Path,
    tmp: &Path,
    id: &dyn Fn(u8) -> String,
) {
    let _reaper = VmmKiller::of(dir);
    create_volume(ca, t, "vmdisk", SIZE, 1, &id(1));
    start_idle_vm(ca, t, "user", "vmdisk", &id(1), GUEST);
    let f = tmp.join("intruder");
    std::fs::write(&f, vec![0x5au8; MIB as usize]).unwrap();
    assert!(
        !write(dir, 2, "vmdisk", &f),
        "a write through node2 was accepted"
    );
    let log = std::fs::read_to_string(dir.join("node2/store.log")).unwrap();
    assert!(
        log.contains("volume vmdisk is in use by VM user") && log.contains("on node node1"),
        "{}",
        store_logs(dir, 30)
    );
    // Reading it through node 2 is served, and nothing of the refused write is there.
    read_hash(dir, 2, "vmdisk", tmp);
    let head = std::fs::read(tmp.join("read-vmdisk-2")).unwrap();
    assert!(
        !head[..MIB as usize].iter().all(|b| *b == 0x5a),
        "the refused write landed"
    );
    let (_, after) = api(ca, 1, "GET", "volumes/vmdisk", Some(t), None);
    assert_eq!(after["node"], id(1).as_str(), "{after}");
}
