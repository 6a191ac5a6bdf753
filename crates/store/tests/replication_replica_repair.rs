//! A replica's bad block repaired from its primary (issue #8: "a scrub finds and repairs
//! bit rot from a good replica", on a replica's store). The replica asks `Read` of the
//! block on the connection its primary fenced it through, in its own generation, and
//! keeps the answer only where it matches its own checksum.
//!
//! Both ends are tested against a fake other end driven by the test: a real replica's
//! store with a fake primary (refused in another generation, wrong bytes written
//! nowhere, and a replicated write landing while the primary answers keeps the newer
//! data), and a real primary's store with a fake replica (a `Read` in any generation but
//! the primary's own is refused; in it, the primary's bytes come back and a reported
//! repair is listed naming the replica's node). A scrub of three real stores repairing a
//! replica's block is in `replication_repair_copies.rs`.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_blockstore::ScrubReport;
use tessera_pki::ClusterCa;
use tessera_replication::wire::{
    self, Decoder, Generation, Message, RepairOutcome, ReplyError, VolumeName,
};
use tessera_store_admin::{AdminOp, AdminReply};

mod support;
use support::fake_replica::{fake_replica, primary_over_fake};
use support::rot::*;
use support::*;

const SIZE: u64 = 16 * MIB;

fn scrub(n: &Node) -> ScrubReport {
    match n.admin(AdminOp::Scrub {}).unwrap() {
        AdminReply::Scrub(r) => r,
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Waits until `n`'s scrub checks at least `blocks` blocks (the checksums reach the
/// layer's table at the store's checkpoint, every 10 s).
fn wait_checked(n: &Node, blocks: u64) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while scrub(n).blocks_checked < blocks {
        assert!(
            Instant::now() < deadline,
            "{}: the written blocks never reached the table",
            n.id
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The next stream the other end opens on `conn` (at most 20 s).
async fn next_stream(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    tokio::time::timeout(Duration::from_secs(20), conn.accept_bi())
        .await
        .expect("the replica opened no stream to its primary within 20 s")
        .unwrap()
}

/// Reads `recv` to its end (at most 20 s): whether it ended cleanly.
async fn ends(recv: &mut quinn::RecvStream) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), recv.read(&mut buf))
            .await
            .expect("the stream did not end within 20 s")
        {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_its_primarys_bytes_only_in_its_generation_and_never_over_a_newer_write() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-replica-repair").unwrap();
    let (replica, conn, mut send, mut recv) =
        replica_and_fake_primary(root.path(), &ca, SIZE).await;
    let replica = Arc::new(replica);
    let mut d = Decoder::new();
    let v = VolumeName::new("v").unwrap();
    let ok = |seq| Message::Reply {
        seq,
        result: Ok(()),
    };
    // The fence names this connection as the way back to the primary.
    let fence = Message::Fence {
        volume: v.clone(),
        generation: Generation(5),
    };
    assert_eq!(ask(&mut send, &mut recv, &mut d, &fence).await, ok(0));
    let data = pattern("replica-repair", MIB as usize);
    let write = |seq: u64, offset: u64, data: Vec<u8>| Message::Write {
        volume: v.clone(),
        generation: Generation(5),
        seq,
        offset,
        fua: true,
        data,
    };
    assert_eq!(
        ask(&mut send, &mut recv, &mut d, &write(1, 0, data.clone())).await,
        ok(1)
    );
    let off = 64 << 10;
    let good = data[off as usize..(off + B) as usize].to_vec();
    let file = {
        let (n, g) = (replica.clone(), good.clone());
        tokio::task::spawn_blocking(move || {
            wait_checked(&n, 256);
            file_holding(&n, off, &g)
        })
        .await
        .unwrap()
    };
    rot(&file, off);
    let rotten = bytes_at(&file, off, B);
    let start_scrub = || {
        let n = replica.clone();
        tokio::task::spawn_blocking(move || scrub(&n))
    };
    // Answers the replica's `Read` of the block with `reply` (given the request):
    // returns the stream, the read asked checked first.
    let answer = |reply: Box<dyn Fn(u64) -> Message + Send>| {
        let conn = conn.clone();
        let v = v.clone();
        async move {
            let (mut s, mut r) = next_stream(&conn).await;
            let mut d = Decoder::new();
            let asked = next_message(&mut r, &mut d).await;
            let Message::Read {
                volume,
                generation,
                request,
                offset,
                len,
            } = asked
            else {
                panic!("the replica asked {asked:?}, not a read");
            };
            assert_eq!(
                (volume, generation, offset, len),
                (v, Generation(5), off, 4096)
            );
            s.write_all(&wire::encode(&reply(request)).unwrap())
                .await
                .unwrap();
            (s, r, d, request)
        }
    };

    // The primary refuses (it is at a newer generation): nothing written, still bad.
    let scrubbing = start_scrub();
    answer(Box::new(|request| Message::ReadReply {
        request,
        result: Err(ReplyError::StaleGeneration {
            current: Generation(6),
        }),
    }))
    .await;
    let r = scrubbing.await.unwrap();
    assert_eq!(r.bad.len(), 1, "{r:?}");
    assert!(r.repaired.is_empty(), "{r:?}");
    assert_eq!(bytes_at(&file, off, B), rotten, "a refused answer wrote");

    // Bytes that are not the block's (another block's): nothing written, reported.
    let scrubbing = start_scrub();
    let other = data[..B as usize].to_vec();
    let (mut s, mut r, mut rd, request) = answer(Box::new(move |request| Message::ReadReply {
        request,
        result: Ok(other.clone()),
    }))
    .await;
    assert_eq!(
        next_message(&mut r, &mut rd).await,
        Message::RepairReply {
            request,
            result: Ok(RepairOutcome::Mismatch)
        }
    );
    s.finish().unwrap();
    assert!(ends(&mut r).await);
    let r = scrubbing.await.unwrap();
    assert_eq!(r.bad.len(), 1, "{r:?}");
    assert_eq!(bytes_at(&file, off, B), rotten, "wrong bytes were written");

    // A replicated write to the block lands while the primary answers with the bytes it
    // read before it: the newer data stays.
    let scrubbing = start_scrub();
    let newer = pattern("newer", B as usize);
    let (mut s, mut r, mut rd) = {
        let (mut s, mut r) = next_stream(&conn).await;
        let mut d2 = Decoder::new();
        let Message::Read { request, .. } = next_message(&mut r, &mut d2).await else {
            panic!("the replica asked for something else than a read");
        };
        assert_eq!(
            ask(&mut send, &mut recv, &mut d, &write(2, off, newer.clone())).await,
            ok(2)
        );
        let old = Message::ReadReply {
            request,
            result: Ok(good.clone()),
        };
        s.write_all(&wire::encode(&old).unwrap()).await.unwrap();
        (s, r, d2)
    };
    let Message::RepairReply {
        result: Ok(outcome),
        ..
    } = next_message(&mut r, &mut rd).await
    else {
        panic!("no repair report");
    };
    assert_ne!(
        outcome,
        RepairOutcome::Rewritten,
        "old bytes over a newer write"
    );
    s.finish().unwrap();
    assert!(ends(&mut r).await);
    scrubbing.await.unwrap();
    let n = replica.clone();
    let read = tokio::task::spawn_blocking(move || {
        let read = n.read("v", off, B as usize);
        // The old entry leaves the layer's table at the next checkpoint (every 10 s).
        let deadline = Instant::now() + Duration::from_secs(40);
        while !scrub(&n).bad.is_empty() {
            assert!(Instant::now() < deadline, "the bad block stayed listed");
            std::thread::sleep(Duration::from_millis(250));
        }
        read
    })
    .await
    .unwrap();
    assert!(read == newer, "the newer write was lost to the repair");
    let log = std::fs::read_to_string(replica.dir.with_extension("log")).unwrap();
    for words in ["stale generation", "do not match this copy's checksum"] {
        assert!(log.contains(words), "no log line saying {words:?}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_gives_a_replica_a_block_only_in_its_own_generation() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-primary-gives").unwrap();
    let (fake, mut fenced) =
        fake_replica(root.path(), &ca, "node2", Arc::new(|_: Message| None)).await;
    let data = pattern("gives", MIB as usize);
    let primary = {
        let (root, ca, data) = (root.path().to_path_buf(), ca.clone(), data.clone());
        tokio::task::spawn_blocking(move || {
            primary_over_fake(&root, &ca, "node2", fake, SIZE, &data)
        })
        .await
        .unwrap()
    };
    let link = tokio::time::timeout(Duration::from_secs(20), fenced.recv())
        .await
        .expect("the primary fenced nothing")
        .unwrap();
    let (mut s, mut r) = link.open_bi().await.unwrap();
    let mut d = Decoder::new();
    let v = VolumeName::new("v").unwrap();
    let read = |generation: u64, request: u64, volume: &VolumeName| Message::Read {
        volume: volume.clone(),
        generation: Generation(generation),
        request,
        offset: 64 << 10,
        len: 4096,
    };
    // An older generation: refused with the current one.
    assert_eq!(
        ask(&mut s, &mut r, &mut d, &read(1, 1, &v)).await,
        Message::ReadReply {
            request: 1,
            result: Err(ReplyError::StaleGeneration {
                current: Generation(2)
            })
        }
    );
    // A newer one: this primary is fenced; another volume: not this link's.
    for (request, m, words) in [
        (2, read(3, 2, &v), "fenced"),
        (3, read(2, 3, &VolumeName::new("w").unwrap()), "not w's"),
    ] {
        match ask(&mut s, &mut r, &mut d, &m).await {
            Message::ReadReply {
                request: got,
                result: Err(ReplyError::Io(why)),
            } if got == request => assert!(why.contains(words), "{why}"),
            other => panic!("{m:?} answered {other:?}"),
        }
    }
    assert_eq!(
        ask(&mut s, &mut r, &mut d, &read(2, 4, &v)).await,
        Message::ReadReply {
            request: 4,
            result: Ok(data[64 << 10..(64 << 10) + 4096].to_vec())
        }
    );
    // The replica reports the block rewritten: listed, naming its node.
    let report = Message::RepairReply {
        request: 4,
        result: Ok(RepairOutcome::Rewritten),
    };
    s.write_all(&wire::encode(&report).unwrap()).await.unwrap();
    s.finish().unwrap();
    assert!(ends(&mut r).await, "the primary did not end the stream");
    // A report of a repair it gave no bytes for: the stream is refused, nothing listed.
    let (mut s, mut r) = link.open_bi().await.unwrap();
    let bogus = Message::RepairReply {
        request: 9,
        result: Ok(RepairOutcome::Rewritten),
    };
    s.write_all(&wire::encode(&bogus).unwrap()).await.unwrap();
    assert!(!ends(&mut r).await, "a bogus report was taken");
    let s = tokio::task::spawn_blocking(move || {
        let s = status(&primary);
        (s, primary)
    })
    .await
    .unwrap();
    let (status, primary) = s;
    assert_eq!(status.repaired_blocks, 1, "{status:?}");
    let rep = &status.repairs[0];
    assert_eq!(
        (rep.offset, rep.len, rep.from.as_str(), rep.on.as_deref()),
        (64 << 10, B, "primary", Some("node2")),
        "{status:?}"
    );
    let log = std::fs::read_to_string(primary.dir.with_extension("log")).unwrap();
    for words in [
        "older generation: refused",
        "newer generation",
        "repair stream refused",
    ] {
        assert!(log.contains(words), "no log line saying {words:?}:\n{log}");
    }
    tokio::task::spawn_blocking(move || drop(primary))
        .await
        .unwrap();
}
