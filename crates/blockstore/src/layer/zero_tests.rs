//! Zero ranges: a trim of a layer over a backing layer writes a range, not a marker per
//! block; every order of writes, zero fills and absent fills reads as a simple model says,
//! in memory, across reopening and in every state a crash can leave; a torn log tail is
//! ignored; layers older than zero-range files open with none.

use std::os::unix::fs::MetadataExt;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::tests::disk_entries;
use super::*;
use crate::format::block_hash;

const TIB_BLOCKS: u64 = (1u64 << 40) / BLOCK;

fn data_entry(block: u64, version: u64) -> BlockEntry {
    let mut seed = block.to_le_bytes().to_vec();
    seed.extend_from_slice(&version.to_le_bytes());
    BlockEntry::Data(block_hash(&seed))
}

fn raw(entries: &[BlockEntry]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.encode()).collect()
}

/// Bytes a file takes on disk.
fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

fn sums_of(dir: &Path, id: LayerId) -> PathBuf {
    paths(dir, id).1
}

#[test]
fn trimming_a_tib_of_a_clone_layer_writes_a_range_not_a_marker_per_block() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 1, true).unwrap();
    // A clone that has taken a few writes here and there.
    let written = [3u64, 5000, 1 << 20, TIB_BLOCKS - 1];
    for &b in &written {
        layer.write_entries(b, &data_entry(b, 1).encode()).unwrap();
    }
    layer.sync().unwrap();
    let sums = sums_of(dir.path(), 1);
    let before = allocated(&sums);

    let started = std::time::Instant::now();
    layer.fill_entries(0, TIB_BLOCKS, FillKind::Zero).unwrap();
    let took = started.elapsed();
    layer.sync().unwrap();

    // Markers went only where entries were stored (a page each), then were punched
    // out once the range was durable: the table took no new space.
    assert!(
        allocated(&sums) <= before,
        "the table grew from {before} to {} bytes",
        allocated(&sums)
    );
    assert!(
        took < std::time::Duration::from_secs(2),
        "the trim took {took:?}"
    );
    let log = zero_log::path(dir.path(), 1);
    assert_eq!(
        fs::metadata(&log).unwrap().len(),
        2 * zero_log::RECORD_LEN as u64,
        "header and one record"
    );
    assert_eq!(layer.table_memory_bytes(), 0);
    assert_eq!(layer.table_blocks().unwrap(), TIB_BLOCKS);
    for b in written
        .iter()
        .copied()
        .chain([0, 4, 4999, 5001, TIB_BLOCKS / 2])
    {
        assert_eq!(
            layer.read_entries(b, 1).unwrap(),
            [BlockEntry::Zero],
            "block {b}"
        );
    }
    assert_eq!(
        layer.read_entries(TIB_BLOCKS - 2, 4).unwrap(),
        [
            BlockEntry::Zero,
            BlockEntry::Zero,
            BlockEntry::Absent,
            BlockEntry::Absent
        ]
    );
    // Data written after the trim wins over the range; a second trim wins over it.
    layer
        .write_entries(77, &data_entry(77, 2).encode())
        .unwrap();
    assert_eq!(layer.read_entries(77, 1).unwrap(), [data_entry(77, 2)]);
    drop(layer);

    let layer = LayerFiles::open(dir.path(), 1, false).unwrap();
    assert_eq!(
        layer.read_entries(76, 3).unwrap(),
        [BlockEntry::Zero, data_entry(77, 2), BlockEntry::Zero]
    );
    layer.fill_entries(0, TIB_BLOCKS, FillKind::Zero).unwrap();
    assert_eq!(layer.read_entries(77, 1).unwrap(), [BlockEntry::Zero]);
    // The range was covered already: the log did not grow.
    assert_eq!(
        fs::metadata(&log).unwrap().len(),
        2 * zero_log::RECORD_LEN as u64
    );
}

