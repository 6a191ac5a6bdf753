//! A deleted snapshot's zero ranges reach the child as ranges (issue #9): merging a layer
//! that trimmed most of a 1 TiB volume writes a few records, not a marker per block, and
//! writes pending in the child when the range goes in keep their data.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{assert_scrub_clean, quiet, snapshot_layer, top_layer, Model};
use crate::catalog::LayerId;
use crate::format::{BlockEntry, BLOCK, BLOCK_SIZE};
use crate::hooks::Point;
use crate::Export;

const TIB_BLOCKS: u64 = (1 << 40) / BLOCK;

/// A volume's expected blocks where a dense model would not fit: block → the tag
/// [`Model::write`] fills it with; a block not listed reads as zeroes.
#[derive(Clone, Default)]
struct Sparse(BTreeMap<u64, u8>);

impl Sparse {
    /// Writes blocks `first..first+n` as [`Model::write`] does (64 KiB and more: placed).
    fn write(&mut self, e: &Export, first: u64, n: u64, tag: u8) {
        let mut data = vec![tag; (n * BLOCK) as usize];
        for (i, block) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            block[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
        }
        e.write_at(first * BLOCK, &data, false).unwrap();
        self.0.extend((first..first + n).map(|b| (b, tag)));
    }

    fn trim(&mut self, e: &Export, first: u64, n: u64) {
        e.trim(first * BLOCK, n * BLOCK, false).unwrap();
        let gone: Vec<u64> = self.0.range(first..first + n).map(|(b, _)| *b).collect();
        for b in gone {
            self.0.remove(&b);
        }
    }

    /// Reads blocks `first..first+n` and compares them with the model.
    fn check_blocks(&self, e: &Export, first: u64, n: u64, what: &str) {
        let mut got = vec![0u8; (n * BLOCK) as usize];
        e.read_at(first * BLOCK, &mut got)
            .unwrap_or_else(|err| panic!("{what}: reading blocks {first}+{n}: {err}"));
        for (i, block) in got.chunks_exact(BLOCK_SIZE).enumerate() {
            let b = first + i as u64;
            let mut want = vec![0u8; BLOCK_SIZE];
            if let Some(tag) = self.0.get(&b) {
                want.fill(*tag);
                want[..8].copy_from_slice(&b.to_le_bytes());
            }
            assert!(block == want, "{what}: block {b} differs");
        }
    }

    /// Checks every block the model holds, with its neighbours, and `probes`.
    fn check(&self, e: &Export, probes: &[(u64, u64)], what: &str) {
        for &b in self.0.keys() {
            let first = b.saturating_sub(1);
            let end = (b + 2).min(TIB_BLOCKS);
            self.check_blocks(e, first, end - first, what);
        }
        for &(first, n) in probes {
            self.check_blocks(e, first, n, what);
        }
    }
}

fn layer_file(dir: &Path, layer: LayerId, ext: &str) -> PathBuf {
    dir.join("layers").join(format!("{layer:016x}.{ext}"))
}

/// Bytes a file takes on disk.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// What the child's files take: its table and data on disk, its zero-range log's length.
fn footprint(dir: &Path, layer: LayerId) -> [u64; 3] {
    [
        allocated(&layer_file(dir, layer, "sums")),
        allocated(&layer_file(dir, layer, "data")),
        std::fs::metadata(layer_file(dir, layer, "zeros"))
            .unwrap()
            .len(),
    ]
}

