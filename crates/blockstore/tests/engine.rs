//! The block store engine against its promises, through its public API.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use tessera_blockstore::format::RecordKind;
use tessera_blockstore::{wal, Allocation, Store, StoreError, StoreOptions, BLOCK_SIZE};

const MIB: u64 = 1 << 20;

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).expect("opening the store")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8 ^ (i >> 8) as u8))
        .collect()
}

fn read(store: &Store, export: &str, off: u64, len: usize) -> Vec<u8> {
    let e = store.open_export(export).expect("opening the export");
    let mut buf = vec![0u8; len];
    e.read_at(off, &mut buf).expect("reading back");
    buf
}

#[test]
fn writes_survive_reopen_with_and_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.create_volume("v", 8 * MIB).unwrap();
        let e = s.open_export("v").unwrap();
        e.write_at(0, &pattern(1, 3 * BLOCK_SIZE), false).unwrap();
        s.checkpoint().unwrap();
        e.write_at(5000, &pattern(2, 10_000), false).unwrap();
        e.flush().unwrap();
        assert_eq!(read(&s, "v", 5000, 10_000), pattern(2, 10_000));
    }
    let s = open(dir.path());
    let mut expect = pattern(1, 3 * BLOCK_SIZE);
    expect.resize(20_000, 0);
    expect[5000..15_000].copy_from_slice(&pattern(2, 10_000));
    assert_eq!(read(&s, "v", 0, 20_000), expect);
}

#[test]
fn unwritten_volume_reads_zero_and_is_thin() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let info = s.create_volume("big", 1 << 40).unwrap();
    assert_eq!(info.size, 1 << 40);
    assert_eq!(info.allocated, 0);
    assert_eq!(read(&s, "big", (1 << 40) - 8192, 8192), vec![0u8; 8192]);
    let e = s.open_export("big").unwrap();
    let ext = e.extents(0, 1 << 30).unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].allocation, Allocation::Hole);
}

#[test]
fn trim_frees_space_and_reads_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_volume("v", 16 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(0, &pattern(3, 8 * MIB as usize), false).unwrap();
    s.checkpoint().unwrap();
    let before = s.volume_info("v").unwrap().allocated;
    assert!(before >= 8 * MIB, "allocated {before}");
    e.trim(MIB, 4 * MIB, false).unwrap();
    assert_eq!(read(&s, "v", MIB, 4096), vec![0u8; 4096]);
    s.checkpoint().unwrap();
    let after = s.volume_info("v").unwrap().allocated;
    assert!(
        after <= before - 4 * MIB,
        "trim freed nothing: {before} -> {after}"
    );
    let ext = e.extents(0, 16 * MIB).unwrap();
    let kinds: Vec<_> = ext.iter().map(|x| (x.length, x.allocation)).collect();
    assert_eq!(
        kinds,
        vec![
            (MIB, Allocation::Data),
            (4 * MIB, Allocation::Hole),
            (3 * MIB, Allocation::Data),
            (8 * MIB, Allocation::Hole)
        ]
    );
}

#[test]
fn unaligned_zeroing_keeps_neighbouring_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_volume("v", MIB).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(0, &pattern(4, 5 * BLOCK_SIZE), false).unwrap();
    e.write_zeroes(100, 3 * BLOCK_SIZE as u64, false, false)
        .unwrap();
    let got = read(&s, "v", 0, 5 * BLOCK_SIZE);
    let mut want = pattern(4, 5 * BLOCK_SIZE);
    want[100..100 + 3 * BLOCK_SIZE].fill(0);
    assert_eq!(got, want);
    // NO_HOLE: zeroes are stored as data.
    e.write_zeroes(8 * BLOCK_SIZE as u64, BLOCK_SIZE as u64, true, false)
        .unwrap();
    let ext = e.extents(8 * BLOCK_SIZE as u64, BLOCK_SIZE as u64).unwrap();
    assert_eq!(ext[0].allocation, Allocation::Data);
}

