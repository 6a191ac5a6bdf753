//! Forwarding through a node holding no copy (issue #8) when the store forwarded to goes
//! away, and after a resize, on a four-node dev cluster: a three-copy volume whose
//! primary is node 1, a qemu-io client connected through the node holding no copy (it
//! stays connected the whole test, one NBD connection).
//!
//! 1. The primary's store restarted: the same client's next write and read go through
//!    (at most one EIO on the way), within a bound, and land.
//! 2. The volume grown: a new connection through that node sees the new size and writes
//!    past the old end at once; the old connection keeps the size it negotiated and
//!    goes on within it.
//! 3. The primary's store killed for good: the same client's writes go on through the
//!    cluster's new primary (an in-sync copy's node, generation raised), each either
//!    acknowledged or failed, never acknowledged unless on the copies in sync; nbdcopy
//!    through that node writes too. After node 1's store is back and caught up, every
//!    acknowledged write is there and every copy is blake3-identical.
//! 4. Fenced: a client through that node writes, then another client takes the primary
//!    through another copy's node: the first client's next write is refused (`EPERM`,
//!    the old primary's store's words in the forwarding store's log) and its reads go
//!    on. The same across a reconnect: a client's forwarded connection breaks (the
//!    primary's store restarts), another client moves the primary while the copy it
//!    wrote through stays in sync, and its next write, connecting again, is refused by
//!    the forwarding store itself. Nothing of either refused write lands (every copy is
//!    blake3-equal to the acknowledged writes), and a new connection writes.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::cluster::wait_for;
use tessera_tests::devcluster::{api, node_id, DevCluster};
use tessera_tests::replicas::{
    all_in_sync, copy_nodes, create_volume, kill, read_hash, serves, unix_uri, wait_task,
    wait_volume, wait_volume_moving, write, QemuIo, Restarted,
};
use tessera_tests::{output, require};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 16 * MIB;
const GROWN: u64 = 24 * MIB;
/// How long one request through the forwarding node may take while the store it was
/// forwarded to is gone: the silence bound (5 s), a connect attempt on the dead store
/// (5 s), the move of the primary and the new primary dropping the dead copy from the
/// in-sync set, with room for a loaded machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(60);