#[test]
fn deleting_a_snapshot_that_trimmed_a_tib_merges_its_range_in_a_few_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", TIB_BLOCKS * BLOCK).unwrap();
    let e = s.open_export("v").unwrap();
    let mut m = Sparse::default();
    let (mid, last) = (TIB_BLOCKS / 2, TIB_BLOCKS - 64);
    for first in [0, 1 << 20, mid, last] {
        m.write(&e, first, 64, 1);
    }
    s.checkpoint().unwrap();
    s.create_snapshot("v", "base").unwrap();
    let base = m.clone();

    // The layer to merge: data, then a trim of all but the first and last 16 blocks
    // (one range hiding the base's data), then data inside the range.
    m.write(&e, 1000, 16, 2);
    s.checkpoint().unwrap();
    m.trim(&e, 16, TIB_BLOCKS - 32);
    m.write(&e, 5000, 4, 3); // logged
    m.write(&e, mid + 8, 16, 3); // placed

    // The checkpoint also punches out the trimmed data, scanning the range's table entries
    // (seconds for a TiB): done before the delete, whose own cost is what this measures.
    s.checkpoint().unwrap();
    s.create_snapshot("v", "trimmed").unwrap();
    let layer = snapshot_layer(&s, "v", "trimmed");
    // The child holds blocks of its own in the range: they win.
    m.write(&e, 2000, 2, 4);
    m.write(&e, 5001, 1, 4);
    s.checkpoint().unwrap();
    m.write(&e, 3000, 1, 5); // pending when the merge starts
    let child = top_layer(&s, "v");
    let before = footprint(dir.path(), child);

    let started = Instant::now();
    s.delete_snapshot("v", "trimmed").unwrap();
    let took = started.elapsed();
    assert!(
        !s.inner.layers.read().contains_key(&layer),
        "the layer was not merged"
    );
    let after = footprint(dir.path(), child);
    // Copied: 19 data blocks (a table page or two, 76 KiB of data) and a few ranges; a
    // marker per block would be 8 GiB of table.
    assert!(
        after[0] - before[0] <= 3 * 4096,
        "the child's table grew from {} to {} bytes",
        before[0],
        after[0]
    );
    assert!(
        after[1] - before[1] <= 24 * BLOCK,
        "the child's data grew from {} to {} bytes",
        before[1],
        after[1]
    );
    assert!(
        after[2] - before[2] <= 8 * 32,
        "the child's zero-range log grew from {} to {} bytes",
        before[2],
        after[2]
    );
    assert!(took < Duration::from_secs(10), "the delete took {took:?}");

    let probes = [
        (0, 64),
        (1000, 16),
        (1 << 20, 64),
        (mid, 64),
        (last, 64),
        (TIB_BLOCKS / 3, 64),
    ];
    m.check(&e, &probes, "the volume after the delete");
    base.check(
        &s.open_export("v@base").unwrap(),
        &probes,
        "the base snapshot",
    );
    let child_files = s.layer(child).unwrap();
    assert_eq!(
        child_files.read_entries(TIB_BLOCKS / 3, 1).unwrap(),
        [BlockEntry::Zero],
        "the range is the child's now"
    );
    drop(child_files);
    drop(e);
    drop(s);

    let s = quiet(dir.path());
    m.check(
        &s.open_export("v").unwrap(),
        &probes,
        "the volume after reopening",
    );
    base.check(
        &s.open_export("v@base").unwrap(),
        &probes,
        "the base snapshot after reopening",
    );
}

/// Where the test of writes pending during the merge is.
#[derive(Default)]
struct Steps {
    /// The merge stopped before its first batch (the zero ranges).
    merge_waits: bool,
    /// The placed write that will fail published its blocks and stopped.
    writer_in: bool,
    /// The test's own writes are done: the merge may go on.
    go_merge: bool,
    /// The merge carried the ranges: the stopped write may fail.
    go_fail: bool,
}

type Shared = Arc<(Mutex<Steps>, Condvar)>;

/// Waits until `until` holds, for at most 30 s.
fn wait_for(state: &Shared, until: fn(&Steps) -> bool) -> std::io::Result<()> {
    let (steps, cv) = &**state;
    let mut steps = steps.lock();
    while !until(&steps) {
        if cv.wait_for(&mut steps, Duration::from_secs(30)).timed_out() {
            return Err(std::io::Error::other("the other side never came"));
        }
    }
    Ok(())
}

fn set(state: &Shared, step: fn(&mut Steps)) {
    let (steps, cv) = &**state;
    step(&mut steps.lock());
    cv.notify_all();
}

