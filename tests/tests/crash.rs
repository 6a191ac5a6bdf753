//! Durability: kill -9 the store at random points of a verified write workload, restart
//! it, and check that every write acknowledged before a completed flush is there, that
//! nothing else but a later write (or the zeroes of a later trim) took its place, and
//! that the store's metadata is consistent (scrub is clean).

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tessera_nbd::Client;
use tessera_tests::{free_port, require, run, StoreProcess};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 4096; // 16 MiB volume
const WRITERS: u64 = 2;

/// What a block may hold, in the order it was requested.
#[derive(Clone, Debug, PartialEq)]
enum Content {
    Data(u64),
    Zero,
}

fn block_bytes(block: u64, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(b"TSRA");
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    let seed = blake3::hash(&[block.to_le_bytes(), version.to_le_bytes()].concat());
    while out.len() < BLOCK {
        let n = (BLOCK - out.len()).min(32);
        out.extend_from_slice(&seed.as_bytes()[..n]);
    }
    out
}

fn decode(block: u64, bytes: &[u8]) -> Result<Content, String> {
    if bytes.iter().all(|b| *b == 0) {
        return Ok(Content::Zero);
    }
    if &bytes[0..4] != b"TSRA" {
        return Err(format!("block {block} holds bytes no one wrote"));
    }
    let b = u64::from_le_bytes(bytes[4..12].try_into().unwrap());
    let v = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
    if b != block || bytes != block_bytes(block, v).as_slice() {
        return Err(format!(
            "block {block} is torn or misplaced (claims block {b} version {v})"
        ));
    }
    Ok(Content::Data(v))
}

/// Per block: every content requested since the last verified state, and how many of
/// them (from the start) are known durable.
#[derive(Debug, Default)]
struct History {
    requested: Vec<Content>,
    durable: usize,
}

fn writer(
    sock: std::path::PathBuf,
    id: u64,
    seed: u64,
    model: Arc<Mutex<HashMap<u64, History>>>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(mut c) = Client::connect_unix(&sock, "c") else {
        return 0;
    };
    let mut version = seed << 32;
    let mut acked_since_flush: Vec<(u64, usize)> = Vec::new();
    let mut ops = 0;
    while !stop.load(Ordering::Relaxed) {
        // A run of 1-8 blocks owned by this writer (block % WRITERS == id).
        let n = rng.gen_range(1..=8u64);
        let first = rng.gen_range(0..BLOCKS / WRITERS - n) * WRITERS + id;
        let blocks: Vec<u64> = (0..n).map(|i| first + i * WRITERS).collect();
        let trim = rng.gen_bool(0.1);
        let fua = rng.gen_bool(0.05);
        let mut idx = Vec::new();
        {
            let mut m = model.lock().unwrap();
            for &b in &blocks {
                version += 1;
                let h = m.entry(b).or_default();
                h.requested.push(if trim {
                    Content::Zero
                } else {
                    Content::Data(version)
                });
                idx.push((b, h.requested.len(), version));
            }
        }
        let mut ok = true;
        for &(b, _, v) in &idx {
            let res = if trim {
                c.trim(b * BLOCK as u64, BLOCK as u32)
            } else {
                c.write(b * BLOCK as u64, &block_bytes(b, v), fua)
            };
            if res.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            return ops;
        }
        ops += 1;
        if fua && !trim {
            let mut m = model.lock().unwrap();
            for &(b, len, _) in &idx {
                let h = m.get_mut(&b).unwrap();
                h.durable = h.durable.max(len);
            }
        } else {
            acked_since_flush.extend(idx.iter().map(|&(b, len, _)| (b, len)));
        }
        if rng.gen_bool(0.2) {
            if c.flush().is_err() {
                return ops;
            }
            let mut m = model.lock().unwrap();
            for (b, len) in acked_since_flush.drain(..) {
                let h = m.get_mut(&b).unwrap();
                h.durable = h.durable.max(len);
            }
        }
    }
    ops
}

/// Checks the volume against the model and resets the model to what was found.
fn verify(dump: &[u8], model: &mut HashMap<u64, History>, baseline: &mut HashMap<u64, Content>) {
    for block in 0..BLOCKS {
        let bytes = &dump[block as usize * BLOCK..(block as usize + 1) * BLOCK];
        let found = decode(block, bytes).unwrap_or_else(|e| panic!("{e}"));
        let base = baseline.get(&block).cloned().unwrap_or(Content::Zero);
        let h = model.remove(&block).unwrap_or_default();
        // Allowed: the newest durable content, or anything requested after it.
        let mut allowed: Vec<Content> = Vec::new();
        if h.durable == 0 {
            allowed.push(base.clone());
        }
        let from = h.durable.saturating_sub(1);
        allowed.extend(h.requested[from.min(h.requested.len())..].iter().cloned());
        assert!(
            allowed.contains(&found),
            "block {block}: found {found:?}, but durable state was {:?} (index {} of {:?}, baseline {base:?})",
            h.requested.get(h.durable.wrapping_sub(1)),
            h.durable,
            h.requested
        );
        baseline.insert(block, found);
    }
}

#[test]
fn acknowledged_flushed_writes_survive_kill_9_at_random_points() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let port = free_port();
    // Small WAL segments and a short interval make checkpoints happen all the time, so
    // kills land in the middle of them too.
    let args = [
        "--wal-segment-size",
        "256K",
        "--checkpoint-interval-ms",
        "20",
    ];
    let mut p = StoreProcess::start_with(&data, port, &args);
    p.create_volume("c", &format!("{}", BLOCKS * BLOCK as u64));
    let mut baseline: HashMap<u64, Content> = HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e55e7a);
    let rounds = 12;
    let mut total_ops = 0;
    for round in 0..rounds {
        let model = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|id| {
                let (sock, model, stop) = (p.nbd_sock.clone(), model.clone(), stop.clone());
                let seed = (round as u64 + 1) * 1000 + id;
                std::thread::spawn(move || writer(sock, id, seed, model, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..900)));
        p.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            total_ops += w.join().unwrap();
        }
        p = StoreProcess::start_with(&data, port, &args);
        let dump = dir.path().join("dump.raw");
        run(Command::new("nbdcopy").arg(p.uri("c")).arg(&dump));
        let bytes = std::fs::read(&dump).unwrap();
        assert_eq!(bytes.len() as u64, BLOCKS * BLOCK as u64);
        let mut m = Arc::try_unwrap(model).unwrap().into_inner().unwrap();
        verify(&bytes, &mut m, &mut baseline);
        let scrub = p.cli(&["scrub"]);
        assert!(
            scrub.status.success(),
            "scrub after crash {round} found damage:\n{}",
            String::from_utf8_lossy(&scrub.stdout)
        );
    }
    assert!(
        total_ops > 100,
        "the workload barely ran ({total_ops} operations): the test proved nothing"
    );

    p.stop();
}