/// The last lines of every node's store log, for a failure's message.
fn logs(dir: &Path) -> String {
    let mut s = String::new();
    for i in 1..=4 {
        let text =
            std::fs::read_to_string(dir.join(format!("node{i}/store.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        s += &format!("--- node{i}/store.log:\n");
        for l in &all[all.len().saturating_sub(25)..] {
            s += l;
            s.push('\n');
        }
    }
    s
}

/// What the volume must hold: every acknowledged write applied in order.
struct Model(Vec<u8>);

impl Model {
    fn fill(&mut self, offset: u64, len: u64, byte: u8) {
        self.0[offset as usize..(offset + len) as usize].fill(byte);
    }
}

/// Runs qemu-io's `write -P byte offset len` on `c` until it is acknowledged, at most
/// `tries` times; how many failed before, and how long it took in all. Each failure is
/// an unacknowledged write: the model is changed only by the acknowledged one.
fn write_pattern(
    c: &mut QemuIo,
    m: &mut Model,
    (offset, len, byte): (u64, u64, u8),
    tries: u32,
    dir: &Path,
) -> (u32, Duration) {
    let began = Instant::now();
    for failed in 0..tries {
        let r = c.run(&format!("write -P {byte} {offset} {len}"));
        if r.contains(&format!("wrote {len}/{len}")) {
            m.fill(offset, len, byte);
            return (failed, began.elapsed());
        }
        eprintln!(
            "write -P {byte} {offset} {len} failed ({r:?}) after {:?}",
            began.elapsed()
        );
        assert!(r.contains("failed"), "{r}\n{}", logs(dir));
    }
    panic!(
        "write -P {byte} {offset} {len} failed {tries} times\n{}",
        logs(dir)
    );
}

/// Reads `len` bytes at `offset` on `c` and asserts they are all `byte`.
fn read_pattern(c: &mut QemuIo, (offset, len, byte): (u64, u64, u8), dir: &Path) {
    let r = c.run(&format!("read -P {byte} {offset} {len}"));
    assert!(
        r.contains(&format!("read {len}/{len}")),
        "{r}\n{}",
        logs(dir)
    );
}

#[test]
fn a_forwarded_client_survives_its_primarys_store_restarting_dying_and_a_resize() {
    for tool in ["curl", "nbdcopy", "nbdinfo", "qemu-io", "stdbuf"] {
        require(tool);
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let cluster = DevCluster::start_nodes(dir, 4);
    let ca = cluster.ca_file();
    let token = cluster.admin_session(1, "volume forward failover admin password");
    let (ca, t) = (ca.as_str(), token.as_str());
    let nodes = wait_for("four nodes with healthy stores", 60, || {
        let (_, n) = api(ca, 1, "GET", "nodes", Some(t), None);
        n.as_array()
            .is_some_and(|l| l.len() == 4 && l.iter().all(|n| n["storage"]["state"] == "ok"))
            .then_some(n)
    });
    let id = |i: u8| node_id(&nodes, i);
    let num = |node: &str| (1..=4u8).find(|i| id(*i) == node).unwrap();
    let v = create_volume(ca, t, "v", SIZE, 3, &id(1));
    let held: Vec<u8> = copy_nodes(&v).iter().map(|n| num(n)).collect();
    let none = (1..=4u8).find(|i| !held.contains(i)).unwrap();
    let generation = v["replication"]["generation"].as_u64().unwrap();
    eprintln!("copies on nodes {held:?}, node{none} holds none, generation {generation}");

    let mut m = Model(vec![0u8; SIZE as usize]);
    let mut c = QemuIo::start(&unix_uri(dir, none, "v"));
    write_pattern(&mut c, &mut m, (0, MIB, 0x11), 1, dir);
    read_pattern(&mut c, (0, MIB, 0x11), dir);

    // 1. The primary's store restarts under the client's connection.
    let mut restarted = Restarted::default();
    let argv = kill(dir, 1, &["tessera-store"]);
    restarted.start(dir, 1, &argv[0]);
    wait_for("node1's store serving v again", 60, || {
        serves(dir, 1, "v").then_some(())
    });
    let (failed, took) = write_pattern(&mut c, &mut m, (MIB, MIB, 0x22), 2, dir);
    eprintln!("a write after the primary's store restarted: {failed} EIO, {took:?}");
    assert!(took < FAILOVER_BOUND, "{took:?}");
    read_pattern(&mut c, (0, MIB, 0x11), dir);
    read_pattern(&mut c, (MIB, MIB, 0x22), dir);
    let log = std::fs::read_to_string(dir.join(format!("node{none}/store.log"))).unwrap();
    assert!(
        log.contains("the forwarded connection is made again"),
        "{}",
        logs(dir)
    );

    // 2. Grown: a new connection through node `none` writes past the old end at once.
    let (code, task) = api(
        ca,
        1,
        "POST",
        "volumes/v/resize",
        Some(t),
        Some(&json!({"size_bytes": GROWN})),
    );
    assert_eq!(code, 202, "{task}");
    assert_eq!(wait_task(ca, 1, t, &task)["state"], "succeeded");
    m.0.resize(GROWN as usize, 0);
    let out = output(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(unix_uri(dir, none, "v")),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        GROWN.to_string(),
        "{}",
        logs(dir)
    );
    let mut fresh = QemuIo::start(&unix_uri(dir, none, "v"));
    write_pattern(&mut fresh, &mut m, (SIZE, MIB, 0x33), 1, dir);
    read_pattern(&mut fresh, (SIZE, MIB, 0x33), dir);
    drop(fresh);
    // The old connection negotiated 16 MiB: qemu-io keeps to it, and within it the
    // connection goes on.
    let r = c.run(&format!("read {SIZE} 4096"));
    assert!(!r.contains("read 4096/4096"), "{r}");
    write_pattern(&mut c, &mut m, (2 * MIB, MIB, 0x44), 1, dir);

    // 3. The primary's store dies for good: the client's writes go on through the
    // cluster's new primary.
    kill(dir, 1, &["tessera-store"]);
    let (failed, took) = write_pattern(&mut c, &mut m, (3 * MIB, MIB, 0x55), 2, dir);
    eprintln!("a write after the primary's store died: {failed} EIO, {took:?}");
    assert!(took < FAILOVER_BOUND, "{took:?}");
    for (i, byte) in [(4u64, 0x66u8), (5, 0x77)] {
        write_pattern(&mut c, &mut m, (i * MIB, MIB, byte), 1, dir);
    }
    read_pattern(&mut c, (3 * MIB, MIB, 0x55), dir);
    let moved = wait_volume(ca, 2, t, "v", 60, |v| {
        v["node"] != id(1).as_str() && v["replication"]["generation"].as_u64() > Some(generation)
    });
    let primary = num(moved["node"].as_str().unwrap());
    assert!(held.contains(&primary), "{moved}");
    // nbdcopy through node `none` (a new connection) writes the rest.
    let payload: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    let p = tmp.join("payload");
    std::fs::write(&p, &payload).unwrap();
    assert!(write(dir, none, "v", &p), "{}", logs(dir));
    m.0[..payload.len()].copy_from_slice(&payload);
    write_pattern(&mut c, &mut m, (10 * MIB, MIB, 0x88), 1, dir);
    drop(c);

    // Healed: node 1's store back, every copy in sync, each one holds every write.
    restarted.start(dir, 1, &argv[0]);
    let healed = wait_volume_moving(ca, 2, t, "v", 60, all_in_sync);
    eprintln!("healed: {healed}");
    let want = blake3::hash(&m.0);
    for i in held.iter().copied().chain([none]) {
        assert_eq!(
            read_hash(dir, i, "v", tmp),
            want,
            "v read through node{i}\n{}",
            logs(dir)
        );
    }

    // 4. Fenced: another writer takes the primary through another copy's node, and the
    // forwarded client that wrote before is refused, on its connection (the old
    // primary's store refuses it) and across a reconnect (the forwarding store does).
    let fencing = Instant::now();
    let p = num(healed["node"].as_str().unwrap());
    let others: Vec<u8> = held.iter().copied().filter(|i| *i != p).collect();
    let (q, r) = (others[0], others[1]);
    let mut f = QemuIo::start(&unix_uri(dir, none, "v"));
    write_pattern(&mut f, &mut m, (11 * MIB, MIB, 0x99), 1, dir);
    take_primary(&mut m, (ca, t, dir), q, &id(q), (12 * MIB, 0xaa));
    let said = refused(&mut f, (11 * MIB, 0xbb), dir, none);
    assert!(
        said.contains("its primary moved to another node after this client wrote here")
            && said.contains(&format!("node node{p}'s store")),
        "{said}"
    );
    // Its reads are served, and nothing of the refused write is there.
    read_pattern(&mut f, (11 * MIB, MIB, 0x99), dir);

    // A client whose forwarded connection breaks (the primary's store restarts), and
    // whose primary another writer moves while it is down, the copy it wrote through
    // staying in sync: refused when its next write connects again.
    let mut g = QemuIo::start(&unix_uri(dir, none, "v"));
    write_pattern(&mut g, &mut m, (13 * MIB, MIB, 0xcc), 1, dir);
    let argv_q = kill(dir, q, &["tessera-store"]);
    restarted.start(dir, q, &argv_q[0]);
    wait_for(&format!("node{q}'s store serving v again"), 60, || {
        serves(dir, q, "v").then_some(())
    });
    wait_volume_moving(ca, 2, t, "v", 60, |v| {
        all_in_sync(v) && v["node"] == id(q).as_str()
    });
    take_primary(&mut m, (ca, t, dir), r, &id(r), (14 * MIB, 0xdd));
    // What this part is about: the copy the client wrote through is still in sync
    // (had it left the in-sync set, the move would be the cluster's failover, and the
    // client would rightly go on).
    let (_, moved) = api(ca, 2, "GET", "volumes/v", Some(t), None);
    assert!(
        all_in_sync(&moved),
        "node{q}'s copy left the in-sync set: {moved}"
    );
    let said = refused(&mut g, (13 * MIB, 0xee), dir, none);
    assert!(
        said.contains(&format!(
            "its primary moved to node node{r} after this client wrote through node node{q}"
        )),
        "{said}"
    );
    read_pattern(&mut g, (13 * MIB, MIB, 0xcc), dir);
    drop((f, g));

    // A new connection through that node writes, and every copy holds exactly the
    // acknowledged writes.
    let mut fresh = QemuIo::start(&unix_uri(dir, none, "v"));
    write_pattern(&mut fresh, &mut m, (15 * MIB, MIB, 0x5a), 1, dir);
    drop(fresh);
    wait_volume_moving(ca, 2, t, "v", 60, all_in_sync);
    let want = blake3::hash(&m.0);
    for i in held.iter().copied().chain([none]) {
        assert_eq!(
            read_hash(dir, i, "v", tmp),
            want,
            "v read through node{i} after the fenced writes\n{}",
            logs(dir)
        );
    }
    eprintln!("the fencing phase took {:?}", fencing.elapsed());
}

/// Writes `byte` over the MiB at `at` through node `i` (id `node`), holding a copy: its
/// first write makes that node the primary through the cluster (the API shows it).
fn take_primary(
    m: &mut Model,
    (ca, t, dir): (&str, &str, &Path),
    i: u8,
    node: &str,
    (at, byte): (u64, u8),
) {
    let mut c = QemuIo::start(&unix_uri(dir, i, "v"));
    write_pattern(&mut c, m, (at, MIB, byte), 1, dir);
    wait_volume(ca, 2, t, "v", 30, |v| v["node"] == node);
}

/// Writes `byte` over the MiB at `at` on `c`, a client through node `none`, and asserts
/// it is refused as fenced (`EPERM`); the reason the forwarding store logged.
fn refused(c: &mut QemuIo, (at, byte): (u64, u8), dir: &Path, none: u8) -> String {
    let log = dir.join(format!("node{none}/store.log"));
    let seen = std::fs::read_to_string(&log).unwrap().len();
    let r = c.run(&format!("write -P {byte} {at} {MIB}"));
    assert!(
        r.contains("failed") && r.contains("Operation not permitted"),
        "{r}\n{}",
        logs(dir)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let said = text[seen..]
        .lines()
        .find(|l| l.contains("a forwarded request failed") || l.contains("is fenced"))
        .unwrap_or_else(|| panic!("node{none}'s store logged no refusal\n{}", logs(dir)));
    eprintln!("refused: {r}; node{none}'s store: {said}");
    said.to_string()
}
