//! Writes in flight at once on every copy (issue #8, performance): each copy applies
//! writes that touch different bytes concurrently, yet overlapping ones land in seq order,
//! a flush covers everything before it and answers leave in seq order.
//!
//! - A replica driven by this test as its primary over QUIC: a batch of large (blocking
//!   pool) and small (inline) writes, zeroes and trims, some overlapping writes still in
//!   flight, flushes between them, all sent at once; every answer comes back in seq order
//!   and the copy holds what applying them in seq order gives.
//! - A primary with two replicas written by `qemu-io` (a client we did not write) with
//!   many overlapping asynchronous writes, zeroes and trims in flight at once: the three
//!   copies are identical (the primary's own applied the same order as the replicas').

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::time::Duration;

use tessera_pki::ClusterCa;
use tessera_replication::wire::{self, Decoder, Generation, Message, VolumeName};

mod support;
use support::*;

const SIZE: u64 = 8 * MIB;

/// One request of the batch and what it does to the model of the copy.
enum Req {
    Write {
        offset: u64,
        len: u64,
        byte: u8,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
}

fn message(req: &Req, generation: u64, seq: u64) -> Message {
    let (volume, generation) = (VolumeName::new("v").unwrap(), Generation(generation));
    match *req {
        Req::Write {
            offset,
            len,
            byte,
            fua,
        } => Message::Write {
            volume,
            generation,
            seq,
            offset,
            fua,
            data: vec![byte; len as usize],
        },
        Req::Zeroes { offset, len } => Message::WriteZeroes {
            volume,
            generation,
            seq,
            offset,
            len,
        },
        Req::Trim { offset, len } => Message::Trim {
            volume,
            generation,
            seq,
            offset,
            len,
        },
        Req::Flush => Message::Flush {
            volume,
            generation,
            seq,
        },
    }
}

/// Applies `req` to `model` as a copy must: in seq order.
fn model_apply(model: &mut [u8], req: &Req) {
    let (offset, len, byte) = match *req {
        Req::Write {
            offset, len, byte, ..
        } => (offset, len, byte),
        Req::Zeroes { offset, len } | Req::Trim { offset, len } => (offset, len, 0),
        Req::Flush => return,
    };
    model[offset as usize..(offset + len) as usize].fill(byte);
}

/// A batch in which later requests overlap earlier ones still being applied: 1 MiB
/// writes (the blocking pool; with FUA they wait for a sync), small ones overlapping them
/// (applied inline once the big one is done), zeroes and trims, flushes in between.
fn batch(round: u8) -> Vec<Req> {
    let b = round.wrapping_mul(16);
    vec![
        Req::Write {
            offset: 0,
            len: MIB,
            byte: b + 1,
            fua: true,
        },
        Req::Write {
            offset: 4096,
            len: 4096,
            byte: b + 2,
            fua: false,
        },
        Req::Write {
            offset: 2 * MIB,
            len: MIB,
            byte: b + 3,
            fua: true,
        },
        Req::Write {
            offset: 2 * MIB + 65536,
            len: 65536,
            byte: b + 4,
            fua: false,
        },
        Req::Trim {
            offset: 8192,
            len: 8192,
        },
        Req::Write {
            offset: 12288,
            len: 4096,
            byte: b + 5,
            fua: false,
        },
        Req::Write {
            offset: 4 * MIB,
            len: MIB,
            byte: b + 6,
            fua: false,
        },
        Req::Zeroes {
            offset: 4 * MIB + 4096,
            len: 4096,
        },
        Req::Write {
            offset: 4 * MIB,
            len: 4096,
            byte: b + 7,
            fua: false,
        },
        Req::Flush,
        Req::Write {
            offset: 512 * 1024,
            len: MIB,
            byte: b + 8,
            fua: false,
        },
        Req::Write {
            offset: MIB - 4096,
            len: 8192,
            byte: b + 9,
            fua: true,
        },
        Req::Write {
            offset: 6 * MIB,
            len: 4096,
            byte: b + 10,
            fua: false,
        },
        Req::Flush,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_applies_overlapping_writes_in_flight_in_seq_order() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-test").unwrap();
    let (replica, _conn, mut send, mut recv) =
        replica_and_fake_primary(root.path(), &ca, SIZE).await;
    let mut model = vec![0u8; SIZE as usize];
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut seq = 0u64;
    for round in 0..4u8 {
        // The whole batch in one write: the replica reads it in a few reads and starts
        // what it may while earlier requests are still being applied.
        let reqs = batch(round);
        let mut bytes = Vec::new();
        let first = seq + 1;
        for r in &reqs {
            seq += 1;
            wire::encode_into(&message(r, 5, seq), &mut bytes).unwrap();
            model_apply(&mut model, r);
        }
        send.write_all(&bytes).await.unwrap();
        let mut answered = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while answered.len() < reqs.len() {
            while let Some(m) = decoder.next_message().unwrap() {
                answered.push(m);
            }
            if answered.len() >= reqs.len() {
                break;
            }
            let n = tokio::time::timeout_at(deadline, recv.read(&mut buf))
                .await
                .expect("the replica did not answer the batch within 20 s")
                .unwrap()
                .expect("the replica ended the stream");
            decoder.push(&buf[..n]).unwrap();
        }
        let expected: Vec<Message> = (first..=seq)
            .map(|s| Message::Reply {
                seq: s,
                result: Ok(()),
            })
            .collect();
        assert_eq!(
            answered, expected,
            "round {round}: answers not in seq order, or refused"
        );
    }
    // A resend of a request it applied is acknowledged again, not applied again.
    let again = message(
        &Req::Write {
            offset: 4096,
            len: 4096,
            byte: 0xEE,
            fua: false,
        },
        5,
        2,
    );
    send.write_all(&wire::encode(&again).unwrap())
        .await
        .unwrap();
    loop {
        if let Some(m) = decoder.next_message().unwrap() {
            assert_eq!(
                m,
                Message::Reply {
                    seq: 2,
                    result: Ok(())
                }
            );
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        decoder.push(&buf[..n]).unwrap();
    }
    let copy = tokio::task::spawn_blocking(move || replica.read("v", 0, SIZE as usize))
        .await
        .unwrap();
    for (i, (got, want)) in copy.chunks(4096).zip(model.chunks(4096)).enumerate() {
        assert_eq!(
            got,
            want,
            "block {i} (offset {}) differs from the writes applied in seq order",
            i * 4096
        );
    }
}

#[test]
fn overlapping_writes_in_flight_through_the_primary_leave_identical_copies() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-test").unwrap();
    let nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    for n in [n1, n2, n3] {
        n.create("v", SIZE);
    }
    n2.replica_of("v", 2);
    n3.replica_of("v", 2);
    n1.primary_of("v", 2, &[n2, n3]);

    // qemu's NBD client keeps up to 16 requests in flight. The NBD server may hand them
    // to the primary in another order than sent (NBD lets a server reorder requests in
    // flight: writes start on tasks of their own, zeroes and trims on its blocking pool),
    // so the order is the primary's; every copy, its own included, must have applied
    // exactly that one: the copies are identical, and each block holds zeroes or the
    // bytes of one whole write.
    let all: Vec<Req> = (0..6u8).flat_map(batch).collect();
    qemu_io(n1, &all);
    let copies: Vec<Vec<u8>> = [n1, n2, n3]
        .iter()
        .map(|n| whole_copy(root.path(), n))
        .collect();
    for (n, copy) in [n2, n3].iter().zip(&copies[1..]) {
        if let Some(i) = copy
            .chunks(4096)
            .zip(copies[0].chunks(4096))
            .position(|(a, b)| a != b)
        {
            panic!(
                "{}'s copy differs from the primary's at block {i} after overlapping writes, zeroes and trims in flight",
                n.id
            );
        }
    }
    let written: std::collections::BTreeSet<u8> = all
        .iter()
        .filter_map(|r| match r {
            Req::Write { byte, .. } => Some(*byte),
            _ => None,
        })
        .chain([0])
        .collect();
    for (i, block) in copies[0].chunks(4096).enumerate() {
        assert!(
            block.iter().all(|b| *b == block[0]) && written.contains(&block[0]),
            "block {i} is not one whole write's bytes"
        );
    }
}

/// Runs `reqs` through `qemu-io` against `n`'s export as asynchronous requests.
fn qemu_io(n: &Node, reqs: &[Req]) {
    let mut qemu = Command::new("qemu-io");
    qemu.args(["-f", "raw"]);
    for r in reqs {
        let c = match *r {
            Req::Write {
                offset,
                len,
                byte,
                fua,
            } => {
                let fua = if fua { "-f " } else { "" };
                format!("aio_write -q {fua}-P {byte} {offset} {len}")
            }
            Req::Zeroes { offset, len } => format!("aio_write -q -z {offset} {len}"),
            Req::Trim { offset, len } => format!("aio_write -q -z -u {offset} {len}"),
            Req::Flush => "aio_flush".to_string(),
        };
        qemu.arg("-c").arg(c);
    }
    qemu.arg("-c").arg("aio_flush").arg(n.uri("v"));
    run(&mut qemu);
}

/// `n`'s whole copy of `v`, read with `nbdcopy`.
fn whole_copy(dir: &std::path::Path, n: &Node) -> Vec<u8> {
    let out = dir.join(format!("{}-copy.img", n.id));
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(n.uri("v")).arg(&out));
    std::fs::read(&out).unwrap()
}
