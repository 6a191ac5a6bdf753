//! Durability beyond kill -9 (issue #9): the store runs on powerfs, a FUSE filesystem
//! that can lose power, and must keep every write a completed FLUSH (or FUA) covered
//! through hundreds of power cuts, whatever the cut leaves of unsynced data. See
//! `docs/power-loss.md` for the model, the modes, and how to reproduce a seed.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tessera_tests::powerfs::{self, CutMode, PowerFs};

/// Prints the SKIP line and returns false when powerfs cannot run here.
fn powerfs_or_skip(test: &str) -> bool {
    match powerfs::unavailable() {
        Some(reason) => {
            tessera_tests::skip(test, &reason);
            false
        }
        None => true,
    }
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn read(p: &Path) -> Option<Vec<u8>> {
    fs::read(p).ok()
}

/// The filesystem itself, through real system calls: what a cut keeps and drops.
#[test]
fn powerfs_keeps_exactly_what_was_synced() {
    if !powerfs_or_skip("powerfs_keeps_exactly_what_was_synced") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut pfs = PowerFs::mount(&mnt).unwrap();

    // A durable file, then unsynced changes of every kind the store makes.
    let dir = mnt.join("d");
    fs::create_dir(&dir).unwrap();
    sync_dir(&mnt);
    let a = dir.join("a");
    let mut f = File::create(&a).unwrap();
    f.write_all(&[1u8; 8192]).unwrap();
    f.sync_all().unwrap();
    sync_dir(&dir);
    f.write_all_at(&[2u8; 100], 10).unwrap();
    f.set_len(12288).unwrap();
    drop(f);
    let b = dir.join("b");
    let mut g = File::create(&b).unwrap();
    g.write_all(b"synced file, unsynced name").unwrap();
    g.sync_data().unwrap();
    drop(g);
    fs::write(dir.join("tmp"), b"renamed").unwrap();
    fs::rename(dir.join("tmp"), &a).unwrap();
    // Reads see the changes now.
    assert_eq!(read(&a).unwrap(), b"renamed");
    assert!(b.exists());

    let report = pfs.power_cut(CutMode::DropAll, 1).unwrap();
    assert_eq!(read(&a).unwrap(), vec![1u8; 8192], "{report:?}");
    assert!(
        !b.exists(),
        "a file whose directory was never synced survived"
    );
    assert!(!dir.join("tmp").exists());

    // Hole punching keeps the size and zeroes; synced, it survives.
    let f = OpenOptions::new().read(true).write(true).open(&a).unwrap();
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        4096,
        4096,
    )
    .unwrap();
    f.sync_data().unwrap();
    drop(f);
    pfs.power_cut(CutMode::DropAll, 2).unwrap();
    let got = read(&a).unwrap();
    assert_eq!(got.len(), 8192);
    assert!(got[..4096].iter().all(|b| *b == 1) && got[4096..].iter().all(|b| *b == 0));

    // Lying sync: success, nothing durable.
    pfs.set_lying_sync(true);
    let mut f = OpenOptions::new().write(true).open(&a).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&[9u8; 4096]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    pfs.power_cut(CutMode::DropAll, 3).unwrap();
    pfs.set_lying_sync(false);
    let mut buf = [0u8; 4096];
    File::open(&a).unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(buf, [1u8; 4096], "a lying sync made data durable");
    let counts = pfs.sync_counts();
    assert!(
        counts.lied >= 1 && counts.files >= 3 && counts.dirs >= 2,
        "{counts:?}"
    );

    // flock is local to the kernel: a second exclusive lock on the same file conflicts.
    let l1 = File::create(mnt.join("lock")).unwrap();
    let l1 = nix::fcntl::Flock::lock(l1, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let l2 = File::open(mnt.join("lock")).unwrap();
    assert!(
        nix::fcntl::Flock::lock(l2, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
        "flock on powerfs does not exclude"
    );
    drop(l1);
    let stat = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert!(stat.blocks_available() as u64 * stat.fragment_size() as u64 >= 1 << 40);
    pfs.unmount().unwrap();
}
