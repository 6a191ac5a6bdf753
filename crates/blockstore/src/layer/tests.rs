//! The in-memory checksum table agrees with the layer's files through writes, fills and
//! punches and across reopening, costs memory only for what a layer holds, and is seen
//! whole by concurrent readers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::{Rng, SeedableRng};

use super::*;
use crate::format::block_hash;

fn sums_path(dir: &Path, id: LayerId) -> PathBuf {
    paths(dir, id).1
}

/// Entries of blocks `0..n` as the table file holds them.
fn file_entries(dir: &Path, id: LayerId, n: usize) -> Vec<BlockEntry> {
    let f = File::open(sums_path(dir, id)).unwrap();
    let mut raw = vec![0u8; n * SUM_LEN];
    read_at_or_zero(&f, &mut raw, 0).unwrap();
    raw.chunks_exact(SUM_LEN)
        .map(|c| {
            let mut e = [0u8; SUM_LEN];
            e.copy_from_slice(c);
            BlockEntry::decode(&e)
        })
        .collect()
}

/// Entries of blocks `0..n` as the layer's files say: the table file, and where it holds
/// no entry, the zero ranges its log records (read here without the layer's code).
pub(super) fn disk_entries(dir: &Path, id: LayerId, n: usize) -> Vec<BlockEntry> {
    let mut out = file_entries(dir, id, n);
    let log = fs::read(zero_log::path(dir, id)).unwrap();
    let mut zero = vec![false; n];
    for r in log[zero_log::RECORD_LEN..].chunks(zero_log::RECORD_LEN) {
        let Some((first, count, op)) = zero_log::decode(id, r) else {
            break;
        };
        let end = first.saturating_add(count).min(n as u64);
        for b in first.min(end)..end {
            zero[b as usize] = op == zero_log::Op::Zero;
        }
    }
    for (e, z) in out.iter_mut().zip(zero) {
        if z && *e == BlockEntry::Absent {
            *e = BlockEntry::Zero;
        }
    }
    out
}

fn hash(block: u64, version: u32) -> [u8; SUM_LEN] {
    let mut seed = block.to_le_bytes().to_vec();
    seed.extend_from_slice(&version.to_le_bytes());
    block_hash(&seed)
}

#[test]
fn cached_entries_agree_with_the_file_after_writes_fills_and_punches_and_across_reopen() {
    const N: u64 = 2500;
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 7, true).unwrap();
    let mut model = vec![BlockEntry::Absent; N as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for step in 0..400u32 {
        // Ranges start on a chunk boundary now and then, so whole chunks are replaced too.
        let first = if rng.gen_bool(0.3) {
            rng.gen_range(0..N / CHUNK_BLOCKS) * CHUNK_BLOCKS
        } else {
            rng.gen_range(0..N)
        };
        let n = rng.gen_range(1..=(N - first).min(700));
        match rng.gen_range(0..4) {
            0 | 1 => {
                let mut raw = Vec::new();
                for b in first..first + n {
                    let e = if rng.gen_bool(0.05) {
                        BlockEntry::Zero
                    } else {
                        BlockEntry::Data(hash(b, step))
                    };
                    raw.extend_from_slice(&e.encode());
                    model[b as usize] = e;
                }
                layer.write_entries(first, &raw).unwrap();
            }
            2 => {
                let kind = if rng.gen_bool(0.5) {
                    FillKind::Zero
                } else {
                    FillKind::Absent
                };
                layer.fill_entries(first, n, kind).unwrap();
                model[first as usize..(first + n) as usize].fill(kind.entry());
            }
            _ => layer.punch_blocks(first, n).unwrap(),
        }
        assert_eq!(
            layer.read_entries(0, N as usize).unwrap(),
            model,
            "memory after step {step}"
        );
        assert_eq!(
            disk_entries(dir.path(), 7, N as usize),
            model,
            "files after step {step}"
        );
    }
    // Ranges that end inside a chunk and reach past the table read as absent there.
    let tail = layer.read_entries(N - 3, 300).unwrap();
    assert_eq!(tail[..3], model[(N - 3) as usize..]);
    assert!(tail[3..].iter().all(|e| *e == BlockEntry::Absent));
    assert!(layer
        .read_entries(N + 1000, 5)
        .unwrap()
        .iter()
        .all(|e| *e == BlockEntry::Absent));
    assert!(layer.read_entries(0, 0).unwrap().is_empty());
    let memory = layer.table_memory_bytes();
    drop(layer);

    let layer = LayerFiles::open(dir.path(), 7, false).unwrap();
    assert_eq!(
        layer.read_entries(0, N as usize).unwrap(),
        model,
        "after reopening"
    );
    assert_eq!(
        layer.table_memory_bytes(),
        memory,
        "reloaded into the same chunks"
    );
    for _ in 0..200 {
        let first = rng.gen_range(0..N);
        let n = rng.gen_range(0..=(N - first) as usize);
        assert_eq!(
            layer.read_entries(first, n).unwrap(),
            model[first as usize..first as usize + n]
        );
    }
}

