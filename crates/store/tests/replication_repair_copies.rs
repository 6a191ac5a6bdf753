//! Repairs beyond the primary's own volume blocks (issue #8): a replica's copy that fails
//! its checksum where the primary's read meets it gets the primary's good bytes; a read
//! of a snapshot export (`v@s`) through the primary repairs the snapshot's block from a
//! replica's snapshot; and a replica's store takes a `Repair` only in the primary's
//! generation and only with bytes matching its own checksum, and reports a bad block to a
//! digest comparison (a catch-up) as differing instead of failing it. A scrub repairs
//! bad blocks on the primary's copy and on a replica's (from the primary). Bytes of the layer
//! files are flipped behind the stores' backs; reads are by `qemu-img`.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::time::Duration;

use tessera_pki::ClusterCa;
use tessera_replication::wire::{
    Decoder, Generation, Message, RepairOutcome, ReplyError, VolumeName,
};
use tessera_store_admin::AdminOp;

mod support;
use support::rot::*;
use support::*;

const SIZE: u64 = 16 * MIB;

fn write_through(root: &std::path::Path, n: &Node, name: &str, data: &[u8]) {
    let src = root.join(name);
    std::fs::write(&src, data).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(n.uri("v")));
}

#[test]
fn a_replicas_bad_block_met_by_the_primarys_repair_gets_the_primarys_bytes() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-repair-copies").unwrap();
    let nodes = three_copies(root.path(), &ca, "v", SIZE);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let data = pattern("copies", (2 * MIB) as usize);
    write_through(root.path(), n1, "data.img", &data);

    // The same block rots on the primary and on node2 (asked first): node3's copy is
    // the good one.
    let off = 256 << 10;
    let good = &data[off as usize..(off + B) as usize];
    let files: Vec<_> = nodes.iter().map(|n| file_holding(n, off, good)).collect();
    rot(&files[0], off);
    rot(&files[1], off);
    let n3_before = std::fs::read(&files[2]).unwrap();

    let got = qemu_read(root.path(), n1, "v", off, B).unwrap();
    assert_eq!(got, good, "the read returned other bytes than were written");
    assert_eq!(
        bytes_at(&files[0], off, B),
        good,
        "the primary was not repaired"
    );
    assert_eq!(
        bytes_at(&files[1], off, B),
        good,
        "node2's copy was not repaired"
    );
    assert_eq!(
        std::fs::read(&files[2]).unwrap(),
        n3_before,
        "node3's good copy was written"
    );
    // node2's copy reads well on its own now.
    assert_eq!(n2.read("v", off, B as usize), good);
    let s = status(n1);
    assert_eq!(s.repaired_blocks, 2, "{s:?}");
    assert!(
        s.repairs
            .iter()
            .any(|r| r.offset == off && r.from == "node3" && r.on.is_none()),
        "{s:?}"
    );
    assert!(
        s.repairs
            .iter()
            .any(|r| r.offset == off && r.from == "primary" && r.on.as_deref() == Some("node2")),
        "{s:?}"
    );
    let log = std::fs::read_to_string(n2.dir.with_extension("log")).unwrap();
    assert!(
        log.contains("repaired with the primary's bytes"),
        "node2 logged no repair:\n{log}"
    );
}

