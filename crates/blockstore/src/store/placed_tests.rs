//! Large writes that go straight to their place (issue #9, "write once"): what recovery
//! keeps after a crash, the sync that must come before overwriting data in place, the
//! checkpoint racing a placed write, and sticky sync failures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::write::PLACED_MIN;
use super::{Store, StoreOptions};
use crate::error::StoreError;
use crate::format::{
    block_hash, BlockEntry, FillKind, RecordHeader, RecordKind, BLOCK, BLOCK_SIZE,
};
use crate::hooks::{pause, Point};
use crate::layer::LayerFiles;
use crate::wal::Wal;

pub(super) const MIB: u64 = 1 << 20;
/// Blocks in one placed write of the tests.
pub(super) const N: usize = PLACED_MIN / BLOCK_SIZE;

pub(super) fn quiet(dir: &std::path::Path) -> Store {
    let opts = StoreOptions {
        checkpoint_interval: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    Store::open(dir, opts).unwrap()
}

/// A quiet store in a new directory, with a 4 MiB volume "v" and its export.
fn fresh() -> (tempfile::TempDir, Store, crate::Export) {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 4 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    (dir, s, e)
}

pub(super) fn filled(b: u8, blocks: usize) -> Vec<u8> {
    vec![b; blocks * BLOCK_SIZE]
}

pub(super) fn read(e: &crate::Export, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xEE; len];
    e.read_at(off, &mut buf).unwrap();
    buf
}

#[test]
fn placed_writes_read_back_across_checkpoint_snapshot_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = quiet(dir.path());
        s.create_volume("v", 4 * MIB).unwrap();
        let e = s.open_export("v").unwrap();
        e.write_at(0, &filled(1, N), false).unwrap();
        assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(1, N));
        s.checkpoint().unwrap();
        assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(1, N));
        s.create_snapshot("v", "s").unwrap();
        // Over the snapshot: the new top layer holds nothing yet (a hole).
        e.write_at(BLOCK, &filled(2, N), false).unwrap();
        // A small logged write over placed data, then placed over logged.
        e.write_at(2 * BLOCK, &filled(3, 1), false).unwrap();
        e.write_at(4 * BLOCK, &filled(4, 1), false).unwrap();
        e.write_at(3 * BLOCK, &filled(5, N), false).unwrap();
        e.flush().unwrap();
    }
    let s = quiet(dir.path());
    let e = s.open_export("v").unwrap();
    let mut expect = filled(1, N);
    expect.resize((N + 4) * BLOCK_SIZE, 0);
    expect[BLOCK_SIZE..(N + 1) * BLOCK_SIZE].fill(2);
    expect[2 * BLOCK_SIZE..3 * BLOCK_SIZE].fill(3);
    expect[3 * BLOCK_SIZE..(N + 3) * BLOCK_SIZE].fill(5);
    assert!(
        read(&e, 0, expect.len()) == expect,
        "volume content after reopen"
    );
    let snap = s.open_export("v@s").unwrap();
    let mut old = filled(1, N);
    old.resize((N + 4) * BLOCK_SIZE, 0);
    assert!(read(&snap, 0, old.len()) == old, "snapshot content");
    assert!(s.scrub().unwrap().bad.is_empty());
}

#[test]
fn overwriting_data_in_place_waits_for_its_record_to_be_durable_but_a_hole_does_not() {
    let (_dir, s, e) = fresh();
    let events = Arc::new(Mutex::new(Vec::new()));
    {
        let events = events.clone();
        s.inner.hooks.set(move |p| {
            events.lock().push(p);
            Ok(())
        });
    }
    e.write_at(0, &filled(1, N), false).unwrap();
    assert!(
        !events.lock().contains(&Point::WalSync),
        "a write into a hole synced the log: {:?}",
        events.lock()
    );
    s.checkpoint().unwrap();
    events.lock().clear();
    e.write_at(0, &filled(2, N), false).unwrap();
    let ev = events.lock().clone();
    let logged = ev.iter().position(|p| *p == Point::PlacedLogged);
    let synced = ev.iter().position(|p| *p == Point::WalSync);
    assert!(
        matches!((logged, synced), (Some(a), Some(b)) if a < b),
        "overwriting checksummed data in place did not sync its record first: {ev:?}"
    );
    // And overwriting a placed write's data that is not checkpointed yet.
    events.lock().clear();
    e.write_at(0, &filled(3, N), false).unwrap();
    assert!(events.lock().contains(&Point::WalSync));
    assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(3, N));
}

