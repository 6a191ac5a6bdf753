//! The log's rotation against its writers and flushers (issue #9: no fsync under the lock
//! writers need, and no flush that counts a sealed segment durable before its sync).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::format::{block_hash, RecordKind, BLOCK_SIZE};
use crate::hooks::pause;

fn append_block(wal: &Wal, fill: u8) -> Result<u64> {
    let data = vec![fill; BLOCK_SIZE];
    let header = RecordHeader {
        kind: RecordKind::Data,
        nblocks: 1,
        segment: 0,
        layer: 1,
        first_block: u64::from(fill),
        generation: 1,
    };
    wal.append(&header, &block_hash(&data), &data, |seg| seg)
        .map(|(seg, _)| seg)
}

#[test]
fn an_append_does_not_wait_for_a_rotation_to_sync_the_sealed_segment() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(Wal::create(dir.path(), 1).unwrap());
    append_block(&wal, 1).unwrap();
    let paused = pause::first(&wal.hooks, |p| matches!(p, Point::SealSync(_)));
    let rotation = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.rotate())
    };
    assert_eq!(paused.reached(), Point::SealSync(1));
    let (done_tx, done) = channel();
    let writer = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            let seg = append_block(&wal, 2);
            let _ = done_tx.send(());
            seg
        })
    };
    let in_time = done.recv_timeout(Duration::from_secs(2));
    paused.release();
    assert_eq!(rotation.join().unwrap().unwrap(), Some(1));
    let seg = writer.join().unwrap().unwrap();
    assert!(
        in_time.is_ok(),
        "an append waited while a rotation synced the sealed segment"
    );
    assert_eq!(seg, 2, "the append went to the new segment");
}

#[test]
fn a_flush_does_not_return_before_the_sealed_segment_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(Wal::create(dir.path(), 1).unwrap());
    append_block(&wal, 1).unwrap();
    let paused = pause::first(&wal.hooks, |p| matches!(p, Point::SealSync(_)));
    let rotation = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.rotate())
    };
    paused.reached();
    let (done_tx, done) = channel();
    let flusher = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            let r = append_block(&wal, 2).and_then(|_| wal.sync());
            let _ = done_tx.send(());
            r
        })
    };
    let early = done.recv_timeout(Duration::from_millis(500));
    paused.release();
    rotation.join().unwrap().unwrap();
    flusher.join().unwrap().unwrap();
    assert!(
        early.is_err(),
        "a flush returned while the sealed segment was not yet synced"
    );
}

#[test]
fn after_a_failed_seal_every_flush_and_rotation_fails_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::create(dir.path(), 1).unwrap();
    append_block(&wal, 1).unwrap();
    let failing = Arc::new(AtomicBool::new(true));
    {
        let failing = failing.clone();
        wal.hooks.set(move |p| match p {
            Point::SealSync(_) if failing.load(Ordering::SeqCst) => {
                Err(std::io::Error::from_raw_os_error(nix::libc::EIO))
            }
            _ => Ok(()),
        });
    }
    assert!(wal.rotate().is_err());
    append_block(&wal, 2).unwrap();
    assert!(
        wal.sync().is_err(),
        "a flush succeeded over an unsynced sealed segment"
    );
    assert!(
        wal.rotate().is_err(),
        "a rotation went past an unsynced sealed segment"
    );
    // The next sync would succeed, but the kernel may have dropped the pages the failed
    // one was about: nothing may be called durable until a restart replays the files.
    failing.store(false, Ordering::SeqCst);
    assert!(wal.sync().is_err(), "a flush succeeded after a failed sync");
    assert!(
        wal.rotate().is_err(),
        "a rotation succeeded after a failed sync"
    );
}