#[test]
fn trimming_many_stored_entries_punches_them_out_of_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 1, true).unwrap();
    // 64 MiB written: 128 table pages, more than a fill replaces with markers.
    let n = 16384u64;
    let entries: Vec<BlockEntry> = (0..n).map(|b| data_entry(b, 1)).collect();
    layer.write_entries(0, &raw(&entries)).unwrap();
    layer.sync().unwrap();
    let sums = sums_of(dir.path(), 1);
    let before = allocated(&sums);
    assert!(before >= n * SUM_LEN as u64);
    layer.fill_entries(100, n - 200, FillKind::Zero).unwrap();
    assert!(
        allocated(&sums) <= before - (n - 456) * SUM_LEN as u64,
        "{before} -> {}",
        allocated(&sums)
    );
    let want: Vec<BlockEntry> = (0..n)
        .map(|b| {
            if (100..n - 100).contains(&b) {
                BlockEntry::Zero
            } else {
                data_entry(b, 1)
            }
        })
        .collect();
    assert_eq!(layer.read_entries(0, n as usize).unwrap(), want);
    drop(layer);
    let layer = LayerFiles::open(dir.path(), 1, false).unwrap();
    assert_eq!(layer.read_entries(0, n as usize).unwrap(), want);
}

/// One step of the model test.
#[derive(Clone, Debug)]
enum Step {
    /// Entries from `first`: data, zero or absent by `kinds` (0..=9 data, 10 zero, 11 absent).
    Write {
        first: u64,
        kinds: Vec<u8>,
    },
    /// Data entries for `n` blocks from `first` (many table pages at once).
    WriteData {
        first: u64,
        n: u64,
    },
    Fill {
        first: u64,
        n: u64,
        zero: bool,
    },
    Sync,
    Reopen,
}

/// Blocks the model covers: enough for fills of more than [`MARK_AT_MOST_CHUNKS`] pages.
const MODEL_BLOCKS: u64 = 12_000;

fn step() -> impl Strategy<Value = Step> {
    // Starts near chunk edges now and then, and lengths from one block to most of it.
    let start = prop_oneof![
        0..MODEL_BLOCKS,
        (0..MODEL_BLOCKS / CHUNK_BLOCKS).prop_map(|c| c * CHUNK_BLOCKS),
    ];
    prop_oneof![
        4 => (start.clone(), proptest::collection::vec(0u8..12, 1..300))
            .prop_map(|(first, kinds)| Step::Write { first, kinds }),
        1 => (start.clone(), 1..MODEL_BLOCKS)
            .prop_map(|(first, n)| Step::WriteData { first, n }),
        4 => (start, 1..MODEL_BLOCKS, any::<bool>())
            .prop_map(|(first, n, zero)| Step::Fill { first, n, zero }),
        1 => Just(Step::Sync),
        1 => Just(Step::Reopen),
    ]
}

fn run_model(steps: Vec<Step>) -> std::result::Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut layer = LayerFiles::open(dir.path(), 9, true).unwrap();
    let mut model = vec![BlockEntry::Absent; MODEL_BLOCKS as usize];
    for (i, s) in steps.into_iter().enumerate() {
        match s {
            Step::Write { first, kinds } => {
                let n = (kinds.len() as u64).min(MODEL_BLOCKS - first);
                let entries: Vec<BlockEntry> = kinds[..n as usize]
                    .iter()
                    .enumerate()
                    .map(|(k, kind)| match kind {
                        10 => BlockEntry::Zero,
                        11 => BlockEntry::Absent,
                        _ => data_entry(first + k as u64, i as u64),
                    })
                    .collect();
                layer.write_entries(first, &raw(&entries)).unwrap();
                model[first as usize..(first + n) as usize].copy_from_slice(&entries);
            }
            Step::WriteData { first, n } => {
                let n = n.min(MODEL_BLOCKS - first);
                let entries: Vec<BlockEntry> = (first..first + n)
                    .map(|b| data_entry(b, i as u64))
                    .collect();
                layer.write_entries(first, &raw(&entries)).unwrap();
                model[first as usize..(first + n) as usize].copy_from_slice(&entries);
            }
            Step::Fill { first, n, zero } => {
                let n = n.min(MODEL_BLOCKS - first);
                let kind = if zero {
                    FillKind::Zero
                } else {
                    FillKind::Absent
                };
                layer.fill_entries(first, n, kind).unwrap();
                model[first as usize..(first + n) as usize].fill(kind.entry());
            }
            Step::Sync => layer.sync().unwrap(),
            Step::Reopen => {
                drop(layer);
                layer = LayerFiles::open(dir.path(), 9, false).unwrap();
            }
        }
        let got = layer.read_entries(0, MODEL_BLOCKS as usize).unwrap();
        if let Some(b) = (0..got.len()).find(|&b| got[b] != model[b]) {
            prop_assert!(
                false,
                "step {}: block {} reads {:?}, model {:?}",
                i,
                b,
                got[b],
                model[b]
            );
        }
        prop_assert_eq!(&disk_entries(dir.path(), 9, MODEL_BLOCKS as usize), &model);
        let last_held = model.iter().rposition(|e| *e != BlockEntry::Absent);
        prop_assert!(layer.table_blocks().unwrap() >= last_held.map_or(0, |p| p as u64 + 1));
    }
    drop(layer);
    let layer = LayerFiles::open(dir.path(), 9, false).unwrap();
    prop_assert_eq!(layer.read_entries(0, MODEL_BLOCKS as usize).unwrap(), model);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Writes (data, zero and absent entries), zero and absent fills, syncs and reopens in
    /// any order read back as the last thing written to each block said.
    #[test]
    fn every_order_of_writes_and_fills_reads_as_the_model(
        steps in proptest::collection::vec(step(), 1..40)
    ) {
        run_model(steps)?;
    }
}

