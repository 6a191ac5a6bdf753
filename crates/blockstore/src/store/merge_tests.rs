//! Deleting a snapshot merges its layer into its only child (issue #9): every image reads
//! as before, the space comes back, writes during the merge win, and a merge cut short
//! (an error, a crash image) leaves everything readable and consistent.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::merge::MERGE_BATCH;
use super::{Store, StoreOptions};
use crate::catalog::LayerId;
use crate::format::{BlockEntry, BLOCK, BLOCK_SIZE};
use crate::hooks::{pause, Point};
use crate::Export;

const MIB: u64 = 1 << 20;

/// A store whose background checkpoint stays out of the way.
fn quiet(dir: &Path) -> Store {
    let opts = StoreOptions {
        checkpoint_interval: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    Store::open(dir, opts).unwrap()
}

/// A volume's expected bytes, kept next to the writes that make them.
#[derive(Clone)]
struct Model(Vec<u8>);

impl Model {
    fn new(size: u64) -> Model {
        Model(vec![0; size as usize])
    }

    /// Writes blocks `first..first+n` with content that names the block and `tag`, through
    /// `e` and into the model; large runs are placed writes, small ones logged.
    fn write(&mut self, e: &Export, first: u64, n: u64, tag: u8) {
        let mut data = vec![tag; (n * BLOCK) as usize];
        for (i, block) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            block[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
        }
        self.bytes(e, first * BLOCK, &data);
    }

    /// Writes `data` at byte `off` (any alignment).
    fn bytes(&mut self, e: &Export, off: u64, data: &[u8]) {
        e.write_at(off, data, false).unwrap();
        self.0[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    fn trim(&mut self, e: &Export, first: u64, n: u64) {
        e.trim(first * BLOCK, n * BLOCK, false).unwrap();
        self.0[(first * BLOCK) as usize..((first + n) * BLOCK) as usize].fill(0);
    }

    /// Reads the whole export and compares, naming the first block that differs.
    fn check(&self, e: &Export, what: &str) {
        let mut buf = vec![0u8; MIB as usize];
        for (c, want) in self.0.chunks(MIB as usize).enumerate() {
            let got = &mut buf[..want.len()];
            e.read_at(c as u64 * MIB, got)
                .unwrap_or_else(|err| panic!("{what}: reading MiB {c}: {err}"));
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                let off = c as u64 * MIB + at as u64;
                panic!(
                    "{what}: block {} differs: read {:#x}, expected {:#x}",
                    off / BLOCK,
                    got[at],
                    want[at]
                );
            }
        }
    }
}

fn snapshot_layer(s: &Store, volume: &str, snap: &str) -> LayerId {
    s.inner.catalog.lock().volumes[volume].snapshots[snap].layer
}

fn top_layer(s: &Store, volume: &str) -> LayerId {
    s.inner.catalog.lock().volumes[volume].top
}

fn backing(s: &Store, layer: LayerId) -> Option<LayerId> {
    s.inner.catalog.lock().layers[&layer].backing
}

fn layer_files_exist(dir: &Path, layer: LayerId) -> bool {
    let layers = dir.join("layers");
    layers.join(format!("{layer:016x}.data")).exists()
        || layers.join(format!("{layer:016x}.sums")).exists()
}

/// Bytes the data files of every layer of the store occupy on disk.
fn store_allocated(s: &Store) -> u64 {
    s.inner
        .layers
        .read()
        .values()
        .map(|l| l.allocated_bytes())
        .sum()
}

fn assert_scrub_clean(s: &Store) {
    let report = s.scrub().unwrap();
    assert!(report.bad.is_empty(), "scrub found {:?}", report.bad);
}

/// Copies a data directory as it is now: what a process killed at this moment leaves.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for ent in std::fs::read_dir(from).unwrap() {
        let ent = ent.unwrap();
        let target = to.join(ent.file_name());
        if ent.file_type().unwrap().is_dir() {
            copy_dir(&ent.path(), &target);
        } else {
            std::fs::copy(ent.path(), &target).unwrap();
        }
    }
}