#[test]
fn a_bad_block_of_a_snapshot_read_through_the_primary_is_repaired_from_a_replica() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-repair-snapshot").unwrap();
    let nodes = three_copies(root.path(), &ca, "v", SIZE);
    let n1 = &nodes[0];
    let old = pattern("before", (2 * MIB) as usize);
    write_through(root.path(), n1, "old.img", &old);
    n1.admin(AdminOp::CreateSnapshot {
        volume: "v".into(),
        snapshot: "s".into(),
    })
    .unwrap();
    // The head moves on over the same range: the snapshot's layer keeps the old bytes.
    let new = pattern("after", (2 * MIB) as usize);
    write_through(root.path(), n1, "new.img", &new);

    let off = MIB + 5 * B;
    let old_block = &old[off as usize..(off + B) as usize];
    let file = file_holding(n1, off, old_block);
    rot(&file, off);
    let got = qemu_read(root.path(), n1, "v@s", off, B).unwrap();
    assert_eq!(got, old_block, "the snapshot read returned other bytes");
    assert_eq!(
        bytes_at(&file, off, B),
        old_block,
        "not repaired in its layer"
    );
    // The head still reads what was written last.
    let head = qemu_read(root.path(), n1, "v", off, B).unwrap();
    assert_eq!(head, &new[off as usize..(off + B) as usize]);
    let s = status(n1);
    assert_eq!(s.repaired_blocks, 1, "{s:?}");
    let r = &s.repairs[0];
    assert_eq!(
        (r.offset, r.snapshot.as_deref(), r.on.as_deref()),
        (off, Some("s"), None),
        "{s:?}"
    );
    assert!(r.from == "node2" || r.from == "node3", "{s:?}");

    // Bad on every copy of the snapshot: EIO, nothing written.
    let off = 3 * B;
    let block = &old[off as usize..(off + B) as usize];
    for n in &nodes {
        rot(&file_holding(n, off, block), off);
    }
    let rotten = bytes_at(&file, off, B);
    let err = qemu_read(root.path(), n1, "v@s", off, B).expect_err("read a block bad everywhere");
    assert!(err.contains("Input/output error"), "{err}");
    assert_eq!(bytes_at(&file, off, B), rotten);
    assert_eq!(status(n1).repaired_blocks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_a_repair_only_in_its_generation_and_only_with_matching_bytes() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-repair-replica").unwrap();
    let (replica, _conn, mut send, mut recv) =
        replica_and_fake_primary(root.path(), &ca, SIZE).await;
    let mut d = Decoder::new();
    let v = VolumeName::new("v").unwrap();
    let data = pattern("replica", (MIB) as usize);
    let write = |seq: u64, data: Vec<u8>| Message::Write {
        volume: v.clone(),
        generation: Generation(5),
        seq,
        offset: 0,
        fua: true,
        data,
    };
    let ok = |seq| Message::Reply {
        seq,
        result: Ok(()),
    };
    assert_eq!(
        ask(&mut send, &mut recv, &mut d, &write(1, data.clone())).await,
        ok(1)
    );
    let off = 64 << 10;
    let good = data[off as usize..(off + B) as usize].to_vec();
    let file = {
        let (n, g) = (&replica, good.clone());
        tokio::task::block_in_place(|| file_holding(n, off, &g))
    };
    rot(&file, off);
    let rotten = bytes_at(&file, off, B);

    // A digest comparison over the bad block: answered, the block marked as differing.
    let digests = ask(
        &mut send,
        &mut recv,
        &mut d,
        &Message::Digests {
            volume: v.clone(),
            generation: Generation(5),
            request: 1,
            offset: off - B,
            blocks: 3,
        },
    )
    .await;
    let Message::DigestsReply {
        request: 1,
        result: Ok(got),
    } = digests
    else {
        panic!("digests of a range with a bad block refused: {digests:?}");
    };
    let hash = |o: u64| *blake3::hash(&data[o as usize..(o + B) as usize]).as_bytes();
    assert_eq!(got, vec![hash(off - B), [0u8; 32], hash(off + B)]);

    let repair = |generation: u64, request: u64, offset: u64, data: Vec<u8>| Message::Repair {
        volume: v.clone(),
        generation: Generation(generation),
        request,
        snapshot: None,
        offset,
        data,
    };
    // An older generation: refused, nothing written.
    let r = ask(
        &mut send,
        &mut recv,
        &mut d,
        &repair(4, 2, off, good.clone()),
    )
    .await;
    assert_eq!(
        r,
        Message::RepairReply {
            request: 2,
            result: Err(ReplyError::StaleGeneration {
                current: Generation(5)
            })
        }
    );
    assert_eq!(bytes_at(&file, off, B), rotten, "a stale repair wrote");
    // Bytes that are not the block's (another block's, or a bit off): nothing written.
    let mut wrong = good.clone();
    wrong[7] ^= 1;
    let other = data[..B as usize].to_vec();
    for (request, bytes) in [(3, wrong), (4, other)] {
        let r = ask(
            &mut send,
            &mut recv,
            &mut d,
            &repair(5, request, off, bytes),
        )
        .await;
        assert_eq!(
            r,
            Message::RepairReply {
                request,
                result: Ok(RepairOutcome::Mismatch)
            }
        );
        assert_eq!(bytes_at(&file, off, B), rotten, "wrong bytes were written");
    }
    // A block that reads well is left alone, even given its own bytes.
    let fine = data[..B as usize].to_vec();
    let r = ask(&mut send, &mut recv, &mut d, &repair(5, 5, 0, fine)).await;
    assert_eq!(
        r,
        Message::RepairReply {
            request: 5,
            result: Ok(RepairOutcome::NotNeeded)
        }
    );
    // A snapshot the copy does not hold: refused.
    let mut no_snap = repair(5, 6, off, good.clone());
    if let Message::Repair { snapshot, .. } = &mut no_snap {
        *snapshot = Some(VolumeName::new("nope").unwrap());
    }
    let r = ask(&mut send, &mut recv, &mut d, &no_snap).await;
    assert!(
        matches!(
            r,
            Message::RepairReply {
                request: 6,
                result: Err(_)
            }
        ),
        "{r:?}"
    );
    // The right bytes in its generation: rewritten, and the copy reads well.
    let r = ask(
        &mut send,
        &mut recv,
        &mut d,
        &repair(5, 7, off, good.clone()),
    )
    .await;
    assert_eq!(
        r,
        Message::RepairReply {
            request: 7,
            result: Ok(RepairOutcome::Rewritten)
        }
    );
    assert_eq!(bytes_at(&file, off, B), good);
    let r = ask(
        &mut send,
        &mut recv,
        &mut d,
        &Message::Read {
            volume: v.clone(),
            generation: Generation(5),
            request: 8,
            offset: off,
            len: B as u32,
        },
    )
    .await;
    assert_eq!(
        r,
        Message::ReadReply {
            request: 8,
            result: Ok(good)
        }
    );
    // The write stream goes on where it was: seq 2 is next.
    assert_eq!(
        ask(
            &mut send,
            &mut recv,
            &mut d,
            &write(2, data[..4096].to_vec())
        )
        .await,
        ok(2)
    );
}

