//! The races of issue #9, replayed deterministically: a test point stops one thread at the
//! racy step while the test drives the other side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Store, StoreOptions};
use crate::error::StoreError;
use crate::format::{BLOCK, BLOCK_SIZE};
use crate::hooks::{pause, Point};

const MIB: u64 = 1 << 20;

/// A store whose background checkpoint stays out of the way.
fn quiet(dir: &std::path::Path) -> Store {
    let opts = StoreOptions {
        checkpoint_interval: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    Store::open(dir, opts).unwrap()
}

fn block_of(b: u8) -> Vec<u8> {
    vec![b; BLOCK_SIZE]
}

#[test]
fn a_read_during_a_trim_never_returns_data_older_than_an_acknowledged_write() {
    // Without a snapshot the trim removes blocks; over one it writes zero markers.
    for over_snapshot in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let s = quiet(dir.path());
        s.create_volume("v", 16 * BLOCK).unwrap();
        if over_snapshot {
            s.create_snapshot("v", "s").unwrap();
        }
        let e = s.open_export("v").unwrap();
        e.write_at(3 * BLOCK, &block_of(1), false).unwrap();
        s.checkpoint().unwrap();
        e.write_at(3 * BLOCK, &block_of(2), false).unwrap();

        let paused = pause::first(&s.inner.hooks, |p| p == Point::FillLogged);
        let trim = {
            let e = s.open_export("v").unwrap();
            std::thread::spawn(move || e.trim(0, 16 * BLOCK, false))
        };
        paused.reached();
        let mut during = block_of(7);
        e.read_at(3 * BLOCK, &mut during).unwrap();
        paused.release();
        trim.join().unwrap().unwrap();

        assert!(
            during == block_of(2) || during == block_of(0),
            "a read during the trim returned {} (over a snapshot: {over_snapshot}), \
             older than the acknowledged write",
            during[0]
        );
        let mut after = block_of(7);
        e.read_at(3 * BLOCK, &mut after).unwrap();
        assert_eq!(after, block_of(0));
    }
}

/// Reads block 3 on another thread, stopped after it resolved its sources while `meddle`
/// changes the layer file under it.
fn read_while(s: &Store, meddle: impl FnOnce()) -> Result<Vec<u8>, StoreError> {
    let paused = pause::first(&s.inner.hooks, |p| p == Point::ReadResolved);
    let reader = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || {
            let mut buf = block_of(7);
            e.read_at(3 * BLOCK, &mut buf).map(|()| buf)
        })
    };
    paused.reached();
    meddle();
    paused.release();
    reader.join().unwrap()
}

fn volume_with_old_block(dir: &std::path::Path) -> (Store, crate::Export) {
    let s = quiet(dir);
    s.create_volume("v", 16 * BLOCK).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(3 * BLOCK, &block_of(1), false).unwrap();
    s.checkpoint().unwrap();
    (s, e)
}

#[test]
fn a_read_racing_a_checkpoint_copy_gets_data_not_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let (s, e) = volume_with_old_block(dir.path());
    let got = read_while(&s, || {
        e.write_at(3 * BLOCK, &block_of(2), false).unwrap();
        s.checkpoint().unwrap();
    });
    match got {
        Ok(b) => assert!(b == block_of(1) || b == block_of(2), "read {}", b[0]),
        Err(e) => panic!("a read racing a checkpoint failed: {e}"),
    }
}

#[test]
fn a_read_racing_the_punch_of_a_trim_gets_data_not_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let (s, e) = volume_with_old_block(dir.path());
    let got = read_while(&s, || {
        e.trim(3 * BLOCK, BLOCK, false).unwrap();
        s.checkpoint().unwrap();
    });
    match got {
        Ok(b) => assert!(b == block_of(1) || b == block_of(0), "read {}", b[0]),
        Err(e) => panic!("a read racing a trim's punch failed: {e}"),
    }
}

#[test]
fn an_unaligned_write_racing_a_checkpoint_merges_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let (s, e) = volume_with_old_block(dir.path());
    let paused = pause::first(&s.inner.hooks, |p| p == Point::ReadResolved);
    let writer = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || e.write_at(3 * BLOCK + 100, &[9; 10], false))
    };
    paused.reached();
    e.write_at(3 * BLOCK, &block_of(2), false).unwrap();
    s.checkpoint().unwrap();
    paused.release();
    if let Err(err) = writer.join().unwrap() {
        panic!("an unaligned write racing a checkpoint failed: {err}");
    }
    let mut expect = block_of(2);
    expect[100..110].fill(9);
    let mut got = block_of(7);
    e.read_at(3 * BLOCK, &mut got).unwrap();
    assert_eq!(got, expect);
}

