//! A full filesystem: writes fail with ENOSPC, nothing acknowledged is lost, the server
//! keeps serving, restarts, and takes writes again once space is freed.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_nbd::{Client, ClientError};
use tessera_tests::{free_port, require, run, StoreProcess};

const ENOSPC: u32 = 28;
const MIB: usize = 1 << 20;

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn chunk(i: usize) -> Vec<u8> {
    (0..MIB).map(|j| (i * 7 + j / 4096) as u8 ^ 0x5a).collect()
}

#[test]
fn full_disk_fails_writes_cleanly_and_loses_nothing() {
    require("nbdinfo");
    if !nix::unistd::Uid::effective().is_root() {
        tessera_tests::skip(
            "full_disk_fails_writes_cleanly_and_loses_nothing",
            "needs root to mount a small tmpfs",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tessera-test"])
        .arg(&mnt));
    let _guard = Tmpfs(mnt.clone());
    let data = mnt.join("store");
    let port = free_port();
    let mut p = StoreProcess::start_with_port(&data, port);
    // Thin: a volume far larger than the filesystem is fine until it fills.
    p.create_volume("big", "256M");

    let mut c = Client::connect_unix(&p.nbd_sock, "big").unwrap();
    let mut written = 0;
    let err = loop {
        assert!(written < 256, "48 MiB filesystem never filled");
        match c.write((written * MIB) as u64, &chunk(written), false) {
            Ok(()) => {
                written += 1;
                if written % 4 == 0 {
                    c.flush().unwrap();
                }
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, ClientError::Errno(ENOSPC)),
        "expected ENOSPC, got {err}"
    );
    assert!(written >= 8, "only {written} MiB fit before ENOSPC");
    // The connection still works, and everything acknowledged reads back.
    c.flush().unwrap();
    let mut buf = vec![0u8; MIB];
    for i in 0..written {
        c.read((i * MIB) as u64, &mut buf).unwrap();
        assert!(buf == chunk(i), "MiB {i} changed after ENOSPC");
    }
    p.assert_healthy();
    // Admin operations that need space say so clearly.
    let out = p.cli(&["volume", "create", "another", "--size", "1G"]);
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains("space"), "unclear error: {msg}");
    }

    // A restart on the full filesystem replays and keeps everything.
    p.stop();
    let mut p = StoreProcess::start_with_port(&data, port);
    let mut c = Client::connect_unix(&p.nbd_sock, "big").unwrap();
    for i in 0..written {
        c.read((i * MIB) as u64, &mut buf).unwrap();
        assert!(
            buf == chunk(i),
            "MiB {i} lost across restart on a full disk"
        );
    }

    // Freeing space (trim) lets writes succeed again once the checkpoint ran.
    c.trim(0, (written / 2 * MIB) as u32).unwrap();
    c.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.write(0, &chunk(999), false) {
            Ok(()) => break,
            Err(ClientError::Errno(ENOSPC)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("write after trim failed: {e}"),
        }
    }
    c.read(0, &mut buf).unwrap();
    assert!(buf == chunk(999));
    p.assert_healthy();
    p.stop();
}
