//! Store bugs the power-loss harness found (issue #9), each reproduced by a focused test on
//! powerfs: a regression test once fixed, `#[ignore]`d while open with the bug in the
//! reason (so every test run lists it; `--ignored` runs it; drop the `ignore` with the
//! fix). Details and the seeds that found them: `docs/power-loss.md`, "Findings".

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tessera_tests::power_loss::store::{Rig, RunningStore};
use tessera_tests::power_loss::workload::payload;
use tessera_tests::powerfs::{self, CutMode};

const KIB: u64 = 1024;
const BLOCK: u64 = 4 * KIB;

/// Reads `len` bytes at `off` of volume `v`.
fn read(store: &RunningStore, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    store.connect("v").unwrap().read(off, &mut buf).unwrap();
    buf
}

/// A 64 KiB overwrite (placed in the data file), then a FLUSH on the same connection
/// while three other connections flush in a loop; power is cut the moment the FLUSH
/// returns. Syncs take 2 ms, as a disk's would. Finding 1: a FLUSH that found the set of
/// data files to sync drained by a concurrent FLUSH returned before that one's sync
/// (fixed by 0a17bd6).
#[test]
fn a_flush_racing_other_flushes_keeps_a_placed_write() {
    if !powerfs::available_or_skip("a_flush_racing_other_flushes_keeps_a_placed_write") {
        return;
    }
    const ROUNDS: u64 = 100;
    const LEN: u64 = 64 * KIB;
    let mut rig = Rig::mount();
    let mut store = rig.setup.start(&[]).unwrap();
    store
        .admin(&["volume", "create", "v", "--size", "1M"])
        .unwrap();
    // Data in place everywhere, so every later write is an overwrite.
    let mut c = store.connect("v").unwrap();
    c.write(0, &payload(1, 0, 0, 1 << 20), false).unwrap();
    c.flush().unwrap();
    drop(c);
    rig.pfs.set_sync_latency(Duration::from_millis(2));
    for round in 1..=ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let flushers: Vec<_> = (0..3)
            .map(|_| {
                let mut c = store.connect("v").unwrap();
                let stop = stop.clone();
                std::thread::spawn(
                    move || {
                        while !stop.load(Ordering::SeqCst) && c.flush().is_ok() {}
                    },
                )
            })
            .collect();
        let data = payload(1, round, 0, LEN);
        let mut a = store.connect("v").unwrap();
        a.write(0, &data, false).unwrap();
        a.flush().unwrap();
        store.kill9();
        stop.store(true, Ordering::SeqCst);
        for f in flushers {
            f.join().unwrap();
        }
        let report = rig.pfs.power_cut(CutMode::DropAll, round).unwrap();
        store = rig.setup.start(&[]).unwrap();
        assert!(
            read(&store, 0, LEN) == data,
            "round {round}: a FLUSH returned, power was cut, and the 64 KiB write it covered \
             is gone; unsynced at the cut: {:?}",
            report.lost
        );
    }
}

/// A 4 KiB write into a hole of the table, flushed (its record is durable), then a 64 KiB
/// write over it, "placed into a hole" (record and data unsynced), while checkpoints run
/// every millisecond; power is cut a few milliseconds later. A checkpoint that seals the
/// first write's segment after the second write (logged in the next segment) replaced it
/// in the pending map deletes the first write's record, though the second is not durable.
#[test]
fn a_checkpoint_keeps_a_flushed_write_an_unsynced_placed_write_replaced() {
    if !powerfs::available_or_skip(
        "a_checkpoint_keeps_a_flushed_write_an_unsynced_placed_write_replaced",
    ) {
        return;
    }
    const ROUNDS: u64 = 150;
    const LEN: u64 = 64 * KIB;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut rig = Rig::mount();
    let args: Vec<String> = ["--checkpoint-interval-ms", "1", "--wal-segment-size", "64K"]
        .map(String::from)
        .to_vec();
    let mut store = rig.setup.start(&args).unwrap();
    store
        .admin(&["volume", "create", "v", "--size", "64M"])
        .unwrap();
    rig.pfs.set_sync_latency(Duration::from_micros(500));
    for round in 0..ROUNDS {
        // A range never written before: a hole in the table.
        let off = round * 2 * LEN;
        let first = payload(2, 2 * round, off, BLOCK);
        let second = payload(2, 2 * round + 1, off, LEN);
        let mut c = store.connect("v").unwrap();
        c.write(off, &first, false).unwrap();
        c.flush().unwrap();
        c.write(off, &second, false).unwrap();
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..6000)));
        store.kill9();
        let report = rig.pfs.power_cut(CutMode::DropAll, round).unwrap();
        store = rig.setup.start(&args).unwrap();
        let got = read(&store, off, BLOCK);
        assert!(
            got == first || got[..] == second[..BLOCK as usize],
            "round {round}: block {} holds neither the flushed 4 KiB write nor the 64 KiB \
             write after it ({}); unsynced at the cut: {:?}",
            off / BLOCK,
            if got.iter().all(|b| *b == 0) {
                "zeroes: the flushed write is lost"
            } else {
                "other bytes"
            },
            report.lost
        );
    }
}