/// A 16 MiB volume `v` whose first `blocks` blocks hold data (checkpointed), snapshot `s`.
fn volume_with_snapshot(dir: &Path, blocks: u64) -> (Store, Export, Model) {
    let s = quiet(dir);
    s.create_volume("v", 16 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    let mut m = Model::new(16 * MIB);
    let mut b = 0;
    while b < blocks {
        let n = (blocks - b).min(256);
        m.write(&e, b, n, 1);
        b += n;
    }
    s.checkpoint().unwrap();
    s.create_snapshot("v", "s").unwrap();
    (s, e, m)
}

#[test]
fn deleting_a_snapshot_merges_its_layer_and_gives_its_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 16 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    let mut m = Model::new(16 * MIB);
    for c in 0..8 {
        m.write(&e, c * 256, 256, 1); // 8 MiB of placed writes
    }
    m.write(&e, 2100, 10, 2); // logged
    s.checkpoint().unwrap();
    s.create_snapshot("v", "s1").unwrap();
    let at_snapshot = m.clone();
    let old = snapshot_layer(&s, "v", "s1");
    let top = top_layer(&s, "v");

    m.write(&e, 0, 256, 3); // placed over the snapshot's data
    m.write(&e, 300, 1, 4); // logged
    m.trim(&e, 512, 256); // zero markers over the snapshot's data
    m.bytes(&e, 3000 * BLOCK + 100, b"unaligned"); // read-merge-write through the chain
    s.checkpoint().unwrap();
    m.check(&e, "before the delete");
    at_snapshot.check(&s.open_export("v@s1").unwrap(), "the snapshot");
    let before = store_allocated(&s);

    s.delete_snapshot("v", "s1").unwrap();
    m.check(&e, "after the delete");
    assert!(s.volume_info("v").unwrap().snapshots.is_empty());
    assert!(
        !layer_files_exist(dir.path(), old),
        "the merged layer's files remain"
    );
    assert!(!s.inner.layers.read().contains_key(&old));
    let rt = s.runtime("v").unwrap();
    assert!(
        rt.rt.read().chain.iter().all(|l| l.id != old),
        "the volume still reads through the merged layer"
    );
    assert_eq!(backing(&s, top), None, "the top took the layer's backing");
    // The layer held 2058 blocks; the top shadowed 256 + 1 + 256 of them, whose space
    // comes back (the rest moved into the top).
    let after = store_allocated(&s);
    let shadowed = 513 * BLOCK;
    assert!(
        before - after >= shadowed * 9 / 10 && before - after <= shadowed * 11 / 10,
        "allocated {before} -> {after}: expected about {shadowed} bytes back"
    );

    // A delete of something gone is refused as before.
    assert!(s.delete_snapshot("v", "s1").is_err());
    drop(e);
    drop(s);
    let s = quiet(dir.path());
    m.check(&s.open_export("v").unwrap(), "after reopening");
    assert!(!layer_files_exist(dir.path(), old));
    assert_scrub_clean(&s);
}

#[test]
fn deleting_the_middle_of_three_snapshots_keeps_every_other_image() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 4 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    let mut m = Model::new(4 * MIB);
    m.write(&e, 0, 100, 1);
    s.create_snapshot("v", "s1").unwrap();
    let m1 = m.clone();
    m.write(&e, 50, 100, 2);
    m.trim(&e, 0, 10);
    s.create_snapshot("v", "s2").unwrap();
    m.write(&e, 100, 100, 3);
    m.trim(&e, 140, 5);
    m.write(&e, 5, 1, 9);
    // Not checkpointed: the merge's own checkpoint puts these in their layers first.
    s.create_snapshot("v", "s3").unwrap();
    let m3 = m.clone();
    m.write(&e, 180, 40, 4);
    let l1 = snapshot_layer(&s, "v", "s1");
    let l2 = snapshot_layer(&s, "v", "s2");
    let l3 = snapshot_layer(&s, "v", "s3");

    s.delete_snapshot("v", "s2").unwrap();
    assert!(!layer_files_exist(dir.path(), l2));
    assert_eq!(backing(&s, l3), Some(l1));
    m.check(&e, "volume after deleting s2");
    m1.check(&s.open_export("v@s1").unwrap(), "s1 after deleting s2");
    m3.check(&s.open_export("v@s3").unwrap(), "s3 after deleting s2");

    // The oldest, now under s3 directly, merges into s3's layer the same way.
    s.delete_snapshot("v", "s1").unwrap();
    assert!(!layer_files_exist(dir.path(), l1));
    assert_eq!(backing(&s, l3), None);
    m.check(&e, "volume after deleting s1");
    m3.check(&s.open_export("v@s3").unwrap(), "s3 after deleting s1");

    drop(e);
    drop(s);
    let s = quiet(dir.path());
    m.check(&s.open_export("v").unwrap(), "volume after reopening");
    m3.check(&s.open_export("v@s3").unwrap(), "s3 after reopening");
    assert_scrub_clean(&s);
    s.delete_snapshot("v", "s3").unwrap();
    assert!(!layer_files_exist(dir.path(), l3));
    m.check(&s.open_export("v").unwrap(), "volume without snapshots");
    assert_scrub_clean(&s);
}