#[test]
fn a_failed_checkpoint_keeps_its_punches_for_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 16 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(0, &vec![5; 8 * MIB as usize], false).unwrap();
    s.checkpoint().unwrap();
    let before = s.volume_info("v").unwrap().allocated;
    e.trim(MIB, 4 * MIB, false).unwrap();
    e.flush().unwrap();

    let events = Arc::new(Mutex::new(Vec::new()));
    let fail_sync = Arc::new(AtomicBool::new(true));
    {
        let (events, fail_sync) = (events.clone(), fail_sync.clone());
        s.inner.hooks.set(move |p| {
            events.lock().push(p);
            match p {
                Point::SyncLayer(_) if fail_sync.swap(false, Ordering::SeqCst) => {
                    Err(std::io::Error::from_raw_os_error(nix::libc::EIO))
                }
                _ => Ok(()),
            }
        });
    }
    assert!(s.checkpoint().is_err(), "the injected sync failure");
    events.lock().clear();
    // A failed sync is sticky: the kernel may have dropped the pages it was about, so no
    // later checkpoint may count the trim's markers durable and delete its record.
    assert!(matches!(s.checkpoint(), Err(StoreError::Degraded(_))));
    assert!(
        !events
            .lock()
            .iter()
            .any(|p| matches!(p, Point::RemoveWal(_))),
        "a checkpoint after a failed sync deleted WAL segments"
    );
    drop(e);
    drop(s);
    // The restart replays the trim from the log it kept, and frees its space.
    let s = quiet(dir.path());
    let after = s.volume_info("v").unwrap().allocated;
    assert!(
        after + 4 * MIB <= before,
        "the trim's space was never freed: {before} -> {after}"
    );
    let e = s.open_export("v").unwrap();
    let mut got = vec![1u8; BLOCK_SIZE];
    e.read_at(2 * MIB, &mut got).unwrap();
    assert_eq!(got, vec![0u8; BLOCK_SIZE]);
}

/// Appends one data record writing `fill` into block `block` of layer 1.
fn log_block(wal: &crate::wal::Wal, block: u64, fill: u8) {
    use crate::format::{block_hash, RecordHeader, RecordKind};
    let data = block_of(fill);
    let header = RecordHeader {
        kind: RecordKind::Data,
        nblocks: 1,
        segment: 0,
        layer: 1,
        first_block: block,
        generation: 1,
    };
    wal.append(&header, &block_hash(&data), &data, |_| ())
        .unwrap();
}

/// Cuts the last 100 bytes off WAL segment `seg`, tearing its last record.
fn tear(wal_dir: &std::path::Path, seg: u64) {
    let p = wal_dir.join(format!("{seg:016x}.wal"));
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100).unwrap();
}

/// Replays `wal_dir` into a fresh layer 1 and tells which of blocks 0..3 it holds.
fn recover_blocks(dir: &std::path::Path) -> crate::error::Result<Vec<bool>> {
    use crate::format::BlockEntry;
    let layer_dir = dir.join("layers");
    std::fs::create_dir_all(&layer_dir).unwrap();
    let layer = Arc::new(crate::layer::LayerFiles::open(&layer_dir, 1, true).unwrap());
    let layers = std::collections::HashMap::from([(1, layer.clone())]);
    super::recovery::recover(&dir.join("wal"), &layers, false)?;
    let entries = layer.read_entries(0, 3).unwrap();
    Ok(entries
        .iter()
        .map(|e| matches!(e, BlockEntry::Data(_)))
        .collect())
}

#[test]
fn a_crash_while_a_rotation_syncs_drops_the_unsealed_tail_and_starts() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    {
        let wal = crate::wal::Wal::create(&wal_dir, 1).unwrap();
        log_block(&wal, 0, 1);
        log_block(&wal, 1, 2);
    }
    // What a power cut leaves when segment 2 was in use before segment 1's sync ended.
    tear(&wal_dir, 1);
    {
        let wal = crate::wal::Wal::create(&wal_dir, 2).unwrap();
        log_block(&wal, 2, 3);
    }
    let held = recover_blocks(dir.path()).unwrap();
    assert_eq!(held, [true, false, false], "replayed up to the tear only");
    assert!(crate::wal::list_segments(&wal_dir).unwrap().is_empty());
}

#[test]
fn a_damaged_segment_whose_seal_follows_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    {
        let wal = crate::wal::Wal::create(&wal_dir, 1).unwrap();
        log_block(&wal, 0, 1);
        log_block(&wal, 1, 2);
        assert_eq!(wal.rotate().unwrap(), Some(1));
        log_block(&wal, 2, 3);
    }
    tear(&wal_dir, 1);
    let err = recover_blocks(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("segment 1 is damaged") && err.to_string().contains("seal"),
        "{err}"
    );
}

/// Flips one byte of block data in the record at `offset` of segment `seg`.
fn damage(wal_dir: &std::path::Path, seg: u64, offset: u64) {
    use std::os::unix::fs::FileExt;
    let p = wal_dir.join(format!("{seg:016x}.wal"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let at = offset + 64 + 32 + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

/// One logged block's record: header, one hash, the block.
const RECORD: u64 = 64 + 32 + BLOCK;
/// A flush marker: a bare header.
const MARKER: u64 = 64;

#[test]
fn a_bad_record_that_a_later_flush_covered_refuses_to_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    {
        let wal = crate::wal::Wal::create(&wal_dir, 1).unwrap();
        log_block(&wal, 0, 1);
        wal.sync().unwrap(); // marker 1
        log_block(&wal, 1, 2);
        wal.sync().unwrap(); // marker 2: record 2 was durable
        log_block(&wal, 2, 3);
        wal.sync().unwrap(); // makes marker 2 durable
    }
    // The middle record rots on disk after the flushes.
    damage(&wal_dir, 1, RECORD + MARKER);
    let err = recover_blocks(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "segment 1 is damaged at offset {}",
            RECORD + MARKER
        )) && msg.contains("layer 1")
            && msg.contains("flush completed"),
        "{msg}"
    );
    assert!(
        !crate::wal::list_segments(&wal_dir).unwrap().is_empty(),
        "the log must be kept for whoever repairs it"
    );
}