#[test]
fn memory_follows_what_the_layer_holds_not_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 1, true).unwrap();
    assert_eq!(layer.table_memory_bytes(), 0);
    // One block at the end of a 1 TiB volume: an 8 GiB sparse table, one chunk in memory.
    let far = 1u64 << 28;
    layer.write_entries(far, &hash(far, 1)).unwrap();
    assert_eq!(layer.table_memory_bytes(), CHUNK_BYTES);
    assert_eq!(layer.table_blocks().unwrap(), far + 1, "the table grew");
    // A zero fill where nothing is stored is a range: no entry memory. Over stored
    // entries it writes markers: a chunk of only markers costs no entry memory, ragged
    // edges do until they are completed.
    layer.fill_entries(5, 1000, FillKind::Zero).unwrap();
    assert_eq!(layer.table_memory_bytes(), CHUNK_BYTES);
    let data: Vec<u8> = (0..1024).flat_map(|b| hash(b, 2)).collect();
    layer.write_entries(0, &data).unwrap();
    assert_eq!(layer.table_memory_bytes(), 9 * CHUNK_BYTES);
    layer.fill_entries(5, 1000, FillKind::Zero).unwrap();
    assert_eq!(layer.table_memory_bytes(), 3 * CHUNK_BYTES);
    layer.fill_entries(0, 5, FillKind::Zero).unwrap();
    layer.fill_entries(1005, 19, FillKind::Zero).unwrap();
    assert_eq!(layer.table_memory_bytes(), CHUNK_BYTES);
    assert_eq!(
        layer.read_entries(1020, 8).unwrap(),
        [[BlockEntry::Zero; 4], [BlockEntry::Absent; 4]].concat()
    );
    // Once a sync made the ranges durable, the marker pages go.
    layer.sync().unwrap();
    assert_eq!(
        layer.table.state.read().chunks.len(),
        1,
        "only the far chunk"
    );
    assert_eq!(
        layer.read_entries(1020, 8).unwrap(),
        [[BlockEntry::Zero; 4], [BlockEntry::Absent; 4]].concat()
    );
    drop(layer);

    // Reopening reads only the table's data regions (the holes of 8 GiB would take
    // seconds) and keeps the same shape.
    let started = std::time::Instant::now();
    let layer = LayerFiles::open(dir.path(), 1, false).unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "loading took {:?}",
        started.elapsed()
    );
    assert_eq!(layer.table_memory_bytes(), CHUNK_BYTES);
    assert_eq!(
        layer.read_entries(far, 2).unwrap(),
        [BlockEntry::Data(hash(far, 1)), BlockEntry::Absent]
    );
    assert_eq!(layer.read_entries(17, 1).unwrap(), [BlockEntry::Zero]);
    // Trimming everything gives the memory back.
    layer.fill_entries(0, far + 1, FillKind::Absent).unwrap();
    assert_eq!(layer.table_memory_bytes(), 0);
    assert!(layer.table.state.read().chunks.is_empty());
    assert_eq!(layer.table.state.read().zeros.len(), 0);
    assert!(layer.read_entries(far, 1).unwrap()[0] == BlockEntry::Absent);
    assert_eq!(
        file_entries(dir.path(), 1, 2000),
        vec![BlockEntry::Absent; 2000]
    );
}

#[test]
fn a_missing_layer_file_is_an_error_naming_it_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 3, true).unwrap();
    layer.fill_entries(10, 5, FillKind::Zero).unwrap();
    drop(layer);
    let (data, sums) = paths(dir.path(), 3);
    let zeros = zero_log::path(dir.path(), 3);
    let marker = zero_log::marker_path(dir.path());
    for gone in [&sums, &data, &zeros, &marker] {
        let kept = fs::read(gone).unwrap();
        fs::remove_file(gone).unwrap();
        let err = LayerFiles::open(dir.path(), 3, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&gone.display().to_string()), "{err}");
        if gone != &marker {
            assert!(err.contains("layer 3"), "{err}");
        }
        assert!(
            !gone.exists(),
            "open without create made {}",
            gone.display()
        );
        fs::write(gone, kept).unwrap();
        let layer = LayerFiles::open(dir.path(), 3, false).unwrap();
        assert_eq!(layer.read_entries(10, 1).unwrap(), [BlockEntry::Zero]);
    }
}

#[test]
fn remove_takes_every_file_of_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 4, true).unwrap();
    layer.fill_entries(0, 8, FillKind::Zero).unwrap();
    drop(layer);
    drop(LayerFiles::open(dir.path(), 5, true).unwrap());
    // What a rewrite cut short leaves.
    fs::write(dir.path().join(format!("{:016x}.zeros.tmp", 4)), b"x").unwrap();
    LayerFiles::remove(dir.path(), 4).unwrap();
    LayerFiles::remove(dir.path(), 4).unwrap();
    let mut left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let five = |ext: &str| format!("{:016x}.{ext}", 5);
    assert_eq!(
        left,
        [
            five("data"),
            five("sums"),
            five("zeros"),
            "zero-ranges".into()
        ]
    );
}

#[test]
fn a_write_of_several_entries_is_seen_whole_by_concurrent_readers() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Arc::new(LayerFiles::open(dir.path(), 1, true).unwrap());
    // 300 entries from block 100: three chunks, two of them partly.
    const FIRST: u64 = 100;
    const N: usize = 300;
    let version = |v: u8| [v; SUM_LEN].repeat(N);
    layer.write_entries(FIRST, &version(1)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (layer, done) = (layer.clone(), done.clone());
            std::thread::spawn(move || {
                let mut last = 1u8;
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) || reads == 0 {
                    let entries = layer.read_entries(FIRST, N).unwrap();
                    let BlockEntry::Data(h) = entries[0] else {
                        panic!("entry 0 is {:?}", entries[0]);
                    };
                    let v = h[0];
                    assert!(
                        entries.iter().all(|e| *e == BlockEntry::Data([v; SUM_LEN])),
                        "a read saw parts of two writes"
                    );
                    assert!(v >= last, "a read went back from version {last} to {v}");
                    last = v;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for v in 2..=250u8 {
        layer.write_entries(FIRST, &version(v)).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
}
