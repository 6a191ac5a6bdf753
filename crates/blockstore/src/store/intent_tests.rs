//! Overwrite intents (issue #9, 1M sequential writes): a stream of placed overwrites
//! syncs the log once per intent, not once per write, and recovery keeps what such
//! writes left on disk when their own records were lost.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use super::placed_tests::{data_of, filled, fresh, quiet, read, Crash, N};
use crate::format::{
    block_hash, BlockEntry, FillKind, RecordHeader, RecordKind, BLOCK_SIZE, WAL_HEADER_LEN,
};
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
fn an_intent_never_serves_the_stale_bytes_under_a_marker() {
    // A flushed trim left its marker (durable) over the old data, not punched yet; an
    // intent over the block keeps the marker: those bytes are older than the trim.
    let c = Crash::new();
    c.stored(1);
    c.layer.fill_entries(0, 1, FillKind::Zero).unwrap();
    intent(&c);
    assert_eq!(c.recover().0, BlockEntry::Zero);
}

#[test]
fn an_overwrite_of_a_pending_write_into_a_hole_syncs_its_own_record() {
    // The table holds no data there (the first write is still pending), so the bytes
    // under an intent could not be trusted at recovery: the overwrite makes its own
    // record durable instead.
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, N), false).unwrap();
    let syncs = count_syncs(&s);
    e.write_at(0, &filled(2, N), false).unwrap();
    assert_eq!(*syncs.lock(), 1);
    e.write_at(0, &filled(3, N), false).unwrap();
    assert_eq!(
        *syncs.lock(),
        2,
        "no intent may cover blocks without a data entry"
    );
    assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(3, N));
}

#[test]
fn an_overwrite_of_a_placed_write_that_replaced_a_logged_one_syncs_its_own_record() {
    // Power-loss harness, seed 0x9d15c0009 cycle 175: a logged write L, a placed write P
    // over it (flushed), then an overwrite under an intent whose record the cut lost and
    // whose data landed. Recovery walks back past P (its data is gone) and finds L, older
    // than the flushed P. So an overwrite of a placed version with a logged one still in
    // the log behind it makes its own record durable: recovery then finds it.
    let (_dir, s, e) = fresh();
    e.write_at(0, &filled(1, 2 * N), false).unwrap();
    s.checkpoint().unwrap();
    e.write_at(0, &filled(2, 1), false).unwrap();
    let syncs = count_syncs(&s);
    e.write_at(0, &filled(3, N), false).unwrap();
    let after_p = *syncs.lock();
    e.write_at(0, &filled(4, N), false).unwrap();
    assert_eq!(
        *syncs.lock(),
        after_p + 1,
        "the overwrite of P relied on an intent while L is in the log"
    );
    // Past L's blocks, within the intent: no sync.
    e.write_at((N * BLOCK_SIZE) as u64, &filled(5, N), false)
        .unwrap();
    assert_eq!(*syncs.lock(), after_p + 1);
    assert_eq!(read(&e, 0, N * BLOCK_SIZE), filled(4, N));
}

#[test]
fn recovery_takes_a_logged_version_over_bytes_no_version_names() {
    // Power-loss harness, seed 0x9d15c0009 cycle 42: a placed write P0 replaced by a
    // logged one L in the next segment; the checkpoint deleted P0's record without naming
    // it (L is newer); a placed write P over L did not land. The bytes in place are P0's,
    // older than L, matching nothing: L is taken, not the bytes.
    let c = Crash::new();
    c.stored(1);
    c.layer.write_blocks(0, &filled(9, 1)).unwrap();
    c.logged(2);
    c.placed(3, false);
    intent(&c);
    assert_eq!(c.recover(), data_of(2));
}

#[test]
fn an_entry_a_cut_checkpoint_left_without_its_data_is_not_taken_for_durable_data() {
    // Power-loss harness, seed 0x9d15c0009 cycle 161: a checkpoint copying a logged write
    // L wrote its data and entry and was cut before its layer sync; the table page reached
    // the disk, the data page did not. A newer placed write P (record durable, data not
    // landed) and an intent cover the block. The bytes in place are older than L: L (in
    // the log) must win, not the bytes.
    let c = Crash::new();
    c.stored(1);
    c.logged(2);
    c.layer
        .write_entries(0, &block_hash(&filled(2, 1)))
        .unwrap();
    c.placed(3, false);
    intent(&c);
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