#[test]
fn a_read_during_a_placed_write_waits_for_the_data_instead_of_failing() {
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, N), false).unwrap();
    s.checkpoint().unwrap();

    let paused = pause::first(&s.inner.hooks, |p| p == Point::PlacedLogged);
    let writer = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || e.write_at(0, &filled(2, N), false))
    };
    paused.reached();
    // The new checksums are published, the data is not in place: the read must wait for
    // it (the gate), not compare the new checksum with the old data.
    let reader = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; BLOCK_SIZE];
            e.read_at(5 * BLOCK, &mut buf).map(|()| buf)
        })
    };
    paused.release();
    writer.join().unwrap().unwrap();
    let got = reader.join().unwrap().expect("the read failed");
    assert_eq!(got, filled(2, 1));
}

#[test]
fn a_checkpoint_never_copies_an_older_logged_block_over_placed_data() {
    let (dir, s, e) = fresh();
    // A small (logged) write, chosen by the checkpoint ...
    e.write_at(0, &filled(1, 1), false).unwrap();
    let paused = pause::first(&s.inner.hooks, |p| p == Point::CheckpointChose);
    let cp = {
        let s = s.clone();
        std::thread::spawn(move || s.checkpoint())
    };
    paused.reached();
    // ... then replaced by a placed write whose data lands before the copy.
    e.write_at(0, &filled(2, N), false).unwrap();
    paused.release();
    cp.join().unwrap().unwrap();
    assert_eq!(read(&e, 0, BLOCK_SIZE), filled(2, 1), "live read");
    s.checkpoint().unwrap();
    assert_eq!(
        read(&e, 0, BLOCK_SIZE),
        filled(2, 1),
        "after the next checkpoint"
    );
    drop(e);
    drop(s);
    let s = quiet(dir.path());
    let e = s.open_export("v").unwrap();
    assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(2, N), "after reopen");
}

#[test]
fn a_failed_sync_fails_every_later_flush_and_stops_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = quiet(dir.path());
        s.create_volume("v", 4 * MIB).unwrap();
        let e = s.open_export("v").unwrap();
        e.write_at(0, &filled(1, 2), false).unwrap();
        let fail_once = Arc::new(AtomicBool::new(true));
        {
            let fail_once = fail_once.clone();
            s.inner.hooks.set(move |p| match p {
                Point::WalSync if fail_once.swap(false, Ordering::SeqCst) => {
                    Err(std::io::Error::from_raw_os_error(nix::libc::EIO))
                }
                _ => Ok(()),
            });
        }
        assert!(e.flush().is_err(), "the injected failure");
        assert!(s.degraded().is_some());
        // The next sync would succeed, but the pages the failed one was about may be
        // gone: the store must not say they are durable.
        assert!(matches!(e.flush(), Err(StoreError::Degraded(_))));
        assert!(matches!(
            e.write_at(0, &filled(2, 1), true),
            Err(StoreError::Degraded(_))
        ));
        assert!(matches!(s.checkpoint(), Err(StoreError::Degraded(_))));
        assert_eq!(read(&e, 0, BLOCK_SIZE), filled(2, 1), "reads go on");
    }
    // A restart replays the log the checkpoint kept.
    let s = quiet(dir.path());
    assert!(s.degraded().is_none());
    let e = s.open_export("v").unwrap();
    assert_eq!(read(&e, BLOCK, BLOCK_SIZE), filled(1, 1));
    e.flush().unwrap();
}

