//! Power cuts at exact points (power-loss finding 4, docs/power-loss.md), modelled on what
//! a cut keeps: a file's content as of its last sync, except for the pages the test says
//! the kernel had already written back. Each test fails on the code before the fix: a
//! flushed trim came back as the data it had trimmed, or a flushed block became unreadable.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::placed_tests::{filled, quiet, read, MIB, N};
use super::Store;
use crate::format::{block_hash, BLOCK_SIZE};
use crate::hooks::Point;
use crate::layer::LayerFiles;
use crate::Export;

/// Block 0's bytes in `layer`.
fn block0(layer: &LayerFiles) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    layer.read_blocks(0, &mut buf).unwrap();
    buf
}

/// A quiet store in `dir` whose volume "v" holds 1s in its first `N` blocks, placed and
/// checkpointed (durable, named in the table).
fn stored(dir: &std::path::Path) -> (Store, Export) {
    let s = quiet(dir);
    s.create_volume("v", 4 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(0, &filled(1, N), false).unwrap();
    s.checkpoint().unwrap();
    (s, e)
}

fn power_cut() -> std::io::Error {
    std::io::Error::other("power cut")
}

/// The harness's failure (seed 0x9d15c0009, cycle 107): a flushed trim, then a placed
/// write into the trimmed blocks, unflushed. The checkpoint after the trim made its
/// markers durable and deleted its record; the next one wrote the placed write's checksum
/// over the marker, and the power went before its layer sync: the table page had reached
/// the disk, the data page had not. Recovery then found neither the placed write (its data
/// is not there) nor the trim (its record is gone, its marker overwritten) and served the
/// bytes from before the trim.
#[test]
fn a_flushed_trim_survives_a_cut_that_keeps_a_placed_checksum_without_its_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, e) = stored(dir.path());
        e.trim(0, (N * BLOCK_SIZE) as u64, false).unwrap();
        e.flush().unwrap();
        let layer = s.inner.layers.read().values().next().cloned().unwrap();
        // What a cut keeps of block 0's data: its content at the last sync of the layer's
        // data file (the checkpoint above synced it).
        let durable = Arc::new(Mutex::new(block0(&layer)));
        let cutting = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        {
            let (layer, durable) = (layer.clone(), durable.clone());
            let (cutting, cut) = (cutting.clone(), cut.clone());
            s.inner.hooks.set(move |p| match p {
                _ if cut.load(Ordering::SeqCst) => Err(power_cut()),
                Point::SyncLayer(_) if cutting.load(Ordering::SeqCst) => {
                    // The power goes: the data file loses what no sync covered; the table
                    // keeps what the checkpoint wrote (written back already).
                    layer.write_blocks(0, &durable.lock()).unwrap();
                    cut.store(true, Ordering::SeqCst);
                    Err(power_cut())
                }
                Point::SyncLayer(_) | Point::SyncPlacedData(_) => {
                    *durable.lock() = block0(&layer);
                    Ok(())
                }
                _ => Ok(()),
            });
        }
        // Deletes the trim's record once its markers are durable; punches the data.
        s.checkpoint().unwrap();
        e.write_at(0, &filled(2, N), false).unwrap();
        cutting.store(true, Ordering::SeqCst);
        assert!(s.checkpoint().is_err(), "the cut stops the checkpoint");
        assert!(
            cut.load(Ordering::SeqCst),
            "the checkpoint reached its layer sync"
        );
        // Nothing runs after the cut: the final checkpoint fails at its first point.
    }
    let s = quiet(dir.path());
    let e = s.open_export("v").unwrap();
    let got = read(&e, 0, BLOCK_SIZE);
    assert!(
        got == filled(0, 1) || got == filled(2, 1),
        "block 0 came back as neither the flushed trim nor the later write (it starts {:?}; \
         1 is the data the trim replaced)",
        &got[..4]
    );
    assert!(s.scrub().unwrap().bad.is_empty());
}

/// An unflushed trim of flushed data, then a placed write into the trimmed blocks, also
/// unflushed. The write took the trim's markers for a hole and wrote over the flushed data
/// in place without making its record durable; a cut that lost both records and the
/// markers (none was synced) but kept the data page left the old checksum over the new
/// bytes: the flushed block became unreadable.
#[test]
fn a_placed_write_over_an_unflushed_trim_keeps_the_flushed_data_readable() {
    let dir = tempfile::tempdir().unwrap();
    let layer_id;
    {
        let (s, e) = stored(dir.path());
        layer_id = s.inner.layers.read().keys().next().copied().unwrap();
        // What a cut keeps of the log: its records up to the last sync (the checkpoint
        // above synced it).
        let durable: Arc<Mutex<(PathBuf, u64)>> = Arc::new(Mutex::new(s.inner.wal.active_end()));
        {
            let (inner, durable) = (Arc::downgrade(&s.inner), durable.clone());
            s.inner.hooks.set(move |p| {
                if let (Point::WalSync, Some(inner)) = (p, inner.upgrade()) {
                    *durable.lock() = inner.wal.active_end();
                }
                Ok(())
            });
        }
        // The final checkpoint must not seal (nor so sync) the log.
        s.inner.wal.hooks().set(|p| match p {
            Point::SealSync(_) => Err(power_cut()),
            _ => Ok(()),
        });
        e.trim(0, (N * BLOCK_SIZE) as u64, false).unwrap();
        e.write_at(0, &filled(2, N), false).unwrap();
        drop(e);
        drop(s);
        // The power goes: the log loses its unsynced records, the table its unsynced
        // change (the trim's); the data page had been written back.
        let (seg, len) = durable.lock().clone();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len).unwrap();
        let layer = LayerFiles::open(&dir.path().join("layers"), layer_id, false).unwrap();
        let sums: Vec<u8> = (0..N).flat_map(|_| block_hash(&filled(1, 1))).collect();
        layer.write_entries(0, &sums).unwrap();
    }
    let s = quiet(dir.path());
    let e = s.open_export("v").unwrap();
    let mut got = vec![0u8; BLOCK_SIZE];
    let res = e.read_at(0, &mut got);
    assert!(
        res.is_ok(),
        "the flushed block is unreadable after the cut: {res:?}"
    );
    assert!(
        got == filled(1, 1) || got == filled(0, 1) || got == filled(2, 1),
        "block 0 holds none of its versions (it starts {:?})",
        &got[..4]
    );
}
