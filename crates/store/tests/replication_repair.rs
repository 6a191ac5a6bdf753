//! A bad block on the primary's copy is repaired from a replica (issue #8: "a checksum
//! failure on read is repaired from another replica, logged as an event, and the read
//! succeeds"). Bytes of the primary's layer file are flipped behind its back; a client we
//! did not write (`nbdcopy`, `qemu-io`) reads the volume through the primary and must get
//! what was written, and the primary's file must hold the good bytes afterwards. With the
//! block bad on every copy the read fails with EIO and nothing is written. A replica
//! answering `Read` wrongly (short, for another request, a newer generation, bytes that
//! are not the block's) is refused and nothing is written; the same replica answering
//! right repairs the block.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tessera_pki::ClusterCa;
use tessera_replication::wire::{Generation, Message, ReplyError};

mod support;
use support::fake_replica::{fake_replica, primary_over_fake, Answer};
use support::rot::*;
use support::*;

const SIZE: u64 = 16 * MIB;
#[test]
fn a_bad_block_on_the_primary_is_repaired_from_a_replica_and_the_read_succeeds() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-repair-test").unwrap();
    let nodes = three_copies(root.path(), &ca, "v", SIZE);
    let n1 = &nodes[0];

    let data = pattern("repair", (4 * MIB) as usize);
    let src = root.path().join("data.img");
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(n1.uri("v")));

    // Bit rot on the primary: one block at 64 KiB, a run of three at 1 MiB.
    let file = data_file(n1);
    let bad = [64 << 10, MIB, MIB + B, MIB + 2 * B];
    for off in bad {
        rot(&file, off);
        assert_ne!(
            bytes_at(&file, off, B),
            data[off as usize..(off + B) as usize],
            "the rot did not reach the primary's file"
        );
    }

    // Read through the primary by a client we did not write: what was written.
    let out = root.path().join("read.img");
    run(Command::new("nbdcopy").arg(n1.uri("v")).arg(&out));
    let copy = std::fs::read(&out).unwrap();
    assert!(
        copy[..data.len()] == data[..],
        "the read returned other bytes than were written"
    );
    // The primary's own file holds the good bytes again.
    for off in bad {
        assert_eq!(
            bytes_at(&file, off, B),
            data[off as usize..(off + B) as usize],
            "the primary's block at {off} was not repaired"
        );
    }
    let s = status(n1);
    assert_eq!(s.repaired_blocks, 4, "{s:?}");
    assert!(
        s.repairs
            .iter()
            .all(|r| r.from == "node2" || r.from == "node3"),
        "{s:?}"
    );
    let repaired: u64 = s.repairs.iter().map(|r| r.len).sum();
    assert_eq!(repaired, 4 * B, "{s:?}");
    assert!(
        s.repairs.iter().any(|r| r.offset == 64 << 10 && r.len == B),
        "{s:?}"
    );
    assert!(
        s.repairs.iter().any(|r| r.offset == MIB && r.len == 3 * B),
        "{s:?}"
    );
    let log = std::fs::read_to_string(n1.dir.with_extension("log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("repaired from a replica's copy") && l.contains("1048576")),
        "no structured log line of the repair:\n{log}"
    );

    // Bad on every copy: the read fails with EIO, no garbage, nothing written.
    let off = 2 * MIB;
    for n in &nodes {
        rot(&data_file(n), off);
    }
    let rotten = bytes_at(&file, off, B);
    let err =
        qemu_read(root.path(), n1, "v", off, B).expect_err("a block bad on every copy was read");
    assert!(err.contains("Input/output error"), "{err}");
    assert_eq!(bytes_at(&file, off, B), rotten, "a failed repair wrote");
    assert_eq!(status(n1).repaired_blocks, 4);
    // The blocks around it still read, repaired ones included.
    let around = qemu_read(root.path(), n1, "v", MIB, 16 * B).unwrap();
    assert!(around[..] == data[MIB as usize..(MIB + 16 * B) as usize]);
}