#[test]
fn a_snapshot_a_clone_builds_on_is_hidden_not_merged() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 4 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    let mut m = Model::new(4 * MIB);
    m.write(&e, 0, 64, 1);
    s.create_snapshot("v", "s").unwrap();
    s.clone_snapshot("v", "s", "c").unwrap();
    let layer = snapshot_layer(&s, "v", "s");
    let ce = s.open_export("c").unwrap();
    let mut mc = m.clone();
    m.write(&e, 10, 4, 2);
    mc.write(&ce, 20, 4, 3);
    mc.trim(&ce, 0, 2);

    s.delete_snapshot("v", "s").unwrap();
    assert!(s.volume_info("v").unwrap().snapshots.is_empty());
    assert!(
        layer_files_exist(dir.path(), layer),
        "a layer with two children was removed"
    );
    assert_eq!(backing(&s, top_layer(&s, "v")), Some(layer));
    assert_eq!(backing(&s, top_layer(&s, "c")), Some(layer));
    m.check(&e, "the volume");
    mc.check(&ce, "the clone");

    drop(e);
    s.delete_volume("v").unwrap();
    assert!(
        layer_files_exist(dir.path(), layer),
        "the clone still needs it"
    );
    mc.check(&ce, "the clone after its origin went");
    drop(ce);
    drop(s);
    let s = quiet(dir.path());
    mc.check(&s.open_export("c").unwrap(), "the clone after reopening");
    assert_scrub_clean(&s);
}

#[test]
fn writes_between_batches_of_a_merge_win_over_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let held = 3 * MERGE_BATCH as u64;
    let (s, e, mut m) = volume_with_snapshot(dir.path(), held);
    let old = snapshot_layer(&s, "v", "s");

    let paused = pause::first(&s.inner.hooks, |p| p == Point::MergeBatch(1));
    let deleter = {
        let s = s.clone();
        std::thread::spawn(move || s.delete_snapshot("v", "s"))
    };
    assert_eq!(paused.reached(), Point::MergeBatch(1));
    // The first batch (blocks 0..1024) is in the top layer; the others are not yet.
    let top = s.layer(top_layer(&s, "v")).unwrap();
    assert!(matches!(
        top.read_entries(100, 1).unwrap()[0],
        BlockEntry::Data(_)
    ));
    assert_eq!(top.read_entries(1100, 1).unwrap()[0], BlockEntry::Absent);
    // Over copied blocks: logged, placed (an overwrite in place), a trim.
    m.write(&e, 100, 10, 2);
    m.write(&e, 200, 16, 3);
    m.trim(&e, 500, 10);
    // Over blocks still to copy: pending writes the merge must leave alone.
    m.write(&e, 1100, 10, 4);
    m.write(&e, 1200, 16, 5);
    m.trim(&e, 1300, 10);
    m.bytes(&e, 1400 * BLOCK + 7, b"merged with the old block");
    // Some of them checkpointed, some still pending when the merge goes on.
    s.checkpoint().unwrap();
    m.write(&e, 2100, 5, 6);
    m.write(&e, 2200, 16, 7);
    m.write(&e, 2300, 3, 8);
    m.write(&e, 2300, 16, 9); // placed over a pending logged version
    paused.release();
    deleter.join().unwrap().unwrap();

    m.check(&e, "after the merge");
    assert!(!layer_files_exist(dir.path(), old));
    m.write(&e, 2400, 2, 10);
    drop(e);
    drop(s);
    let s = quiet(dir.path());
    m.check(&s.open_export("v").unwrap(), "after reopening");
    assert_scrub_clean(&s);
}

