//! Bit rot behind a store's back, for the repair tests (the store's own in
//! `crates/store/tests`, the cluster's in `tests/tests`): the layer data file holding a
//! block found, one bit of the block flipped in place, its bytes read back.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The layer data file (`*.data`) in the store's `layers` directory whose bytes at
/// `offset` are `block`, if one is there yet (a write may reach its layer file from the
/// log a little later: callers poll). A file that vanishes meanwhile is passed over.
pub fn layer_file_holding(layers: &Path, offset: u64, block: &[u8]) -> Option<PathBuf> {
    std::fs::read_dir(layers)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .find(|p| {
            let Ok(f) = std::fs::File::open(p) else {
                return false;
            };
            let mut buf = vec![0u8; block.len()];
            f.read_exact_at(&mut buf, offset).is_ok() && buf == block
        })
}

/// Flips one bit of the block at `offset` in `file`, in place, synced (bit rot).
pub fn rot(file: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, offset + 100).unwrap();
    byte[0] ^= 0x10;
    f.write_all_at(&byte, offset + 100).unwrap();
    f.sync_all().unwrap();
}

/// The `len` bytes of `file` at `offset`.
pub fn bytes_at(file: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}