/// The bytes of `p`, empty when it does not exist.
fn bytes(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_default()
}

/// What a crash may leave of a change from `old` to `new` of an append-only log (or a
/// file replaced whole): `old`, `new`, and every whole-record prefix between them.
fn log_states(old: &[u8], new: &[u8]) -> Vec<Vec<u8>> {
    if new.len() < old.len() || new[..old.len()] != *old {
        return vec![old.to_vec(), new.to_vec()];
    }
    (old.len()..=new.len())
        .step_by(zero_log::RECORD_LEN)
        .map(|l| new[..l].to_vec())
        .collect()
}

/// A table file made of table pages from `old` or `new`, page `i` from `new` when
/// `pick(i)`.
fn mixed_table(old: &[u8], new: &[u8], pick: impl Fn(usize) -> bool) -> Vec<u8> {
    let len = old.len().max(new.len());
    let mut out = vec![0u8; len];
    for (i, page) in out.chunks_mut(CHUNK_BYTES).enumerate() {
        let src = if pick(i) { new } else { old };
        let lo = i * CHUNK_BYTES;
        if lo < src.len() {
            let hi = (lo + page.len()).min(src.len());
            page[..hi - lo].copy_from_slice(&src[lo..hi]);
        }
    }
    out
}

/// Entries of blocks `0..n` of a layer whose files hold `sums` and `zeros`.
fn read_state(marker: &[u8], sums: &[u8], zeros: &[u8], n: usize) -> Vec<BlockEntry> {
    let dir = tempfile::tempdir().unwrap();
    fs::write(zero_log::marker_path(dir.path()), marker).unwrap();
    let (d, s) = paths(dir.path(), 2);
    fs::write(d, b"").unwrap();
    fs::write(s, sums).unwrap();
    fs::write(zero_log::path(dir.path(), 2), zeros).unwrap();
    let layer = LayerFiles::open(dir.path(), 2, false).unwrap();
    layer.read_entries(0, n).unwrap()
}