#[test]
fn a_writer_running_through_a_merge_always_reads_its_last_write() {
    let dir = tempfile::tempdir().unwrap();
    let held = 3 * MERGE_BATCH as u64 + 100;
    let (s, e, m) = volume_with_snapshot(dir.path(), held);
    const WRITES: usize = 600;
    const PER_BATCH: usize = 150;
    // The merge starts batch n only once the writer made n * PER_BATCH writes; the writer
    // never waits, so its writes also land while batches copy.
    let progress = Arc::new((Mutex::new(0usize), Condvar::new()));
    {
        let progress = progress.clone();
        s.inner.hooks.set(move |p| {
            if let Point::MergeBatch(n) = p {
                let want = (n as usize * PER_BATCH).min(WRITES);
                let (done, cv) = &*progress;
                let mut done = done.lock();
                while *done < want {
                    if cv.wait_for(&mut done, Duration::from_secs(30)).timed_out() {
                        return Err(std::io::Error::other("the writer made no progress"));
                    }
                }
            }
            Ok(())
        });
    }
    let writer = {
        let progress = progress.clone();
        let mut m = m;
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(9);
            for i in 0..WRITES {
                let b = rng.gen_range(0..held + 200);
                let tag = (i % 250) as u8 + 2;
                match rng.gen_range(0..4) {
                    0 => m.write(&e, b, rng.gen_range(1..4), tag),
                    1 => m.write(&e, b, rng.gen_range(16..40), tag),
                    2 => m.trim(&e, b, rng.gen_range(1..20)),
                    _ => m.bytes(&e, b * BLOCK + 1000, &[tag; 5000]),
                }
                let (done, cv) = &*progress;
                *done.lock() = i + 1;
                cv.notify_all();
            }
            (m, e)
        })
    };
    s.delete_snapshot("v", "s").unwrap();
    let (m, e) = writer.join().unwrap();
    m.check(&e, "after the writer and the merge");
    drop(e);
    drop(s);
    let s = quiet(dir.path());
    m.check(&s.open_export("v").unwrap(), "after reopening");
    assert_scrub_clean(&s);
}

#[test]
fn a_merge_cut_short_leaves_every_image_intact_and_can_be_done_again() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let held = 4 * MERGE_BATCH as u64;
    let (s, e, mut m) = volume_with_snapshot(dir.path(), held);
    let snap = m.clone();
    m.write(&e, 0, 30, 2);
    m.trim(&e, 2000, 30);
    m.write(&e, 3000, 3, 3); // pending in the WAL only
    let old = snapshot_layer(&s, "v", "s");
    let before = store_allocated(&s);
    let at_cut = m.clone();

    // Cut after two batches; the data directory as it is then is a crash image.
    {
        let image = crashed.path().to_path_buf();
        let data = dir.path().to_path_buf();
        s.inner.hooks.set(move |p| match p {
            Point::MergeBatch(2) => {
                copy_dir(&data, &image);
                Err(std::io::Error::other("cut short"))
            }
            _ => Ok(()),
        });
    }
    let err = s.delete_snapshot("v", "s").unwrap_err();
    assert!(err.to_string().contains("MergeBatch(2)"), "{err}");
    s.inner.hooks.set(|_| Ok(()));
    assert_eq!(s.volume_info("v").unwrap().snapshots.len(), 1);
    assert!(layer_files_exist(dir.path(), old));
    m.check(&e, "volume after the failed delete");
    snap.check(
        &s.open_export("v@s").unwrap(),
        "snapshot after the failed delete",
    );
    m.write(&e, 10, 2, 4);
    drop(e);
    drop(s);

    let s = quiet(dir.path());
    let e = s.open_export("v").unwrap();
    m.check(&e, "volume after reopening");
    snap.check(&s.open_export("v@s").unwrap(), "snapshot after reopening");
    assert_scrub_clean(&s);
    s.delete_snapshot("v", "s").unwrap();
    m.check(&e, "volume after deleting again");
    assert!(!layer_files_exist(dir.path(), old));
    assert!(store_allocated(&s) < before, "no space came back");
    drop(e);
    drop(s);

    // The process killed in the middle of the merge: the old chain reads as before.
    let s = quiet(crashed.path());
    at_cut.check(&s.open_export("v").unwrap(), "crash image: volume");
    snap.check(&s.open_export("v@s").unwrap(), "crash image: snapshot");
    assert_scrub_clean(&s);
    s.delete_snapshot("v", "s").unwrap();
    at_cut.check(
        &s.open_export("v").unwrap(),
        "crash image: after the delete",
    );
}