#[test]
fn flushes_that_come_during_a_sync_wait_for_it_and_share_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(Wal::create(dir.path(), 1).unwrap());
    append_block(&wal, 1).unwrap();
    let ([paused], seen) = pause::first_of_each(&wal.hooks, [|p| matches!(p, Point::LogSync)]);
    let leader = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.sync())
    };
    paused.reached();
    // Two flushes of records appended after the paused sync read how far to sync.
    let followers: Vec<_> = (2..4u8)
        .map(|fill| {
            let wal = wal.clone();
            std::thread::spawn(move || append_block(&wal, fill).and_then(|_| wal.sync()))
        })
        .collect();
    // They wait for the leader (not on `durable`, where they would wake one by one).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while wal.syncing.lock().waiting < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flushes did not wait for the sync in progress"
        );
        std::thread::yield_now();
    }
    paused.release();
    leader.join().unwrap().unwrap();
    for f in followers {
        f.join().unwrap().unwrap();
    }
    let syncs = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|p| matches!(p, Point::LogSync))
        .count();
    assert_eq!(syncs, 2, "the two later flushes shared one sync");
    // Both records are durable: only the flush marker follows the durable point.
    let (seg, pos) = {
        let d = wal.durable.lock();
        (d.seg, d.pos)
    };
    assert_eq!(seg, 1);
    assert_eq!(wal.active_end().1, pos + WAL_HEADER_LEN as u64);
}

fn records_of(dir: &Path, seg: u64) -> (usize, SegmentEnd) {
    let mut n = 0;
    let end = replay_segment(dir, seg, |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    (n, end)
}

#[test]
fn zeros_ahead_of_the_records_end_them_like_a_reused_files_old_records() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::create(dir.path(), 1).unwrap();
    append_block(&wal, 1).unwrap();
    append_block(&wal, 2).unwrap();
    wal.sync().unwrap();
    let (path, end) = wal.active_end();
    zero_fill(
        &File::options().write(true).open(&path).unwrap(),
        end + (1 << 20),
    )
    .unwrap();
    let (n, how) = records_of(dir.path(), 1);
    assert_eq!(n, 3, "two blocks and the flush marker");
    assert!(
        matches!(how, SegmentEnd::Stale { offset } if offset == end),
        "{how:?}"
    );
}

#[test]
fn a_rotation_fills_the_next_segment_with_zeros_as_far_as_the_sealed_one_reached() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::create(dir.path(), 1).unwrap();
    for b in 1..=3 {
        append_block(&wal, b).unwrap();
    }
    let (_, reached) = wal.active_end();
    assert_eq!(wal.rotate().unwrap(), Some(1));
    let (next, _) = wal.active_end();
    let len = fs::metadata(&next).unwrap().len();
    assert!(
        len >= reached,
        "segment 2 is {len} bytes, segment 1 reached {reached}"
    );
    append_block(&wal, 4).unwrap();
    wal.sync().unwrap();
    // Its seal of segment 1, the block, the flush marker; then the zeros.
    let (n, how) = records_of(dir.path(), 2);
    assert_eq!(n, 3);
    assert!(matches!(how, SegmentEnd::Stale { .. }), "{how:?}");
}

#[test]
fn spares_outlive_a_restart_and_the_next_segment_is_numbered_above_them() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::create(dir.path(), 1).unwrap();
        append_block(&wal, 1).unwrap();
        append_block(&wal, 2).unwrap();
        assert_eq!(wal.rotate().unwrap(), Some(1));
        wal.remove_upto(1).unwrap();
    }
    assert!(spare_path(dir.path(), 1).exists());
    // As after a start whose recovery replayed and removed every segment.
    fs::remove_file(seg_path(dir.path(), 2)).unwrap();
    let wal = Wal::create(dir.path(), 1).unwrap();
    append_block(&wal, 9).unwrap();
    let (path, _) = wal.active_end();
    assert_eq!(path, seg_path(dir.path(), 2), "numbered above the spare");
    assert!(!spare_path(dir.path(), 1).exists(), "the spare was reused");
    // The spare's old records (segment 1) end the new segment's.
    let (n, how) = records_of(dir.path(), 2);
    assert_eq!(n, 1);
    assert!(matches!(how, SegmentEnd::Stale { .. }), "{how:?}");
}
