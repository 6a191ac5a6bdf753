//! Repairing a block that fails its checksum with another copy's bytes
//! (`Export::repair_block`): only bytes matching the checksum this store holds are
//! written, in the layer that holds the block, and nothing else is touched.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use tessera_blockstore::{BlockRepair, Export, Store, StoreError, StoreOptions, BLOCK_SIZE};

const MIB: u64 = 1 << 20;
const B: u64 = BLOCK_SIZE as u64;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8 ^ (i >> 8) as u8))
        .collect()
}

/// The one layer data file holding data (a fresh store with one written layer).
fn data_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "data") && std::fs::metadata(p).unwrap().len() > 0
        })
        .expect("a layer data file with data")
}

/// Flips one bit of block `block` in `file`, behind the store's back (bit rot).
fn rot(file: &Path, block: u64) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[(block * B) as usize + 17] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
}

fn block_of(file: &Path, block: u64) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap();
    bytes[(block * B) as usize..((block + 1) * B) as usize].to_vec()
}

/// A store with volume `v` whose first `blocks` blocks hold a pattern (`seed`), in its
/// layer file (checkpointed): the directory, store, export and the pattern.
fn written(seed: u8, blocks: usize) -> (tempfile::TempDir, Store, Export, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
    s.create_volume("v", MIB).unwrap();
    let e = s.open_export("v").unwrap();
    let good = pattern(seed, blocks * BLOCK_SIZE);
    e.write_at(0, &good, false).unwrap();
    s.checkpoint().unwrap();
    (dir, s, e, good)
}

#[test]
fn a_bad_block_is_rewritten_only_with_the_bytes_its_checksum_names() {
    let (dir, s, e, good) = written(3, 4);
    let file = data_file(dir.path());
    rot(&file, 2);
    let rotten = block_of(&file, 2);
    let mut buf = vec![0u8; 4 * BLOCK_SIZE];
    assert!(matches!(
        e.read_at(0, &mut buf),
        Err(StoreError::Corrupt { block: 2, .. })
    ));

    // Bad input: not one aligned block; bytes of another content (a stale or lying copy).
    assert!(matches!(
        e.repair_block(2 * B + 512, &good[..BLOCK_SIZE]),
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        e.repair_block(2 * B, &good[..BLOCK_SIZE + 512]),
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        e.repair_block(MIB, &good[..BLOCK_SIZE]),
        Err(StoreError::OutOfRange { .. })
    ));
    let other = pattern(9, BLOCK_SIZE);
    assert_eq!(
        e.repair_block(2 * B, &other).unwrap(),
        BlockRepair::Mismatch
    );
    assert_eq!(
        block_of(&file, 2),
        rotten,
        "a refused repair wrote to the file"
    );
    assert!(
        e.read_at(0, &mut buf).is_err(),
        "a refused repair healed the block"
    );

    // The right bytes: written in place, the read succeeds, the scrub finds nothing.
    let right = &good[2 * BLOCK_SIZE..3 * BLOCK_SIZE];
    assert_eq!(
        e.repair_block(2 * B, right).unwrap(),
        BlockRepair::Rewritten
    );
    assert_eq!(block_of(&file, 2), right);
    e.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, good);
    assert!(s.scrub().unwrap().bad.is_empty());
    assert_eq!(
        e.repair_block(2 * B, right).unwrap(),
        BlockRepair::NotNeeded
    );

    // A block rewritten since (its newest version in the log) needs no repair, and an
    // older copy's bytes are not put back under it.
    rot(&file, 1);
    let newer = pattern(7, BLOCK_SIZE);
    e.write_at(B, &newer, false).unwrap();
    assert_eq!(
        e.repair_block(B, &good[BLOCK_SIZE..2 * BLOCK_SIZE])
            .unwrap(),
        BlockRepair::NotNeeded
    );
    let mut one = vec![0u8; BLOCK_SIZE];
    e.read_at(B, &mut one).unwrap();
    assert_eq!(one, newer);
}

#[test]
fn a_bad_block_of_a_snapshot_layer_is_repaired_for_the_volume_and_the_snapshot() {
    let (dir, s, e, good) = written(5, 2);
    s.create_snapshot("v", "s").unwrap();
    rot(&data_file(dir.path()), 1);
    let snap = s.open_export("v@s").unwrap();
    let mut buf = vec![0u8; 2 * BLOCK_SIZE];
    assert!(snap.read_at(0, &mut buf).is_err());
    assert!(e.read_at(0, &mut buf).is_err());

    let right = &good[BLOCK_SIZE..];
    assert_eq!(e.repair_block(B, right).unwrap(), BlockRepair::Rewritten);
    e.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, good);
    snap.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, good);
}