/// A data directory with layer 1 whose block `b` holds `old` (checksummed), and a log
/// whose records the test appends; `recover` then settles them.
struct Crash {
    dir: tempfile::TempDir,
    layer: Arc<LayerFiles>,
    wal: Wal,
}

impl Crash {
    fn new() -> Crash {
        let dir = tempfile::tempdir().unwrap();
        let layer_dir = dir.path().join("layers");
        let wal_dir = dir.path().join("wal");
        std::fs::create_dir_all(&layer_dir).unwrap();
        std::fs::create_dir_all(&wal_dir).unwrap();
        let layer = Arc::new(LayerFiles::open(&layer_dir, 1, true).unwrap());
        let wal = Wal::create(&wal_dir, 1).unwrap();
        Crash { dir, layer, wal }
    }

    /// Block 0 as checkpointed data.
    fn stored(&self, b: u8) {
        let d = filled(b, 1);
        self.layer.write_blocks(0, &d).unwrap();
        self.layer.write_entries(0, &block_hash(&d)).unwrap();
    }

    fn record(&self, kind: RecordKind, data: &[u8], hashes: &[u8]) {
        let header = RecordHeader {
            kind,
            nblocks: 1,
            segment: 0,
            layer: 1,
            first_block: 0,
            generation: 1,
        };
        self.wal.append(&header, hashes, data, |_| ()).unwrap();
    }

    fn logged(&self, b: u8) {
        let d = filled(b, 1);
        self.record(RecordKind::Data, &d, &block_hash(&d));
    }

    /// A placed record for content `b`; `lands` says whether its data reached its place.
    fn placed(&self, b: u8, lands: bool) {
        let d = filled(b, 1);
        self.record(RecordKind::Placed, &[], &block_hash(&d));
        if lands {
            self.layer.write_blocks(0, &d).unwrap();
        }
    }

    /// Recovers and returns block 0's entry and data.
    fn recover(self) -> (BlockEntry, Vec<u8>) {
        self.wal.sync().unwrap();
        let layers = HashMap::from([(1, self.layer.clone())]);
        super::recovery::recover(&self.dir.path().join("wal"), &layers, false).unwrap();
        let entry = self.layer.read_entries(0, 1).unwrap()[0];
        let mut data = vec![0u8; BLOCK_SIZE];
        self.layer.read_blocks(0, &mut data).unwrap();
        (entry, data)
    }
}

fn data_of(b: u8) -> (BlockEntry, Vec<u8>) {
    let d = filled(b, 1);
    (BlockEntry::Data(block_hash(&d)), d)
}

#[test]
fn recovery_keeps_a_placed_write_whose_data_landed() {
    let c = Crash::new();
    c.stored(1);
    c.placed(2, true);
    assert_eq!(c.recover(), data_of(2));
}

#[test]
fn recovery_keeps_the_old_block_when_a_placed_write_did_not_land() {
    let c = Crash::new();
    c.stored(1);
    c.placed(2, false);
    assert_eq!(c.recover(), data_of(1));
}

#[test]
fn recovery_falls_back_to_the_logged_version_a_lost_placed_write_replaced() {
    let c = Crash::new();
    c.stored(1);
    c.logged(2);
    c.placed(3, false);
    assert_eq!(c.recover(), data_of(2), "the flushed logged write survives");
}

#[test]
fn recovery_takes_the_newest_of_several_placed_versions_that_matches() {
    let c = Crash::new();
    c.placed(1, true);
    c.placed(2, false);
    assert_eq!(c.recover(), data_of(1));
}

#[test]
fn recovery_lets_a_later_logged_write_or_fill_win_over_placed_data() {
    let c = Crash::new();
    c.placed(1, true);
    c.logged(2);
    assert_eq!(c.recover(), data_of(2));

    let c = Crash::new();
    c.placed(1, true);
    let header = RecordHeader {
        kind: RecordKind::Fill(FillKind::Zero),
        nblocks: 4,
        segment: 0,
        layer: 1,
        first_block: 0,
        generation: 1,
    };
    c.wal.append(&header, &[], &[], |_| ()).unwrap();
    assert_eq!(c.recover().0, BlockEntry::Zero);
}