#[test]
fn snapshot_freezes_and_clone_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_volume("base", 4 * MIB).unwrap();
    let e = s.open_export("base").unwrap();
    e.write_at(0, &pattern(5, 2 * BLOCK_SIZE), false).unwrap();
    let snap = s.create_snapshot("base", "s1").unwrap();
    assert_eq!(snap.export, "base@s1");
    e.write_at(0, &pattern(6, BLOCK_SIZE), false).unwrap();
    e.trim(BLOCK_SIZE as u64, BLOCK_SIZE as u64, false).unwrap();

    assert_eq!(read(&s, "base", 0, BLOCK_SIZE), pattern(6, BLOCK_SIZE));
    assert_eq!(read(&s, "base", 4096, BLOCK_SIZE), vec![0; BLOCK_SIZE]);
    assert_eq!(
        read(&s, "base@s1", 0, 2 * BLOCK_SIZE),
        pattern(5, 2 * BLOCK_SIZE)
    );

    let ro = s.open_export("base@s1").unwrap();
    assert!(ro.read_only());
    assert!(matches!(
        ro.write_at(0, &[1; 512], false),
        Err(StoreError::ReadOnly)
    ));
    drop(ro);

    let c = s.clone_snapshot("base", "s1", "child").unwrap();
    assert_eq!(c.origin.as_deref(), Some("base@s1"));
    assert_eq!(c.allocated, 0, "a clone copies no data");
    let ce = s.open_export("child").unwrap();
    ce.write_at(4096, &pattern(7, BLOCK_SIZE), false).unwrap();
    assert_eq!(read(&s, "child", 0, BLOCK_SIZE), pattern(5, BLOCK_SIZE));
    assert_eq!(read(&s, "child", 4096, BLOCK_SIZE), pattern(7, BLOCK_SIZE));
    assert_eq!(
        read(&s, "base@s1", 4096, BLOCK_SIZE),
        pattern(5, 2 * BLOCK_SIZE)[4096..]
    );
    drop((e, ce));

    // Deleting the origin keeps the clone's data: its layers are still referenced.
    s.delete_volume("base").unwrap();
    s.checkpoint().unwrap();
    drop(s);
    let s = open(dir.path());
    assert_eq!(read(&s, "child", 0, BLOCK_SIZE), pattern(5, BLOCK_SIZE));
    assert!(matches!(
        s.open_export("base@s1"),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn corrupt_block_fails_the_read_and_scrub_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_volume("v", MIB).unwrap();
    s.create_volume("w", MIB).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(0, &pattern(8, 4 * BLOCK_SIZE), false).unwrap();
    s.checkpoint().unwrap();
    assert!(s.scrub().unwrap().bad.is_empty());

    // Flip one byte of block 2 behind the store's back (bit rot).
    let layer_dir = dir.path().join("layers");
    let data = std::fs::read_dir(&layer_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "data") && std::fs::metadata(p).unwrap().len() > 0
        })
        .unwrap();
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[2 * BLOCK_SIZE + 17] ^= 0x01;
    std::fs::write(&data, bytes).unwrap();

    let mut buf = vec![0u8; 4 * BLOCK_SIZE];
    assert!(matches!(
        e.read_at(0, &mut buf),
        Err(StoreError::Corrupt { block: 2, .. })
    ));
    // Blocks around it still read.
    let mut one = vec![0u8; BLOCK_SIZE];
    e.read_at(3 * BLOCK_SIZE as u64, &mut one).unwrap();
    assert_eq!(one, pattern(8, 4 * BLOCK_SIZE)[3 * BLOCK_SIZE..]);

    let report = s.scrub().unwrap();
    assert_eq!(report.bad.len(), 1);
    assert_eq!(report.bad[0].offset, 2 * BLOCK_SIZE as u64);
    assert_eq!(report.bad[0].affects, vec!["v".to_string()]);
    assert_eq!(report.blocks_checked, 4);
}