#[test]
fn writes_pending_in_the_child_under_a_carried_zero_range_keep_their_data() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    let size = 64 << 20;
    s.create_volume("v", size).unwrap();
    let e = s.open_export("v").unwrap();
    let mut m = Model::new(size);
    for c in 0..16 {
        m.write(&e, c * 256, 256, 1);
    }
    s.checkpoint().unwrap();
    s.create_snapshot("v", "base").unwrap();
    let base = m.clone();
    // The layer to merge: a range over the base's data, and data inside it.
    m.trim(&e, 0, 4096);
    m.write(&e, 3000, 4, 2);
    s.checkpoint().unwrap();
    s.create_snapshot("v", "trimmed").unwrap();
    let child = top_layer(&s, "v");

    // Batch 0 carries the ranges, batch 1 copies the data blocks.
    let state: Shared = Arc::default();
    {
        let state = state.clone();
        let failed_one = AtomicBool::new(false);
        s.inner.hooks.set(move |p| match p {
            Point::MergeBatch(0) => {
                set(&state, |s| s.merge_waits = true);
                wait_for(&state, |s| s.go_merge)
            }
            Point::MergeBatch(1) => {
                set(&state, |s| s.go_fail = true);
                Ok(())
            }
            Point::PlacedLogged if !failed_one.swap(true, Ordering::SeqCst) => {
                set(&state, |s| s.writer_in = true);
                wait_for(&state, |s| s.go_fail)?;
                Err(std::io::Error::other("injected failure of a placed write"))
            }
            _ => Ok(()),
        });
    }
    let deleter = {
        let s = s.clone();
        std::thread::spawn(move || s.delete_snapshot("v", "trimmed"))
    };
    wait_for(&state, |s| s.merge_waits).unwrap();
    // After the merge's checkpoint, before the ranges: writes that stay pending.
    let failing = {
        let e = s.open_export("v").unwrap();
        std::thread::spawn(move || e.write_at(1100 * BLOCK, &vec![7u8; 16 * BLOCK_SIZE], false))
    };
    wait_for(&state, |s| s.writer_in).unwrap();
    m.write(&e, 100, 2, 3); // logged
    m.write(&e, 200, 16, 4); // placed
    m.bytes(&e, 300 * BLOCK + 7, b"merged with the range"); // read-merge-write
    m.trim(&e, 3001, 1); // over the layer's data
    m.write(&e, 3002, 1, 6); // over the layer's data, pending
    for b in [100, 200, 300, 3002, 1100] {
        assert!(
            s.inner.pending.contains(child, b),
            "block {b} is not pending"
        );
    }
    set(&state, |s| s.go_merge = true);
    deleter.join().unwrap().unwrap();
    assert!(failing.join().unwrap().is_err(), "the injected failure");
    s.inner.hooks.set(|_| Ok(()));

    // The range went in under the pending versions, which still win.
    let files = s.layer(child).unwrap();
    for b in [100, 200, 300] {
        assert!(s.inner.pending.contains(child, b), "block {b} left the map");
        assert_eq!(files.read_entries(b, 1).unwrap(), [BlockEntry::Zero]);
    }
    // The failed write's blocks read the range: the layer's zeroes, not the base's data.
    assert_eq!(
        files.read_entries(1100, 16).unwrap(),
        vec![BlockEntry::Zero; 16]
    );
    m.check(&e, "after the merge");
    base.check(&s.open_export("v@base").unwrap(), "the base snapshot");
    s.checkpoint().unwrap();
    for b in [100, 200, 300] {
        assert!(matches!(
            files.read_entries(b, 1).unwrap()[0],
            BlockEntry::Data(_)
        ));
    }
    m.check(&e, "after the checkpoint");
    drop(files);
    drop(e);
    drop(s);

    let s = quiet(dir.path());
    m.check(&s.open_export("v").unwrap(), "after reopening");
    base.check(
        &s.open_export("v@base").unwrap(),
        "the base snapshot after reopening",
    );
    assert_scrub_clean(&s);
}