/// A torn overwrite (part old, part new inside the block, as a disk's sectors can leave
/// it) matches no version: the block must read as an I/O error, never as bytes that may
/// be older than a flushed write (power-loss finding 4).
#[test]
fn recovery_leaves_a_block_that_matches_no_version_unreadable() {
    let c = Crash::new();
    c.stored(1);
    c.placed(2, false);
    let mut torn = filled(1, 1);
    torn[..BLOCK_SIZE / 2].fill(2);
    c.layer.write_blocks(0, &torn).unwrap();
    let (entry, data) = c.recover();
    assert_eq!(data, torn);
    assert_eq!(
        entry,
        BlockEntry::Data(block_hash(&filled(1, 1))),
        "the table must keep the entry the torn bytes do not match"
    );
    assert_ne!(BlockEntry::Data(block_hash(&data)), entry);
}

#[test]
fn a_placed_write_into_a_hole_that_did_not_land_leaves_the_block_absent() {
    let c = Crash::new();
    c.placed(2, false);
    let (entry, _) = c.recover();
    assert_eq!(entry, BlockEntry::Absent);
    let _ = BLOCK;
}

#[test]
fn a_flush_waits_for_the_data_sync_of_a_concurrent_flush() {
    use std::sync::mpsc::channel;
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, N), false).unwrap();
    let paused = pause::first(&s.inner.hooks, |p| p == Point::FlushData);
    let first = {
        let s = s.clone();
        std::thread::spawn(move || s.flush())
    };
    paused.reached();
    // The first flush took the placed write's data file and has not synced it yet.
    let (done_tx, done) = channel();
    let second = {
        let s = s.clone();
        std::thread::spawn(move || {
            let r = s.flush();
            let _ = done_tx.send(());
            r
        })
    };
    let early = done.recv_timeout(Duration::from_millis(500));
    paused.release();
    first.join().unwrap().unwrap();
    second.join().unwrap().unwrap();
    assert!(
        early.is_err(),
        "a flush returned while another flush had not yet synced the placed data"
    );
}

#[test]
fn a_checkpoint_that_skips_a_logged_block_for_placed_data_syncs_the_placed_record_first() {
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, 1), false).unwrap();
    e.flush().unwrap();
    let paused = pause::first(&s.inner.hooks, |p| p == Point::CheckpointChose);
    let cp = {
        let s = s.clone();
        std::thread::spawn(move || s.checkpoint())
    };
    paused.reached();
    // Into a hole: the placed write's record is not synced.
    let events = Arc::new(Mutex::new(Vec::new()));
    e.write_at(0, &filled(2, N), false).unwrap();
    {
        let events = events.clone();
        s.inner.hooks.set(move |p| {
            events.lock().push(p);
            Ok(())
        });
    }
    paused.release();
    cp.join().unwrap().unwrap();
    let ev = events.lock().clone();
    let synced = ev.iter().position(|p| *p == Point::WalSync);
    let removed = ev.iter().position(|p| matches!(p, Point::RemoveWal(_)));
    assert!(
        matches!((synced, removed), (Some(a), Some(b)) if a < b),
        "the flushed logged block's record went before the placed record replacing it was durable: {ev:?}"
    );
}

#[test]
fn a_placed_write_over_a_block_the_checkpoint_just_copied_syncs_its_record_first() {
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, 1), false).unwrap();
    e.flush().unwrap();
    // Two threads stop once each: the checkpoint after choosing what to copy, the placed
    // write after deciding it writes into a hole.
    let ([cp_stop, w_stop], seen) = pause::first_of_each(
        &s.inner.hooks,
        [
            |p| p == Point::CheckpointChose,
            |p| p == Point::PlacedDecided,
        ],
    );
    let cp = {
        let s = s.clone();
        std::thread::spawn(move || s.checkpoint())
    };
    cp_stop.reached();
    let writer = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || e.write_at(0, &filled(2, N), false))
    };
    w_stop.reached();
    // The checkpoint copies the logged block into place while the placed write's gate is
    // closed; then the placed write goes on.
    cp_stop.release();
    cp.join().unwrap().unwrap();
    w_stop.release();
    writer.join().unwrap().unwrap();
    let ev = seen.lock().unwrap().clone();
    let decided = ev.iter().position(|p| *p == Point::PlacedDecided).unwrap();
    assert!(
        ev[decided..].contains(&Point::WalSync),
        "the placed write overwrote checkpointed data without making its record durable: {ev:?}"
    );
    assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(2, N));
}