#[test]
fn a_merge_cut_just_before_its_catalog_write_leaves_the_old_chain_reading_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let (s, e, mut m) = volume_with_snapshot(dir.path(), 2 * MERGE_BATCH as u64);
    let snap = m.clone();
    m.write(&e, 5, 20, 2);
    m.trim(&e, 1500, 20);
    let image_taken = Arc::new(AtomicBool::new(false));
    {
        let (image, data) = (crashed.path().to_path_buf(), dir.path().to_path_buf());
        let image_taken = image_taken.clone();
        s.inner.hooks.set(move |p| {
            if p == Point::MergeCommit {
                copy_dir(&data, &image);
                image_taken.store(true, Ordering::SeqCst);
                return Err(std::io::Error::other("cut before the catalog"));
            }
            Ok(())
        });
    }
    assert!(s.delete_snapshot("v", "s").is_err());
    assert!(image_taken.load(Ordering::SeqCst));
    m.check(&e, "volume after the failed commit");
    snap.check(
        &s.open_export("v@s").unwrap(),
        "snapshot after the failed commit",
    );
    drop(e);
    drop(s);
    // The image's top layer holds the whole copy, under the old catalog.
    let s = quiet(crashed.path());
    m.check(&s.open_export("v").unwrap(), "crash image: volume");
    snap.check(&s.open_export("v@s").unwrap(), "crash image: snapshot");
    assert_scrub_clean(&s);
}

#[test]
fn a_corrupt_block_in_the_layer_fails_the_delete_and_does_not_spread() {
    let dir = tempfile::tempdir().unwrap();
    let (s, e, mut m) = volume_with_snapshot(dir.path(), 64);
    m.write(&e, 0, 1, 2);
    let layer = snapshot_layer(&s, "v", "s");
    let top = top_layer(&s, "v");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(format!("layers/{layer:016x}.data")))
            .unwrap();
        f.write_all_at(b"bit rot", 10 * BLOCK + 100).unwrap();
    }
    let err = s.delete_snapshot("v", "s").unwrap_err().to_string();
    assert!(
        err.contains("block 10 ") && err.contains(&format!("layer {layer}")),
        "{err}"
    );
    assert!(err.contains("fails its checksum"), "{err}");
    assert_eq!(s.volume_info("v").unwrap().snapshots.len(), 1);
    assert!(layer_files_exist(dir.path(), layer));
    let entries = s.layer(top).unwrap().read_entries(0, 64).unwrap();
    assert_eq!(entries[10], BlockEntry::Absent, "the bad block was copied");
    // The volume reads as before: the good blocks, and the bad one as an error.
    let mut good = vec![0u8; 4 * BLOCK_SIZE];
    e.read_at(20 * BLOCK, &mut good).unwrap();
    assert_eq!(good, m.0[(20 * BLOCK) as usize..(24 * BLOCK) as usize]);
    let mut bad = vec![0u8; BLOCK_SIZE];
    assert!(e.read_at(10 * BLOCK, &mut bad).is_err());
}

#[test]
fn a_clone_made_during_the_merge_keeps_the_layer_and_the_snapshot_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (s, e, mut m) = volume_with_snapshot(dir.path(), 2 * MERGE_BATCH as u64);
    let snap = m.clone();
    let layer = snapshot_layer(&s, "v", "s");
    let paused = pause::first(&s.inner.hooks, |p| p == Point::MergeBatch(1));
    let deleter = {
        let s = s.clone();
        std::thread::spawn(move || s.delete_snapshot("v", "s"))
    };
    paused.reached();
    // The snapshot stays until the merge commits, so it can still be cloned.
    s.clone_snapshot("v", "s", "c").unwrap();
    m.write(&e, 1500, 4, 2);
    paused.release();
    deleter.join().unwrap().unwrap();

    assert!(s.volume_info("v").unwrap().snapshots.is_empty());
    assert!(
        layer_files_exist(dir.path(), layer),
        "the clone's layer went"
    );
    assert_eq!(backing(&s, top_layer(&s, "c")), Some(layer));
    assert_eq!(backing(&s, top_layer(&s, "v")), Some(layer));
    m.check(&e, "the volume");
    snap.check(&s.open_export("c").unwrap(), "the clone");
    assert_scrub_clean(&s);
}