#[test]
fn bad_requests_are_refused_without_change() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert!(matches!(
        s.create_volume("bad name", MIB),
        Err(StoreError::Invalid { field: "name", .. })
    ));
    assert!(matches!(
        s.create_volume("v", 1000),
        Err(StoreError::Invalid { field: "size", .. })
    ));
    s.create_volume("v", MIB).unwrap();
    assert!(matches!(
        s.create_volume("v", MIB),
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.resize_volume("v", MIB / 2),
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(s.resize_volume("v", 2 * MIB).unwrap().size, 2 * MIB);
    let e = s.open_export("v").unwrap();
    assert!(matches!(
        e.write_at(2 * MIB - 10, &[0; 20], false),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        e.read_at(u64::MAX - 5, &mut [0; 20]),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(s.delete_volume("v"), Err(StoreError::Busy(..))));
    drop(e);
    s.delete_volume("v").unwrap();
    assert!(s.list_volumes().is_empty());
    assert!(matches!(
        Store::open(dir.path(), StoreOptions::default()),
        Err(StoreError::Locked(_))
    ));
}

#[test]
fn unaligned_writes_to_one_block_from_many_threads_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_volume("v", MIB).unwrap();
    let e = Arc::new(s.open_export("v").unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                for round in 0..50u8 {
                    e.write_at(u64::from(t) * 512, &[t ^ round; 512], false)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut buf = vec![0u8; BLOCK_SIZE];
    e.read_at(0, &mut buf).unwrap();
    for t in 0..8u8 {
        assert!(buf[t as usize * 512..(t as usize + 1) * 512]
            .iter()
            .all(|b| *b == t ^ 49));
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        block: u64,
        off: u16,
        len: u32,
        seed: u8,
    },
    Trim {
        block: u64,
        blocks: u8,
    },
    Zero {
        off: u32,
        len: u16,
        allocate: bool,
    },
    Snapshot,
    Checkpoint,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..60u64, 0..4096u16, 1..9000u32, any::<u8>()).prop_map(|(block, off, len, seed)| Op::Write { block, off, len, seed }),
        // Large enough to be written in place (64 KiB and more), aligned or not.
        3 => (0..60u64, prop_oneof![Just(0u16), 0..4096u16], 65536..120_000u32, any::<u8>()).prop_map(|(block, off, len, seed)| Op::Write { block, off, len, seed }),
        2 => (0..60u64, 1..8u8).prop_map(|(block, blocks)| Op::Trim { block, blocks }),
        2 => (0..200_000u32, 1..20_000u16, any::<bool>()).prop_map(|(off, len, allocate)| Op::Zero { off, len, allocate }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// The volume and every snapshot always read exactly what a flat byte array would.
    #[test]
    fn volume_and_snapshots_match_a_flat_model(ops in proptest::collection::vec(op(), 1..40)) {
        const SIZE: u64 = 64 * 4096;
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_volume("v", SIZE).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let mut snaps: HashMap<String, Vec<u8>> = HashMap::new();
        for op in ops {
            match op {
                Op::Write { block, off, len, seed } => {
                    let start = (block * 4096 + u64::from(off)).min(SIZE - 1);
                    let len = u64::from(len).min(SIZE - start) as usize;
                    let data = pattern(seed, len);
                    store.open_export("v").unwrap().write_at(start, &data, false).unwrap();
                    model[start as usize..start as usize + len].copy_from_slice(&data);
                }
                Op::Trim { block, blocks } => {
                    let start = block * 4096;
                    let len = (u64::from(blocks) * 4096).min(SIZE - start);
                    store.open_export("v").unwrap().trim(start, len, false).unwrap();
                    model[start as usize..(start + len) as usize].fill(0);
                }
                Op::Zero { off, len, allocate } => {
                    let start = u64::from(off).min(SIZE - 1);
                    let len = u64::from(len).min(SIZE - start);
                    store.open_export("v").unwrap().write_zeroes(start, len, allocate, false).unwrap();
                    model[start as usize..(start + len) as usize].fill(0);
                }
                Op::Snapshot => {
                    let name = format!("s{}", snaps.len());
                    store.create_snapshot("v", &name).unwrap();
                    snaps.insert(format!("v@{name}"), model.clone());
                }
                Op::Checkpoint => store.checkpoint().unwrap(),
                Op::Reopen => {
                    drop(store);
                    store = open(dir.path());
                }
            }
            prop_assert!(read(&store, "v", 0, SIZE as usize) == model, "volume diverged");
        }
        for (name, content) in &snaps {
            prop_assert!(&read(&store, name, 0, SIZE as usize) == content, "{} diverged", name);
        }
        prop_assert!(store.scrub().unwrap().bad.is_empty());
    }
}

#[test]
fn clean_close_leaves_nothing_to_replay() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.create_volume("v", MIB).unwrap();
        s.open_export("v")
            .unwrap()
            .write_at(0, &pattern(9, 8192), false)
            .unwrap();
        assert!(std::fs::read_dir(dir.path().join("wal")).unwrap().count() > 0);
    }
    // The segment left active may hold the seal record of the one before it, nothing else.
    let wal_dir = dir.path().join("wal");
    let mut records = Vec::new();
    for seg in wal::list_segments(&wal_dir).unwrap() {
        wal::replay_segment(&wal_dir, seg, |rec| {
            if rec.header.kind != RecordKind::Seal {
                records.push((seg, rec.header));
            }
            Ok(())
        })
        .unwrap();
    }
    assert!(
        records.is_empty(),
        "WAL records left after a clean close: {records:?}"
    );
    let data_len: u64 = std::fs::read_dir(dir.path().join("layers"))
        .unwrap()
        .map(|e| std::fs::metadata(e.unwrap().path()).unwrap().len())
        .sum();
    assert!(
        data_len >= 8192,
        "the checkpoint did not write the layer files"
    );
}

#[test]
fn torn_wal_tail_is_dropped_and_earlier_records_replayed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.create_volume("v", MIB).unwrap();
        s.checkpoint().unwrap();
    }
    // Forge what a crash leaves: a segment with one whole record and a torn second one,
    // produced by a store that is then dropped without its final checkpoint running.
    let wal = dir.path().join("wal");
    {
        let s = open(dir.path());
        let e = s.open_export("v").unwrap();
        e.write_at(0, &pattern(1, BLOCK_SIZE), false).unwrap();
        e.write_at(4096, &pattern(2, BLOCK_SIZE), false).unwrap();
        e.flush().unwrap();
        let seg = std::fs::read_dir(&wal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        let bytes = std::fs::read(&seg).unwrap();
        let copy = dir.path().join("saved.wal");
        // Keep the first record whole and cut the second in the middle of its data.
        let record = 64 + 32 + BLOCK_SIZE;
        std::fs::write(&copy, &bytes[..record + 64 + 32 + 100]).unwrap();
        drop(e);
        drop(s);
        // The clean close checkpointed; put the layers back to empty and the torn log in.
        // Only data and checksum tables: the zero-range log and marker keep their format.
        for f in std::fs::read_dir(dir.path().join("layers")).unwrap() {
            let path = f.unwrap().path();
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("data" | "sums")
            ) {
                continue;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        for f in std::fs::read_dir(&wal).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        std::fs::rename(&copy, &seg).unwrap();
    }
    let s = open(dir.path());
    assert_eq!(
        read(&s, "v", 0, BLOCK_SIZE),
        pattern(1, BLOCK_SIZE),
        "whole record replayed"
    );
    assert_eq!(
        read(&s, "v", 4096, BLOCK_SIZE),
        vec![0; BLOCK_SIZE],
        "torn record dropped"
    );
    assert!(s.scrub().unwrap().bad.is_empty());
}