/// How the fake replica answers `Read`.
const SHORT: u8 = 0;
const OTHER_REQUEST: u8 = 1;
const NEWER_GENERATION: u8 = 2;
const WRONG_BYTES: u8 = 3;
const RIGHT: u8 = 4;

/// How a fake replica (`support::fake_replica`) answers `Read` as `mode` says, with
/// `data` as the volume's content.
fn answer_reads(mode: Arc<AtomicU8>, data: Arc<Vec<u8>>) -> Answer {
    Arc::new(move |msg: Message| {
        let Message::Read {
            request,
            offset,
            len,
            generation,
            ..
        } = msg
        else {
            return None;
        };
        let right = data[offset as usize..(offset + u64::from(len)) as usize].to_vec();
        Some(match mode.load(Ordering::SeqCst) {
            SHORT => Message::ReadReply {
                request,
                result: Ok(right[..right.len() - 512].to_vec()),
            },
            OTHER_REQUEST => Message::ReadReply {
                request: request + 1,
                result: Ok(right),
            },
            NEWER_GENERATION => Message::ReadReply {
                request,
                result: Err(ReplyError::StaleGeneration {
                    current: Generation(generation.0 + 5),
                }),
            },
            WRONG_BYTES => Message::ReadReply {
                request,
                result: Ok(vec![0u8; right.len()]),
            },
            _ => Message::ReadReply {
                request,
                result: Ok(right),
            },
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answering_a_read_wrongly_is_refused_and_nothing_is_written() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-repair-bad").unwrap();
    let data = Arc::new(pattern("fake", MIB as usize));
    let mode = Arc::new(AtomicU8::new(SHORT));
    let (fake, _fenced) = fake_replica(
        root.path(),
        &ca,
        "node9",
        answer_reads(mode.clone(), data.clone()),
    )
    .await;
    let (root_path, ca2, data2) = (root.path().to_path_buf(), ca.clone(), data.clone());
    tokio::task::spawn_blocking(move || {
        let root = root_path.as_path();
        let n1 = primary_over_fake(root, &ca2, "node9", fake, SIZE, &data2);
        let file = data_file(&n1);
        let off = 128 << 10;
        rot(&file, off);
        let rotten = bytes_at(&file, off, B);
        for (m, what) in [
            (SHORT, "a short answer"),
            (OTHER_REQUEST, "an answer to another request"),
            (NEWER_GENERATION, "a newer generation"),
            (WRONG_BYTES, "bytes that are not the block's"),
        ] {
            mode.store(m, Ordering::SeqCst);
            let err = qemu_read(root, &n1, "v", off, B)
                .expect_err(&format!("a read was answered after {what}"));
            assert!(err.contains("Input/output error"), "{what}: {err}");
            assert_eq!(bytes_at(&file, off, B), rotten, "{what} was written");
            assert_eq!(status(&n1).repaired_blocks, 0, "{what} counted as a repair");
        }
        let log = std::fs::read_to_string(n1.dir.with_extension("log")).unwrap();
        for why in [
            "3584 bytes",
            "where 1 was asked",
            "stale generation",
            "do not match",
        ] {
            assert!(log.contains(why), "no log line saying {why:?}:\n{log}");
        }

        // The same replica answering right: repaired, read, counted.
        mode.store(RIGHT, Ordering::SeqCst);
        let got = qemu_read(root, &n1, "v", off, B).unwrap();
        assert!(got[..] == data2[off as usize..(off + B) as usize]);
        assert_eq!(bytes_at(&file, off, B), got);
        let s = status(&n1);
        assert_eq!(s.repaired_blocks, 1, "{s:?}");
        assert_eq!(s.repairs[0].from, "node9");
        assert_eq!(s.repairs[0].offset, off);
    })
    .await
    .unwrap();
}