#[test]
fn a_merge_whose_child_was_merged_away_meanwhile_merges_into_the_new_child() {
    let dir = tempfile::tempdir().unwrap();
    let (s, e, mut m) = volume_with_snapshot(dir.path(), 2 * MERGE_BATCH as u64);
    let m1 = m.clone();
    m.write(&e, 100, 300, 2);
    s.create_snapshot("v", "s2").unwrap();
    m.write(&e, 150, 10, 3);
    m.trim(&e, 1800, 10);
    s.create_snapshot("v", "s3").unwrap();
    let m3 = m.clone();
    m.write(&e, 1900, 40, 4);
    let (l2, l3) = (snapshot_layer(&s, "v", "s2"), snapshot_layer(&s, "v", "s3"));
    let top = top_layer(&s, "v");

    // Merging s2's layer into s3's pauses; meanwhile s3's layer merges into the top.
    let paused = pause::first(&s.inner.hooks, |p| p == Point::MergeBatch(0));
    let deleter = {
        let s = s.clone();
        std::thread::spawn(move || s.delete_snapshot("v", "s2"))
    };
    paused.reached();
    s.delete_snapshot("v", "s3").unwrap();
    assert_eq!(backing(&s, top), Some(l2));
    paused.release();
    deleter.join().unwrap().unwrap();

    assert!(!layer_files_exist(dir.path(), l2));
    assert!(!layer_files_exist(dir.path(), l3));
    assert_eq!(backing(&s, top), Some(snapshot_layer(&s, "v", "s")));
    m.check(&e, "the volume");
    m1.check(&s.open_export("v@s").unwrap(), "the oldest snapshot");
    drop(m3);
    drop(e);
    drop(s);
    let s = quiet(dir.path());
    m.check(&s.open_export("v").unwrap(), "the volume after reopening");
    assert_scrub_clean(&s);
}

/// Where the test of a failing placed write is: the write published and stopped, then
/// let go (to fail).
#[derive(Default)]
struct Gate {
    writer_in: bool,
    go: bool,
}

#[test]
fn a_placed_write_that_fails_during_the_merge_leaves_the_old_block() {
    let dir = tempfile::tempdir().unwrap();
    let (s, e, mut m) = volume_with_snapshot(dir.path(), 3 * MERGE_BATCH as u64);
    let state = Arc::new((Mutex::new(Gate::default()), Condvar::new()));
    {
        let state = state.clone();
        s.inner.hooks.set(move |p| {
            let (g, cv) = &*state;
            let mut g = g.lock();
            let wait = |g: &mut parking_lot::MutexGuard<'_, Gate>, until: fn(&Gate) -> bool| {
                while !until(g) {
                    if cv.wait_for(g, Duration::from_secs(30)).timed_out() {
                        return Err(std::io::Error::other("the other side never came"));
                    }
                }
                Ok(())
            };
            match p {
                // The write is published (pending) when the batch holding its blocks runs.
                Point::PlacedLogged if !g.writer_in => {
                    g.writer_in = true;
                    cv.notify_all();
                    wait(&mut g, |g| g.go)?;
                    Err(std::io::Error::other("injected failure of a placed write"))
                }
                Point::MergeBatch(1) => wait(&mut g, |g| g.writer_in),
                Point::MergeBatch(2) => {
                    g.go = true;
                    cv.notify_all();
                    Ok(())
                }
                _ => Ok(()),
            }
        });
    }
    let writer = std::thread::spawn(move || {
        let r = e.write_at(1100 * BLOCK, &vec![7u8; 16 * BLOCK_SIZE], false);
        (r, e)
    });
    s.delete_snapshot("v", "s").unwrap();
    let (r, e) = writer.join().unwrap();
    assert!(r.is_err(), "the injected failure");
    // The failed write left the blocks to the merge, which copied them after all.
    m.check(&e, "after the merge");
    m.write(&e, 1100, 1, 3);
    drop(e);
    drop(s);
    let s = quiet(dir.path());
    m.check(&s.open_export("v").unwrap(), "after reopening");
    assert_scrub_clean(&s);
}

// The tests of zero ranges carried as ranges, in their own file (`store/mod.rs` declares
// only this one).
#[path = "merge_range_tests.rs"]
mod range_tests;