/// Every state a crash can leave of each change reads every block as before or after it.
///
/// Nothing is synced between the two files unless the change synced the zero-range log
/// (counted by the layer), so without such a sync any prefix of the log goes with any mix
/// of old and new table pages; with it, the table is old while the log may be any
/// prefix, or the log is whole and the table pages any mix.
#[test]
fn every_state_a_crash_can_leave_reads_each_block_as_before_or_after() {
    const N: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 2, true).unwrap();
    let marker = bytes(&zero_log::marker_path(dir.path()));
    let (sums_p, zeros_p) = (sums_of(dir.path(), 2), zero_log::path(dir.path(), 2));
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut states_checked = 0;
    for step in 0..160u64 {
        let first = rng.gen_range(0..N);
        let n = if rng.gen_bool(0.2) {
            N - first
        } else {
            rng.gen_range(1..=(N - first).min(600))
        };
        let old = layer.read_entries(0, N as usize).unwrap();
        let (old_sums, old_zeros) = (bytes(&sums_p), bytes(&zeros_p));
        let syncs = layer.writer.lock().log.synced_now;
        match rng.gen_range(0..6) {
            0 | 1 => {
                let entries: Vec<BlockEntry> = (first..first + n)
                    .map(|b| match rng.gen_range(0..10) {
                        0 => BlockEntry::Absent,
                        1 => BlockEntry::Zero,
                        _ => data_entry(b, step),
                    })
                    .collect();
                layer.write_entries(first, &raw(&entries)).unwrap();
            }
            2 | 3 => layer.fill_entries(first, n, FillKind::Zero).unwrap(),
            4 => layer.fill_entries(first, n, FillKind::Absent).unwrap(),
            _ => layer.sync().unwrap(),
        }
        let new = layer.read_entries(0, N as usize).unwrap();
        let (new_sums, new_zeros) = (bytes(&sums_p), bytes(&zeros_p));
        let synced = layer.writer.lock().log.synced_now != syncs;
        let pages = old_sums.len().max(new_sums.len()).div_ceil(CHUNK_BYTES);
        let mixes: Vec<Vec<u8>> = (0..4)
            .map(|m| match m {
                0 => old_sums.clone(),
                1 => new_sums.clone(),
                _ => {
                    let picks: Vec<bool> = (0..pages).map(|_| rng.gen_bool(0.5)).collect();
                    mixed_table(&old_sums, &new_sums, |i| picks[i])
                }
            })
            .collect();
        let mut states = Vec::new();
        for zeros in log_states(&old_zeros, &new_zeros) {
            let whole = zeros == new_zeros;
            for (m, sums) in mixes.iter().enumerate() {
                // A change that synced the log changes the table only after it.
                if !synced || m == 0 || whole {
                    states.push((sums.clone(), zeros.clone()));
                }
            }
        }
        for (sums, zeros) in states {
            let got = read_state(&marker, &sums, &zeros, N as usize);
            for b in 0..N as usize {
                assert!(
                    got[b] == old[b] || got[b] == new[b],
                    "step {step}: block {b} reads {:?} in a crash state; before {:?}, after {:?} \
                     (log synced: {synced})",
                    got[b],
                    old[b],
                    new[b]
                );
            }
            states_checked += 1;
        }
    }
    assert!(states_checked > 500, "{states_checked}");
}

#[test]
fn a_torn_tail_of_the_zero_log_is_ignored_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 3, true).unwrap();
    layer.fill_entries(10, 10, FillKind::Zero).unwrap();
    layer.fill_entries(100, 10, FillKind::Zero).unwrap();
    drop(layer);
    let log = zero_log::path(dir.path(), 3);
    let whole = fs::read(&log).unwrap();
    let id = 3;
    let later = zero_log::encode(id, 200, 10, zero_log::Op::Zero);
    let mut flipped = zero_log::encode(id, 300, 10, zero_log::Op::Zero);
    flipped[3] ^= 1;
    let tails: [Vec<u8>; 5] = [
        later[..20].to_vec(),                        // a record cut short
        vec![0; zero_log::RECORD_LEN],               // a page that never got its bytes
        [flipped.to_vec(), later.to_vec()].concat(), // damage, then a whole record
        zero_log::encode(id + 1, 200, 10, zero_log::Op::Zero).to_vec(), // another layer's
        [0xff; 7].to_vec(),
    ];
    for tail in tails {
        fs::write(&log, [whole.clone(), tail.clone()].concat()).unwrap();
        let layer = LayerFiles::open(dir.path(), 3, false).unwrap();
        let e = layer.read_entries(0, 320).unwrap();
        let zero: Vec<u64> = (0..320)
            .filter(|&b| e[b as usize] == BlockEntry::Zero)
            .collect();
        let want: Vec<u64> = (10..20).chain(100..110).collect();
        assert_eq!(zero, want, "tail {tail:?}");
        assert_eq!(fs::read(&log).unwrap(), whole, "the tail was cut off");
        // What is appended next is read back, and nothing of the old tail after it.
        layer.fill_entries(400, 1, FillKind::Zero).unwrap();
        drop(layer);
        let layer = LayerFiles::open(dir.path(), 3, false).unwrap();
        assert_eq!(layer.read_entries(400, 1).unwrap(), [BlockEntry::Zero]);
        assert_eq!(layer.read_entries(200, 1).unwrap(), [BlockEntry::Absent]);
        layer.fill_entries(400, 1, FillKind::Absent).unwrap();
        drop(layer);
        fs::write(&log, &whole).unwrap();
    }
    // A damaged header is not a torn tail: the layer does not open.
    let mut bad = whole.clone();
    bad[0] ^= 1;
    fs::write(&log, &bad).unwrap();
    let err = LayerFiles::open(dir.path(), 3, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&log.display().to_string()), "{err}");
}