#[test]
fn a_scrub_on_the_primary_repairs_its_bad_blocks_from_a_replica() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-repair-scrub").unwrap();
    let nodes = three_copies(root.path(), &ca, "v", SIZE);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let data = pattern("scrub", (2 * MIB) as usize);
    write_through(root.path(), n1, "data.img", &data);
    let block = |o: u64| data[o as usize..(o + B) as usize].to_vec();
    let scrub = |n: &Node| match n.admin(AdminOp::Scrub {}).unwrap() {
        tessera_store_admin::AdminReply::Scrub(r) => r,
        other => panic!("unexpected reply {other:?}"),
    };
    // The scrub checks the blocks whose checksums reached the layer's table (the
    // store's checkpoint, every 10 s): wait for all 512 written, on both stores used.
    for n in [n1, n2] {
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while scrub(n).blocks_checked < 512 {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: the written blocks never reached the table",
                n.id
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let off = 512 << 10;
    let file = file_holding(n1, off, &block(off));
    rot(&file, off);
    let r = scrub(n1);
    assert!(r.bad.is_empty(), "{r:?}");
    assert_eq!(r.repaired.len(), 1, "{r:?}");
    assert_eq!(r.repaired[0].offset, off);
    assert_eq!(bytes_at(&file, off, B), block(off), "not repaired");
    let s = status(n1);
    assert_eq!(s.repaired_blocks, 1, "{s:?}");
    assert!(s.repairs.iter().any(|r| r.offset == off && r.on.is_none()));
    assert!(scrub(n1).bad.is_empty());

    // A replica's scrub repairs its own bad block from its primary (asked on the
    // connection the primary fenced it through, in its generation): the primary lists
    // it, naming the replica's node, for the cluster's `volume.repaired` event.
    let off = 768 << 10;
    let f2 = file_holding(n2, off, &block(off));
    rot(&f2, off);
    assert_ne!(bytes_at(&f2, off, B), block(off), "the rot did not land");
    let r = scrub(n2);
    assert!(r.bad.is_empty(), "{r:?}");
    assert_eq!(r.repaired.len(), 1, "{r:?}");
    assert_eq!(r.repaired[0].offset, off);
    assert_eq!(
        bytes_at(&f2, off, B),
        block(off),
        "the replica's block not repaired"
    );
    assert!(scrub(n2).bad.is_empty());
    // The whole copy reads as the primary's (by a client we did not write, nbdcopy).
    assert_eq!(
        n2.export_hash(root.path(), "v"),
        n1.export_hash(root.path(), "v"),
        "the replica's copy differs from the primary's"
    );
    let s = status(n1);
    assert_eq!(s.repaired_blocks, 2, "{s:?}");
    assert!(
        s.repairs.iter().any(|r| r.offset == off
            && r.len == B
            && r.from == "primary"
            && r.on.as_deref() == Some("node2")),
        "{s:?}"
    );
    let log = |n: &Node| std::fs::read_to_string(n.dir.with_extension("log")).unwrap();
    assert!(
        log(n2)
            .lines()
            .any(|l| l.contains("repaired with the primary's bytes")
                && l.contains(&off.to_string())
                && l.contains("node1")),
        "no log line of the replica's repair:\n{}",
        log(n2)
    );
    assert!(
        log(n1).lines().any(
            |l| l.contains("the replica repaired it with this copy's bytes") && l.contains("node2")
        ),
        "no log line of the primary:\n{}",
        log(n1)
    );

    // A client's read of a replica's copy (qemu-img on node3's own export) that meets a
    // bad block gets the written bytes: the block is repaired from the primary first.
    let n3 = &nodes[2];
    let off = 1024 << 10;
    let f3 = file_holding(n3, off, &block(off));
    rot(&f3, off);
    let got = qemu_read(root.path(), n3, "v", off, 4 * B).unwrap();
    assert!(got[..] == data[off as usize..(off + 4 * B) as usize]);
    assert_eq!(
        bytes_at(&f3, off, B),
        block(off),
        "node3's block not repaired"
    );
    let s = status(n1);
    assert!(
        s.repairs
            .iter()
            .any(|r| r.offset == off && r.on.as_deref() == Some("node3")),
        "{s:?}"
    );
}
