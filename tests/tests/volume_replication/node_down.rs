//! Node 3 killed (its tesserad and store) and brought back: a volume whose replica was
//! there writes on without it; a volume whose primary was there gets a new primary that
//! serves every flushed byte; when node 3 is back both copies there are caught up and
//! rejoin, every copy equal.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::helpers::{
    all_in_sync, call, cli, copy_state, kill_node, payload, read_hash, wait_store, wait_volume,
    write, Cx, Restarted, MIB, SIZE,
};

/// The part; returns the node number of b's new primary.
pub(crate) fn node3_killed_and_back(cx: &Cx, restarted: &mut Restarted) -> u8 {
    let (ca, t, dir, tmp, h) = (
        cx.ca.as_str(),
        cx.t.as_str(),
        cx.dir.as_path(),
        cx.tmp.as_path(),
        cx.home.as_path(),
    );
    let id = |i: u8| cx.id(i);
    // Written through the primary, flushed: every copy, read from its own store, equal.
    // (A write through a replica's node would move the primary there: that is
    // volume_any_node.rs; here the primaries stay where the cluster put them.)
    let (fa, ha) = payload(tmp, "a1", 8 * MIB);
    let (fb, hb) = payload(tmp, "b1", 8 * MIB);
    assert!(write(dir, 1, "a", &fa));
    assert!(write(dir, 3, "b", &fb));
    for i in 1..=3 {
        assert_eq!(read_hash(dir, i, "a", tmp), ha, "copy of a on node{i}");
        assert_eq!(read_hash(dir, i, "b", tmp), hb, "copy of b on node{i}");
    }

    // Node 3 dies: a replica of a, the primary of b.
    let killed = Instant::now();
    let node3 = kill_node(dir, 3);
    // a: writes complete again once node3's copy left the in-sync set.
    let (fa2, ha2) = payload(tmp, "a2", 8 * MIB);
    assert!(
        write(dir, 1, "a", &fa2),
        "a write to a after its replica's node died"
    );
    eprintln!("write to a completed {:?} after the kill", killed.elapsed());
    let a = wait_volume(ca, 2, t, "a", 20, |v| {
        copy_state(v, &id(3)) == "out_of_sync"
    });
    assert!(a["replication"]["generation"].as_u64().unwrap() >= 2, "{a}");
    assert_eq!(copy_state(&a, &id(2)), "in_sync", "{a}");
    // A snapshot now would miss node3's copy: refused, naming it.
    let (c, e) = call(
        ca,
        2,
        "POST",
        "volumes/a/snapshots",
        Some(t),
        Some(&json!({"name": "while-out"})),
    );
    assert_eq!(c, 409, "{e}");
    let e = e["error"].as_str().unwrap();
    assert!(e.contains(&id(3)) && e.contains("out_of_sync"), "{e}");
    for i in 1..=2 {
        assert_eq!(
            read_hash(dir, i, "a", tmp),
            ha2,
            "copy of a on node{i} after the kill"
        );
    }
    // b: an in-sync replica becomes the primary, with a newer generation, and its NBD
    // export serves every byte written and flushed before.
    let b = wait_volume(ca, 2, t, "b", 20, |v| {
        v["replication"]["primary"] != id(3).as_str()
    });
    eprintln!("b's primary moved {:?} after the kill", killed.elapsed());
    let p = b["replication"]["primary"].as_str().unwrap().to_string();
    let (np, other) = if p == id(1) { (1, 2) } else { (2, 1) };
    assert_eq!(p, id(np));
    assert!(b["replication"]["generation"].as_u64().unwrap() >= 2, "{b}");
    assert_eq!(copy_state(&b, &id(3)), "out_of_sync", "{b}");
    assert!(
        b["nbd"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.{np}:")),
        "{b}"
    );
    assert_eq!(
        read_hash(dir, np, "b", tmp),
        hb,
        "b through its new primary"
    );
    // The new primary takes writes (its export became writable) and replicates them.
    let (fb2, hb2) = payload(tmp, "b2", 8 * MIB);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !write(dir, np, "b", &fb2) {
        assert!(
            Instant::now() < deadline,
            "the new primary of b never took a write"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(read_hash(dir, np, "b", tmp), hb2);
    assert_eq!(
        read_hash(dir, other, "b", tmp),
        hb2,
        "b's remaining replica"
    );

    // The CLI shows it.
    let (ok, out, err) = cli(h, &["volume", "show", "b"], "");
    assert!(ok, "{err}");
    assert!(
        out.contains("generation") && out.contains("out_of_sync") && out.contains("in_sync"),
        "{out}"
    );
    assert!(out.contains(&format!("node{np} primary in_sync")), "{out}");

    // Two nodes left: three copies cannot be placed.
    let (c, e) = call(
        ca,
        2,
        "POST",
        "volumes",
        Some(t),
        Some(&json!({"name": "c", "size_bytes": SIZE, "replicas": 3})),
    );
    assert_eq!(c, 507, "{e}");
    assert!(e["error"].as_str().unwrap().contains("replicas"), "{e}");
    // Events say what happened.
    let (_, ev) = call(ca, 2, "GET", "events", Some(t), None);
    let text = ev.to_string();
    assert!(
        text.contains("volume.primary_moved") && text.contains("volume.replica_out_of_sync"),
        "{text}"
    );
    let gen = |v: &Value| v["replication"]["generation"].as_u64().unwrap();
    let (a_before, b_before) = (
        gen(&wait_volume(ca, 2, t, "a", 1, |_| true)),
        gen(&wait_volume(ca, 2, t, "b", 1, |_| true)),
    );

    // Node 3 comes back, its store first. Its copy of b was the primary, fenced by b's
    // failover: before its tesserad configures it, it refuses every write.
    let came_back = Instant::now();
    let store3 = node3
        .iter()
        .find(|a| a[0].ends_with("tessera-store"))
        .unwrap();
    let tesserad3 = node3.iter().find(|a| a[0].ends_with("tesserad")).unwrap();
    restarted.start(dir, 3, store3);
    wait_store(dir, 3, "b");
    let (fb3, _) = payload(tmp, "b3", 4 * MIB);
    assert!(
        !write(dir, 3, "b", &fb3),
        "b's fenced former primary took a write"
    );
    restarted.start(dir, 3, tesserad3);
    // a: node3's copy (a replica that missed a2) is caught up and rejoins. b: the former
    // primary comes back as a replica of the new one, is caught up and rejoins. Both in
    // newer generations, every copy blake3-equal to what was written and flushed.
    for (name, before, h) in [("a", a_before, ha2), ("b", b_before, hb2)] {
        let v = wait_volume(ca, 2, t, name, 60, all_in_sync);
        eprintln!(
            "{name}: every copy in sync {:?} after node3 came back",
            came_back.elapsed()
        );
        assert!(gen(&v) >= before + 2, "catch-up and rejoin raise it: {v}");
        for i in 1..=3 {
            assert_eq!(
                read_hash(dir, i, name, tmp),
                h,
                "copy of {name} on node{i} after node3 came back"
            );
        }
    }
    let b = wait_volume(ca, 2, t, "b", 1, |_| true);
    assert_eq!(b["replication"]["primary"], id(np).as_str(), "{b}");
    // The rejoined copies are in sync again: new writes reach them.
    let (fa3, ha3) = payload(tmp, "a3", 8 * MIB);
    assert!(write(dir, 1, "a", &fa3));
    let (fb4, hb4) = payload(tmp, "b4", 8 * MIB);
    assert!(write(dir, np, "b", &fb4));
    for i in 1..=3 {
        assert_eq!(read_hash(dir, i, "a", tmp), ha3, "a on node{i}");
        assert_eq!(read_hash(dir, i, "b", tmp), hb4, "b on node{i}");
    }
    np
}
