//! `tessera-store serve` refuses to start on a data directory whose metadata is gone or
//! unreadable (the catalog, a layer's data file or checksum table), exits with a failure
//! naming the file, and leaves the data as it was; a new directory still starts.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::{bin, free_port, require, run, StoreProcess};

/// Runs `tessera-store serve` on `data_dir`, expecting it to exit with status 1 within
/// 30 s; returns its standard error.
fn serve_refused(data_dir: &Path) -> String {
    let mut child = Command::new(bin("tessera-store"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--nbd-tcp-plain")
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("TESSERA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tessera-store started on {}; stderr:\n{}",
                data_dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    stderr
}

fn assert_names(stderr: &str, path: &Path) {
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in stderr:\n{stderr}"));
    assert!(
        error.contains(&path.display().to_string()),
        "the error does not name {}:\n{stderr}",
        path.display()
    );
}

fn qemu_io(p: &StoreProcess, cmd: &str) -> String {
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd])
        .arg(p.uri("v")))
}

/// Files under `dir/layers`, sorted.
fn layer_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn serve_refuses_a_lost_or_unreadable_catalog_or_layer_file_naming_it() {
    require("qemu-io");
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("store");
    let mut p = StoreProcess::start(&dir);
    p.create_volume("v", "16M");
    qemu_io(&p, "write -P 0xa5 0 4M");
    p.stop();
    let layers = layer_files(&dir);
    assert_eq!(
        layers.len(),
        4,
        "one layer's data, checksums and zero ranges, and the zero-range marker: {layers:?}"
    );

    // The catalog is deleted: the layers are still there, so this is no new store.
    let cat = dir.join("catalog.json");
    let saved = fs::read(&cat).unwrap();
    fs::remove_file(&cat).unwrap();
    let stderr = serve_refused(&dir);
    assert_names(&stderr, &cat);
    assert!(!cat.exists(), "an empty catalog was written");
    assert_eq!(
        layer_files(&dir),
        layers,
        "layer files were removed or added"
    );

    // Unreadable (root reads through chmod 000, so a directory stands in its place) and
    // malformed catalogs.
    fs::create_dir(&cat).unwrap();
    assert_names(&serve_refused(&dir), &cat);
    fs::remove_dir(&cat).unwrap();
    for bad in [&saved[..saved.len() / 2], b"{}", b"not json"] {
        fs::write(&cat, bad).unwrap();
        assert_names(&serve_refused(&dir), &cat);
    }
    fs::write(&cat, &saved).unwrap();

    // A layer's checksum table, then its data file, is deleted: never recreated.
    for gone in &layers {
        let kept = fs::read(gone).unwrap();
        fs::remove_file(gone).unwrap();
        assert_names(&serve_refused(&dir), gone);
        assert!(!gone.exists(), "{} was recreated", gone.display());
        fs::write(gone, kept).unwrap();
    }

    // With everything back, the store starts and the data is intact.
    let p = StoreProcess::start(&dir);
    let out = qemu_io(&p, "read -P 0xa5 0 4M");
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn serve_starts_on_a_new_data_directory_and_again_after_a_stop() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("fresh");
    let mut p = StoreProcess::start(&dir);
    assert!(dir.join("catalog.json").is_file());
    p.stop();
    // Stopped without ever having a volume: still starts.
    let mut p = StoreProcess::start(&dir);
    p.create_volume("v", "1M");
    p.stop();
    let p = StoreProcess::start(&dir);
    p.cli_ok(&["volume", "info", "v"]);
}