#[test]
fn the_operator_can_start_past_a_damaged_record_dropping_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    {
        let wal = crate::wal::Wal::create(&wal_dir, 1).unwrap();
        log_block(&wal, 0, 1);
        wal.sync().unwrap();
        log_block(&wal, 1, 2);
        wal.sync().unwrap();
        log_block(&wal, 2, 3);
        wal.sync().unwrap();
    }
    damage(&wal_dir, 1, RECORD + MARKER);
    let layer_dir = dir.path().join("layers");
    std::fs::create_dir_all(&layer_dir).unwrap();
    let layer = Arc::new(crate::layer::LayerFiles::open(&layer_dir, 1, true).unwrap());
    let layers = std::collections::HashMap::from([(1, layer.clone())]);
    super::recovery::recover(&wal_dir, &layers, true).unwrap();
    let held: Vec<bool> = layer
        .read_entries(0, 3)
        .unwrap()
        .iter()
        .map(|e| matches!(e, crate::format::BlockEntry::Data(_)))
        .collect();
    assert_eq!(held, [true, false, false]);
}

#[test]
fn a_bad_record_no_flush_covered_is_a_torn_tail_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    {
        let wal = crate::wal::Wal::create(&wal_dir, 1).unwrap();
        log_block(&wal, 0, 1);
        wal.sync().unwrap(); // marker covers record 1 only
        log_block(&wal, 1, 2);
        log_block(&wal, 2, 3);
    }
    // A power cut: the page of record 2 never reached the disk, record 3's did.
    damage(&wal_dir, 1, RECORD + MARKER);
    let held = recover_blocks(dir.path()).unwrap();
    assert_eq!(
        held,
        [true, false, false],
        "unflushed records after the tear dropped"
    );
}

#[test]
fn a_flush_with_nothing_new_does_not_sync_again_for_its_own_marker() {
    let dir = tempfile::tempdir().unwrap();
    let wal = crate::wal::Wal::create(dir.path(), 1).unwrap();
    log_block(&wal, 0, 1);
    wal.sync().unwrap();
    let len = |d: &std::path::Path| {
        std::fs::metadata(d.join(format!("{:016x}.wal", 1)))
            .unwrap()
            .len()
    };
    let after_first = len(dir.path());
    wal.sync().unwrap();
    wal.sync().unwrap();
    assert_eq!(
        len(dir.path()),
        after_first,
        "idle flushes kept appending markers"
    );
}

#[test]
fn a_reused_segment_file_replays_only_its_own_records() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    {
        let wal = crate::wal::Wal::create(&wal_dir, 1).unwrap();
        log_block(&wal, 0, 1);
        log_block(&wal, 1, 2);
        log_block(&wal, 2, 3);
        assert_eq!(wal.rotate().unwrap(), Some(1));
        // As after a checkpoint: segment 1's file is kept for reuse ...
        wal.remove_upto(1).unwrap();
        log_block(&wal, 5, 4);
        assert_eq!(wal.rotate().unwrap(), Some(2));
        // ... and becomes segment 3, still holding segment 1's records past its own.
        log_block(&wal, 2, 9);
        wal.sync().unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("spare-")) && names.len() == 2,
        "segment 1's file was not reused: {names:?}"
    );
    let held = recover_blocks(dir.path()).unwrap();
    assert_eq!(
        held,
        [false, false, true],
        "records of the file's earlier use were replayed"
    );
}

#[test]
fn flushes_that_come_during_a_flush_wait_for_it_and_share_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 16 * BLOCK).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(0, &block_of(1), false).unwrap();
    let ([paused], seen) = pause::first_of_each(&s.inner.hooks, [|p| p == Point::FlushData]);
    let leader = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || e.flush())
    };
    paused.reached();
    // Two clients write and flush while the first flush is under way.
    let followers: Vec<_> = (1..3u8)
        .map(|b| {
            let e = s.open_export("v").unwrap();
            std::thread::spawn(move || {
                e.write_at(u64::from(b) * BLOCK, &block_of(b + 1), false)
                    .and_then(|()| e.flush())
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.inner.flushes_waiting() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flushes did not wait for the flush under way"
        );
        std::thread::yield_now();
    }
    paused.release();
    leader.join().unwrap().unwrap();
    for f in followers {
        f.join().unwrap().unwrap();
    }
    let log_syncs = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|p| **p == Point::WalSync)
        .count();
    assert_eq!(log_syncs, 2, "the two later flushes shared one");
}