#[test]
fn sync_covers_the_zero_log_and_a_failed_sync_of_it_sticks() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 4, true).unwrap();
    layer
        .write_entries(0, &raw(&[data_entry(0, 1); 256]))
        .unwrap();
    layer.fill_entries(0, 200, FillKind::Zero).unwrap();
    // Until a sync made the range durable the table keeps markers, not holes.
    let sums = sums_of(dir.path(), 4);
    let on_file = |b: usize| tests_file_entry(&sums, b);
    assert_eq!(on_file(5), BlockEntry::Zero);
    assert_eq!(on_file(199), BlockEntry::Zero);
    layer.sync().unwrap();
    assert_eq!(
        on_file(5),
        BlockEntry::Absent,
        "a page of markers was punched"
    );
    assert_eq!(on_file(199), BlockEntry::Zero, "a page partly data stays");
    assert_eq!(layer.read_entries(5, 1).unwrap(), [BlockEntry::Zero]);

    // The sticky rule: once a sync of the log failed, no later sync passes.
    let e = std::io::Error::from_raw_os_error(nix::libc::EIO);
    let _ = layer.writer.lock().log.fail(e);
    let err = layer.sync().unwrap_err().to_string();
    assert!(err.contains(".zeros"), "{err}");
    assert!(layer.sync().is_err());
    // A fill that must sync the log before punching the table fails rather than punch.
    let many = 100 * CHUNK_BLOCKS;
    let entries: Vec<BlockEntry> = (1000..1000 + many).map(|b| data_entry(b, 3)).collect();
    layer.write_entries(1000, &raw(&entries)).unwrap();
    assert!(layer.fill_entries(1000, many, FillKind::Zero).is_err());
    assert_eq!(layer.read_entries(1000, 1).unwrap(), [data_entry(1000, 3)]);
    assert_eq!(tests_file_entry(&sums, 2000), data_entry(2000, 3));
}

fn tests_file_entry(sums: &Path, b: usize) -> BlockEntry {
    let f = File::open(sums).unwrap();
    let mut e = [0u8; SUM_LEN];
    read_at_or_zero(&f, &mut e, (b * SUM_LEN) as u64).unwrap();
    BlockEntry::decode(&e)
}

#[test]
fn a_grown_zero_log_is_rewritten_by_sync_and_says_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerFiles::open(dir.path(), 5, true).unwrap();
    // 3000 one-block trims, every other block: 1500 ranges after merging... and then
    // the gaps closed, leaving one range.
    for b in (0..3000u64).step_by(2) {
        layer.fill_entries(b, 1, FillKind::Zero).unwrap();
    }
    for b in (1..3000u64).step_by(2) {
        layer.fill_entries(b, 1, FillKind::Zero).unwrap();
    }
    let log = zero_log::path(dir.path(), 5);
    assert_eq!(fs::metadata(&log).unwrap().len(), 3001 * 32);
    layer.sync().unwrap();
    assert_eq!(fs::metadata(&log).unwrap().len(), 2 * 32, "rewritten");
    let tmp = dir.path().join(format!("{:016x}.zeros.tmp", 5));
    assert!(!tmp.exists());
    // Appends after the rewrite go to the new file.
    layer.fill_entries(5000, 1, FillKind::Zero).unwrap();
    layer
        .write_entries(10, &BlockEntry::Absent.encode())
        .unwrap();
    let want = layer.read_entries(0, 6000).unwrap();
    assert_eq!(want[10], BlockEntry::Absent);
    assert_eq!(want[5000], BlockEntry::Zero);
    drop(layer);
    let layer = LayerFiles::open(dir.path(), 5, false).unwrap();
    assert_eq!(layer.read_entries(0, 6000).unwrap(), want);
}

