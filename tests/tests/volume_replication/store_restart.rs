//! A replica's store killed and restarted while its node stays up (the first write after
//! it once failed with EIO, issue #8): the restarted copy refuses writes until caught up;
//! the primary reports it failed at once, the cluster takes it out of the in-sync set and
//! the write completes, then the copy is caught up and rejoins.

use std::time::Instant;

use serde_json::Value;

use super::helpers::{
    all_in_sync, call, kill, payload, read_hash, wait_store, wait_volume, write, Cx, Restarted, MIB,
};

pub(crate) fn replica_store_restarted(cx: &Cx, restarted: &mut Restarted) {
    let (ca, t, dir, tmp) = (
        cx.ca.as_str(),
        cx.t.as_str(),
        cx.dir.as_path(),
        cx.tmp.as_path(),
    );
    let id = |i: u8| cx.id(i);
    let gen = |v: &Value| v["replication"]["generation"].as_u64().unwrap();
    // A store restarted under a replica while its node stays up: the restarted copy may
    // have lost unflushed writes and refuses writes; the primary reports it failed, the
    // cluster takes it out of the in-sync set (the write completes), catches it up and
    // puts it back.
    let a_before = gen(&wait_volume(ca, 2, t, "a", 1, |_| true));
    let store2 = kill(dir, 2, &["tessera-store"]);
    restarted.start(dir, 2, &store2[0]);
    wait_store(dir, 2, "a");
    let (fa4, ha4) = payload(tmp, "a4", 8 * MIB);
    let written = Instant::now();
    // The primary hears the restarted store refuse the write at once (the old QUIC
    // connection is reset), reports it failed, and the write waits until the cluster
    // took the copy out of the in-sync set: a delay, never an error.
    assert!(
        write(dir, 1, "a", &fa4),
        "a write with a replica's store restarted failed"
    );
    eprintln!(
        "write to a completed {:?} after its replica's store restarted",
        written.elapsed()
    );
    let v = wait_volume(ca, 2, t, "a", 60, |v| {
        all_in_sync(v) && gen(v) >= a_before + 3
    });
    eprintln!("a: in sync again {:?} after the write", written.elapsed());
    assert_eq!(v["replication"]["primary"], id(1).as_str(), "{v}");
    for i in 1..=3 {
        assert_eq!(read_hash(dir, i, "a", tmp), ha4, "a on node{i}");
    }
    let (_, ev) = call(ca, 2, "GET", "events", Some(t), None);
    let text = ev.to_string();
    for kind in [
        "the primary reported the copies on",
        "volume.catch_up_started",
        "volume.replica_in_sync",
        "volume.replica_joined",
    ] {
        assert!(text.contains(kind), "no {kind}: {text}");
    }
    // A primary's node raises a generation once per restart of its role, not every round
    // (it once ran away by thousands, pushing every other event out of the list).
    let raised = ev.as_array().map_or(0, |a| {
        a.iter()
            .filter(|e| e["kind"] == "volume.generation_raised")
            .count()
    });
    assert!(
        raised <= 10,
        "{raised} generation raises among the last events: {text}"
    );
}
