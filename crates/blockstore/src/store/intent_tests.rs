//! Overwrite intents (issue #9, 1M sequential writes): a stream of placed overwrites
//! syncs the log once per intent, not once per write, and recovery keeps what such
//! writes left on disk when their own records were lost.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use super::placed_tests::{data_of, filled, fresh, quiet, read, Crash, N};
use crate::format::{block_hash, BlockEntry, RecordHeader, RecordKind, BLOCK_SIZE, WAL_HEADER_LEN};
use crate::hooks::Point;

/// Counts the log syncs of the store from now on.
fn count_syncs(s: &super::Store) -> Arc<Mutex<usize>> {
    let n = Arc::new(Mutex::new(0));
    let c = n.clone();
    s.inner.hooks.set(move |p| {
        if p == Point::WalSync {
            *c.lock() += 1;
        }
        Ok(())
    });
    n
}

#[test]
fn a_stream_of_overwrites_syncs_the_log_once_per_intent_not_once_per_write() {
    let (_dir, s, e) = fresh();
    // 4 MiB of checkpointed data, so every later write overwrites data in place.
    for i in 0..16u64 {
        e.write_at(i * (N * BLOCK_SIZE) as u64 * 4, &filled(1, 4 * N), false)
            .unwrap();
    }
    s.checkpoint().unwrap();
    let syncs = count_syncs(&s);
    // 16 sequential 64 KiB overwrites: one intent (16 writes' worth) covers them all.
    for i in 0..16u64 {
        e.write_at(i * (N * BLOCK_SIZE) as u64, &filled(2, N), false)
            .unwrap();
    }
    assert_eq!(*syncs.lock(), 1, "one log sync for the whole stream");
    // Past the intent's range: a new intent, one more sync.
    e.write_at(2 << 20, &filled(3, N), false).unwrap();
    assert_eq!(*syncs.lock(), 2);
    assert_eq!(read(&e, 0, 16 * N * BLOCK_SIZE), filled(2, 16 * N));
    assert_eq!(read(&e, 2 << 20, N * BLOCK_SIZE), filled(3, N));
}

#[test]
fn an_intent_stops_covering_overwrites_once_the_checkpoint_removed_its_segment() {
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, N), false).unwrap();
    s.checkpoint().unwrap();
    let syncs = count_syncs(&s);
    e.write_at(0, &filled(2, N), false).unwrap();
    assert_eq!(*syncs.lock(), 1);
    // The checkpoint syncs the log itself; count from after it.
    s.checkpoint().unwrap();
    let after = *syncs.lock();
    e.write_at(0, &filled(3, N), false).unwrap();
    assert_eq!(
        *syncs.lock(),
        after + 1,
        "an overwrite after the intent's segment went must log a new intent"
    );
    assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(3, N));
}

fn intent(c: &Crash) {
    c.record(RecordKind::Overwrite, &[], &[]);
}

#[test]
fn recovery_keeps_an_overwrite_whose_record_was_lost_under_an_intent() {
    let c = Crash::new();
    c.stored(1);
    intent(&c);
    // The placed write's data landed, its record did not.
    c.layer.write_blocks(0, &filled(2, 1)).unwrap();
    assert_eq!(c.recover(), data_of(2));
}

#[test]
fn recovery_keeps_a_torn_overwrite_whose_record_was_lost_under_an_intent() {
    let c = Crash::new();
    c.stored(1);
    intent(&c);
    let mut torn = filled(1, 1);
    torn[..BLOCK_SIZE / 2].fill(2);
    c.layer.write_blocks(0, &torn).unwrap();
    assert_eq!(c.recover(), (BlockEntry::Data(block_hash(&torn)), torn));
}

#[test]
fn an_intent_alone_changes_nothing() {
    let c = Crash::new();
    c.stored(1);
    intent(&c);
    assert_eq!(c.recover(), data_of(1));
    // Over a hole it leaves the hole.
    let c = Crash::new();
    intent(&c);
    assert_eq!(c.recover().0, BlockEntry::Absent);
}

#[test]
fn recovery_keeps_an_overwrite_of_a_flushed_placed_write_into_a_hole() {
    // P1 went into a hole and was flushed (record and data durable); P2 overwrote it
    // under an intent and its record was lost: P2's data is what is there.
    let c = Crash::new();
    c.placed(1, true);
    intent(&c);
    c.layer.write_blocks(0, &filled(2, 1)).unwrap();
    assert_eq!(c.recover(), data_of(2));
}

#[test]
fn a_lost_write_into_a_hole_then_a_lost_overwrite_leave_the_hole() {
    // P1 into a hole (record durable, data lost), P2 over it under an intent (record
    // and data lost): the block is still a hole, not a block of zeroes hiding a backing.
    let c = Crash::new();
    c.placed(1, false);
    intent(&c);
    assert_eq!(c.recover().0, BlockEntry::Absent);
}

/// Copies a store's directory as it is (the store keeps running), skipping sockets.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for ent in std::fs::read_dir(from).unwrap() {
        let ent = ent.unwrap();
        let ty = ent.file_type().unwrap();
        let dest = to.join(ent.file_name());
        if ty.is_dir() {
            copy_dir(&ent.path(), &dest);
        } else if ty.is_file() {
            std::fs::copy(ent.path(), dest).unwrap();
        }
    }
}

/// Cuts the newest WAL segment right after its last overwrite intent, as a power cut
/// that lost every record written after the intent's sync would.
fn cut_after_last_intent(wal_dir: &Path) {
    let mut segs: Vec<_> = std::fs::read_dir(wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.ends_with(".wal") && !name.starts_with("spare")
        })
        .collect();
    segs.sort();
    let seg = segs.last().expect("a WAL segment");
    let bytes = std::fs::read(seg).unwrap();
    let (mut off, mut cut) = (0usize, None);
    while off + WAL_HEADER_LEN <= bytes.len() {
        let mut head = [0u8; WAL_HEADER_LEN];
        head.copy_from_slice(&bytes[off..off + WAL_HEADER_LEN]);
        let Ok(h) = RecordHeader::decode_unchecked(&head) else {
            break;
        };
        off += WAL_HEADER_LEN + h.payload_len();
        if h.kind == RecordKind::Overwrite {
            cut = Some(off);
        }
    }
    let cut = cut.expect("an overwrite intent in the newest segment");
    std::fs::OpenOptions::new()
        .write(true)
        .open(seg)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();
}

#[test]
fn overwrites_whose_records_a_crash_lost_read_back_as_written_not_as_corruption() {
    let (dir, s, e) = fresh();
    e.write_at(0, &filled(1, 4 * N), false).unwrap();
    e.flush().unwrap();
    s.checkpoint().unwrap();
    // Four overwrites under one intent; the test then drops every record after it.
    for i in 0..4u64 {
        e.write_at(i * (N * BLOCK_SIZE) as u64, &filled(2 + i as u8, N), false)
            .unwrap();
    }
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    cut_after_last_intent(&copy.path().join("wal"));
    drop(e);
    drop(s);
    let s = quiet(copy.path());
    let e = s.open_export("v").unwrap();
    for i in 0..4u64 {
        assert_eq!(
            read(&e, i * (N * BLOCK_SIZE) as u64, N * BLOCK_SIZE),
            filled(2 + i as u8, N),
            "write {i}"
        );
    }
    assert!(s.scrub().unwrap().bad.is_empty());
}