#[test]
fn layers_from_before_zero_range_files_open_with_none_and_get_one() {
    let dir = tempfile::tempdir().unwrap();
    // Two layers as the previous version left them: zero markers in the table, no
    // `.zeros` files, no directory marker.
    for id in [1, 2] {
        let layer = LayerFiles::open(dir.path(), id, true).unwrap();
        layer
            .write_entries(0, &raw(&[data_entry(0, id); 4]))
            .unwrap();
        layer
            .write_entries(4, &raw(&[BlockEntry::Zero; 4]))
            .unwrap();
        drop(layer);
        fs::remove_file(zero_log::path(dir.path(), id)).unwrap();
    }
    fs::remove_file(zero_log::marker_path(dir.path())).unwrap();
    let want = |id| {
        [
            [data_entry(0, id); 4].to_vec(),
            [BlockEntry::Zero; 4].to_vec(),
            [BlockEntry::Absent; 2].to_vec(),
        ]
        .concat()
    };
    let layer = LayerFiles::open(dir.path(), 1, false).unwrap();
    assert_eq!(layer.read_entries(0, 10).unwrap(), want(1));
    // The first open gave every layer of the directory its file and marked it.
    assert!(zero_log::path(dir.path(), 2).exists());
    assert!(zero_log::marker_path(dir.path()).exists());
    let other = LayerFiles::open(dir.path(), 2, false).unwrap();
    assert_eq!(other.read_entries(0, 10).unwrap(), want(2));
    // From now on trims write ranges there too.
    layer.fill_entries(0, 1 << 20, FillKind::Zero).unwrap();
    drop((layer, other));
    let layer = LayerFiles::open(dir.path(), 1, false).unwrap();
    assert_eq!(layer.read_entries(2, 1).unwrap(), [BlockEntry::Zero]);
    assert_eq!(
        layer.read_entries((1 << 20) - 1, 1).unwrap(),
        [BlockEntry::Zero]
    );

    // An upgrade cut short (marker says so, one layer still without a file) resumes.
    fs::remove_file(zero_log::path(dir.path(), 2)).unwrap();
    fs::write(
        zero_log::marker_path(dir.path()),
        "adding <id>.zeros files to layers created before them\n",
    )
    .unwrap();
    let other = LayerFiles::open(dir.path(), 2, false).unwrap();
    assert_eq!(other.read_entries(0, 10).unwrap(), want(2));
    drop(other);
    // Once complete, a missing file is a loss.
    fs::remove_file(zero_log::path(dir.path(), 2)).unwrap();
    let err = LayerFiles::open(dir.path(), 2, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains(".zeros"), "{err}");
    // A marker this version does not know is refused too.
    fs::write(zero_log::marker_path(dir.path()), "something else").unwrap();
    let err = LayerFiles::open(dir.path(), 1, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("zero-ranges"), "{err}");
}

#[test]
fn zero_ranges_copy_as_ranges_into_what_another_layer_lacks() {
    let dir = tempfile::tempdir().unwrap();
    // A parent trimmed over 1 TiB, holding data at 5 and 300..302 (written after the
    // trim) and a zero marker at 7.
    let parent = LayerFiles::open(dir.path(), 1, true).unwrap();
    parent.fill_entries(0, TIB_BLOCKS, FillKind::Zero).unwrap();
    parent.write_entries(5, &data_entry(5, 1).encode()).unwrap();
    parent.write_entries(7, &BlockEntry::Zero.encode()).unwrap();
    let three: Vec<BlockEntry> = (300..303).map(|b| data_entry(b, 1)).collect();
    parent.write_entries(300, &raw(&three)).unwrap();
    assert_eq!(
        parent.zero_ranges(0, TIB_BLOCKS),
        [(0, 5), (6, 7), (8, 300), (303, TIB_BLOCKS)]
    );
    assert_eq!(parent.zero_ranges(4, 4), [(4, 5), (6, 7)]);
    assert_eq!(parent.zero_ranges(TIB_BLOCKS, 10), []);

    // The child holds data at 2 and 6, is absent elsewhere.
    let child = LayerFiles::open(dir.path(), 2, true).unwrap();
    child.write_entries(2, &data_entry(2, 2).encode()).unwrap();
    child.write_entries(6, &data_entry(6, 2).encode()).unwrap();
    for (lo, hi) in parent.zero_ranges(0, TIB_BLOCKS) {
        child.zero_where_absent(lo, hi - lo).unwrap();
    }
    let want = [
        BlockEntry::Zero,
        BlockEntry::Zero,
        data_entry(2, 2),
        BlockEntry::Zero,
        BlockEntry::Zero,
        BlockEntry::Absent, // the parent's data: copied block by block, not by range
        data_entry(6, 2),
        BlockEntry::Absent, // the parent's zero marker: likewise
        BlockEntry::Zero,
    ];
    assert_eq!(child.read_entries(0, 9).unwrap(), want);
    assert_eq!(
        child.read_entries(TIB_BLOCKS - 1, 1).unwrap(),
        [BlockEntry::Zero]
    );
    let log = zero_log::path(dir.path(), 2);
    assert_eq!(
        fs::metadata(&log).unwrap().len(),
        5 * 32,
        "header and one record per range"
    );
    child.sync().unwrap();
    drop(child);
    let child = LayerFiles::open(dir.path(), 2, false).unwrap();
    assert_eq!(child.read_entries(0, 9).unwrap(), want);
}
