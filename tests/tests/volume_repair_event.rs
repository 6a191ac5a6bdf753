//! A bad block on a replicated volume's primary copy, on the README's local three-node
//! cluster (issue #8: "a checksum failure on read is repaired from another replica,
//! logged as an event, and the read succeeds"). A volume of three copies is written
//! through its primary's store with nbdcopy; one bit of a block is flipped in the
//! primary's layer file behind the store's back; `qemu-img` reads the volume through the
//! primary and gets exactly what was written; the primary's file holds the good bytes
//! again; and the cluster's event list (`GET /events`, curl) holds a `volume.repaired`
//! event naming the volume, the offset and the node whose copy was good (by its name in
//! the message, by its id in the event's `nodes`). Then a block flipped on a replica's
//! copy (node2), met by a read of node2's own export, is repaired from the primary and
//! makes a second event naming node2 (the repaired copy's node) and node1 (the primary's,
//! where the bytes came from), both by name in the message and by id in `nodes`.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;

use serde_json::{json, Value};
use tessera_tests::bitrot::{bytes_at, layer_file_holding, rot};
use tessera_tests::cluster::wait_for;
use tessera_tests::devcluster::{api, node_dir, node_id, wait_nodes, DevCluster};
use tessera_tests::{require, run};

const MIB: u64 = 1 << 20;
const B: u64 = 4096;
/// Where the rot goes: inside the data written, not on its first block.
const BAD: u64 = MIB + 3 * B;

/// Bytes that differ in every block, so a block read from the wrong place shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(blake3::hash(&i.to_le_bytes()).as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

#[test]
fn a_bad_block_on_the_primary_is_repaired_and_the_cluster_records_a_volume_repaired_event() {
    require("curl");
    require("nbdcopy");
    require("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let cluster = DevCluster::start(dir);
    let ca = cluster.ca_file();
    let t = cluster.admin_session(1, "volume repair event admin password");
    let t = t.as_str();
    let nodes = wait_nodes(&ca, 1, t, 60, |n| n["storage"]["state"] == "ok");

    // Three copies, the primary on node1.
    let body = json!({"name": "rv", "size_bytes": 16 * MIB, "replicas": 3,
        "node": node_id(&nodes, 1)});
    let (code, task) = api(&ca, 1, "POST", "volumes", Some(t), Some(&body));
    assert_eq!(code, 202, "{task}");
    let v = wait_for("volume rv with three copies in sync", 60, || {
        let (c, v) = api(&ca, 1, "GET", "volumes/rv", Some(t), None);
        let copies = v["replication"]["copies"].as_array().cloned()?;
        (c == 200
            && v["state"] == "ready"
            && copies.len() == 3
            && copies.iter().all(|c| c["state"] == "in_sync"))
        .then_some(v)
    });
    assert_eq!(v["replication"]["primary"], node_id(&nodes, 1), "{v}");

    let data = pattern((4 * MIB) as usize);
    let src = dir.join("data.img");
    std::fs::write(&src, &data).unwrap();
    let uri = |i: u8| {
        format!(
            "nbd+unix:///rv?socket={}",
            node_dir(dir, i).join("store/nbd.sock").display()
        )
    };
    run(Command::new("nbdcopy").arg("--flush").arg(&src).arg(uri(1)));

    // The written block reaches the primary's layer file (from its log if need be).
    let good = &data[BAD as usize..(BAD + B) as usize];
    let file = wait_for("the block in node1's layer file", 30, || {
        layer_file_holding(&node_dir(dir, 1).join("store/layers"), BAD, good)
    });
    rot(&file, BAD);
    assert_ne!(
        bytes_at(&file, BAD, B),
        good,
        "the rot did not reach the file"
    );

    // A client we did not write reads through the primary: what was written.
    let out = dir.join("read.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri(1))
        .arg(&out));
    let read = std::fs::read(&out).unwrap();
    assert!(
        read[..data.len()] == data[..],
        "the read returned other bytes than were written"
    );
    assert_eq!(
        bytes_at(&file, BAD, B),
        good,
        "node1's block was not repaired"
    );

    // The event, through another node's API.
    let (n2, n3) = (node_id(&nodes, 2), node_id(&nodes, 3));
    let ev: Value = wait_for("a volume.repaired event for rv", 60, || {
        let (c, all) = api(&ca, 2, "GET", "events?limit=1000", Some(t), None);
        assert_eq!(c, 200, "{all}");
        all.as_array()?
            .iter()
            .find(|e| e["kind"] == "volume.repaired" && e["target"] == "rv")
            .cloned()
    });
    let msg = ev["message"].as_str().unwrap();
    assert!(msg.contains(&format!("at offset {BAD} ")), "{ev}");
    assert!(msg.contains("volume rv"), "{ev}");
    // The message names the good copy's node by its name (the store reports it by its
    // certificate name, 16 hex digits); the event's `nodes` holds its id.
    let good = if msg.contains("node node2") { &n2 } else { &n3 };
    assert!(
        msg.contains("node node2") || msg.contains("node node3"),
        "the event names neither replica's node by name: {ev}"
    );
    assert!(
        !msg.contains(&good[..16]),
        "the message holds a node id: {ev}"
    );
    assert_eq!(ev["nodes"], json!([good]), "{ev}");
    assert_eq!(ev["user"], "tesserad", "{ev}");
    // One block went bad: one event, however often tesserad polled since.
    let (_, all) = api(&ca, 2, "GET", "events?limit=1000", Some(t), None);
    let count = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "volume.repaired")
        .count();
    assert_eq!(count, 1, "{all}");

    // A bad block on a replica's copy (node2), met by a client reading node2's own
    // export: node2's store asks the primary for the block, the read gets what was
    // written, node2's file holds it again, and the event names node2 as the node whose
    // copy was repaired and node1, the primary's, as the source.
    let bad2 = 2 * MIB + 5 * B;
    let good2 = &data[bad2 as usize..(bad2 + B) as usize];
    let file2 = wait_for("the block in node2's layer file", 30, || {
        layer_file_holding(&node_dir(dir, 2).join("store/layers"), bad2, good2)
    });
    rot(&file2, bad2);
    let out2 = dir.join("read2.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri(2))
        .arg(&out2));
    let read2 = std::fs::read(&out2).unwrap();
    assert!(
        read2[..data.len()] == data[..],
        "the read of node2's copy returned other bytes than were written"
    );
    assert_eq!(
        bytes_at(&file2, bad2, B),
        good2,
        "node2's block was not repaired"
    );
    let ev2: Value = wait_for("a volume.repaired event for node2's copy", 60, || {
        let (c, all) = api(&ca, 3, "GET", "events?limit=1000", Some(t), None);
        assert_eq!(c, 200, "{all}");
        all.as_array()?
            .iter()
            .find(|e| {
                e["kind"] == "volume.repaired"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&format!("at offset {bad2} ")))
            })
            .cloned()
    });
    let msg2 = ev2["message"].as_str().unwrap();
    assert!(msg2.contains("on the copy on node node2"), "{ev2}");
    assert!(
        msg2.contains("from the primary's copy on node node1"),
        "{ev2}"
    );
    let n1 = node_id(&nodes, 1);
    assert!(
        !msg2.contains(&n1[..16]),
        "the message holds a node id: {ev2}"
    );
    assert_eq!(ev2["nodes"], json!([n2, n1]), "{ev2}");
    cluster.stop();
}