/// A checkpoint deleting the segment of a logged block must not copy it over the data of
/// a newer placed write (P1, same segment as an even newer one, P2, still writing): a
/// power cut before P2's data lands would then find neither P1 nor anything newer.
#[test]
fn a_checkpoint_never_copies_a_logged_block_over_a_newer_placed_write_that_another_replaced() {
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, 1), false).unwrap();
    let ([sealed], _) = pause::first_of_each(
        &s.inner.hooks,
        [|p| matches!(p, Point::CheckpointSealed(_))],
    );
    let cp = {
        let s = s.clone();
        std::thread::spawn(move || s.checkpoint())
    };
    sealed.reached();
    // P1 lands while the checkpoint has sealed the logged block's segment; P2 replaces
    // it in the same (next) segment and stops before writing its data.
    e.write_at(0, &filled(2, N), false).unwrap();
    let ([p2_stop], _) = pause::first_of_each(&s.inner.hooks, [|p| p == Point::PlacedLogged]);
    let p2 = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || e.write_at(0, &filled(3, N), false))
    };
    p2_stop.reached();
    sealed.release();
    cp.join().unwrap().unwrap();
    let layer = s.inner.layers.read().values().next().cloned().unwrap();
    let mut in_place = vec![0u8; BLOCK_SIZE];
    layer.read_blocks(0, &mut in_place).unwrap();
    assert!(
        in_place == filled(2, 1),
        "the checkpoint copied the older logged block over P1's data in place (block 0 starts {:?})",
        &in_place[..4]
    );
    p2_stop.release();
    p2.join().unwrap().unwrap();
    assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(3, N));
}

/// Power-loss finding 3 (docs/power-loss.md): a flushed placed write replaced by a newer
/// placed write whose data never became durable. The checkpoint that deleted the older
/// write's record used to leave its checksum out of the table (it was not the newest
/// version), so after the crash the block read as what it held before the flushed write.
#[test]
fn a_checkpoint_keeps_a_flushed_placed_write_that_a_newer_unflushed_one_replaced() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = quiet(dir.path());
        s.create_volume("v", 4 * MIB).unwrap();
        let e = s.open_export("v").unwrap();
        e.write_at(0, &filled(1, N), false).unwrap();
        e.flush().unwrap();
        // The checkpoint seals the segment holding the flushed write; before it looks at
        // the pending versions, a newer placed write replaces it from the next segment.
        let paused = pause::first(&s.inner.hooks, |p| matches!(p, Point::CheckpointSealed(_)));
        let cp = {
            let s = s.clone();
            std::thread::spawn(move || s.checkpoint())
        };
        paused.reached();
        e.write_at(0, &filled(2, N), false).unwrap();
        paused.release();
        cp.join().unwrap().unwrap();
        // The power goes before the newer write's data is durable: the page cache loses
        // it and the older data is what the disk holds. No final checkpoint.
        let layers: Vec<_> = s.inner.layers.read().values().cloned().collect();
        assert_eq!(layers.len(), 1);
        layers[0].write_blocks(0, &filled(1, N)).unwrap();
        s.inner.hooks.set(|p| match p {
            Point::CheckpointSealed(_) => Err(std::io::Error::other("power cut")),
            _ => Ok(()),
        });
    }
    let s = quiet(dir.path());
    let e = s.open_export("v").unwrap();
    assert!(
        read(&e, 0, N * BLOCK_SIZE) == filled(1, N),
        "the flushed write is gone after the crash"
    );
    assert!(s.scrub().unwrap().bad.is_empty());
}
