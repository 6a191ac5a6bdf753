//! Bit rot behind a store's back, for the repair tests: a layer file's block flipped in
//! place (`tessera_tests::bitrot`, shared with the cluster's repair test), read back, and
//! reads through a client we did not write (`qemu-img`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tessera_store_admin::{AdminOp, AdminReply, VolumeReplication};
use tessera_tests::bitrot::layer_file_holding;
// Not every test binary that includes this module rots a block.
#[allow(unused_imports)]
pub use tessera_tests::bitrot::{bytes_at, rot};
use tessera_tests::cluster::wait_for;

use super::Node;

/// The block size the checksums cover.
pub const B: u64 = 4096;

/// The one layer data file of `n` holding data (each store holds one volume here).
pub fn data_file(n: &Node) -> PathBuf {
    std::fs::read_dir(n.dir.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "data") && std::fs::metadata(p).unwrap().len() > 0
        })
        .unwrap_or_else(|| panic!("{} has no layer data file with data", n.id))
}

/// The layer data file of `n` whose block at `offset` holds `block`, waited for (at most
/// 20 s: a write may reach its layer file from the log a little later).
pub fn file_holding(n: &Node, offset: u64, block: &[u8]) -> PathBuf {
    let what = format!("a layer file of {} holding the block at {offset}", n.id);
    wait_for(&what, 20, || {
        layer_file_holding(&n.dir.join("layers"), offset, block)
    })
}

/// `n`'s replication status of volume `v`.
pub fn status(n: &Node) -> VolumeReplication {
    match n.admin(AdminOp::ReplicationStatus {}).unwrap() {
        AdminReply::Replication(all) => all.into_iter().find(|v| v.volume == "v").unwrap(),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Reads `len` bytes at `offset` of `n`'s export `export` with `qemu-img`: the bytes, or
/// its error.
pub fn qemu_read(
    root: &Path,
    n: &Node,
    export: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, String> {
    let out = root.join(format!("{}-read.img", n.id));
    let _ = std::fs::remove_file(&out);
    // The raw driver's window reads only the range asked, through QEMU's NBD client.
    let opts = format!(
        "driver=raw,offset={offset},size={len},file.driver=nbd,file.server.type=unix,\
         file.server.path={},file.export={export}",
        n.dir.join("nbd.sock").display()
    );
    let r = Command::new("qemu-img")
        .args(["convert", "--image-opts", &opts, "-O", "raw"])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .expect("qemu-img (tests/setup installs it)");
    if !r.status.success() {
        return Err(format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(std::fs::read(&out).unwrap())
}
