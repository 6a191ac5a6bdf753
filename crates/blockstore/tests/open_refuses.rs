//! Opening a store whose metadata is gone or unreadable is refused, naming the file, and
//! leaves the data where it is; a new directory still becomes a store.

use std::fs;
use std::path::{Path, PathBuf};

use tessera_blockstore::{Store, StoreOptions};

fn open(dir: &Path) -> Result<Store, String> {
    Store::open(dir, StoreOptions::default()).map_err(|e| e.to_string())
}

fn refused(dir: &Path) -> String {
    match open(dir) {
        Ok(_) => panic!("the store in {} opened", dir.display()),
        Err(e) => e,
    }
}

/// A store with volume `v` holding 0x5a in its first MiB, closed cleanly.
fn store_with_data(dir: &Path) {
    let store = open(dir).expect("opening a new store");
    store
        .create_volume("v", 16 << 20)
        .expect("creating volume v");
    let e = store.open_export("v").expect("opening export v");
    e.write_at(0, &vec![0x5a; 1 << 20], false)
        .expect("writing to v");
    store.flush().expect("flushing");
}

fn reads_back(dir: &Path) {
    let store = open(dir).expect("reopening the store");
    let e = store.open_export("v").expect("opening export v");
    let mut buf = vec![0u8; 1 << 20];
    e.read_at(0, &mut buf).expect("reading v");
    assert!(buf.iter().all(|b| *b == 0x5a), "the data did not come back");
}

/// The layer files of the store, sorted.
fn layer_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("layers"))
        .expect("listing layers/")
        .map(|e| e.expect("listing layers/").path())
        .collect();
    files.sort();
    files
}

#[test]
fn a_new_directory_becomes_a_store_with_a_catalog_at_once() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("does/not/exist/yet");
    drop(open(&dir).unwrap());
    assert!(dir.join("catalog.json").is_file());
    assert!(!dir.join("catalog.json.tmp").exists());
    drop(open(&dir).unwrap());
    // An existing but empty directory too.
    let empty = tempfile::tempdir().unwrap();
    drop(open(empty.path()).unwrap());
    assert!(empty.path().join("catalog.json").is_file());
}

#[test]
fn a_directory_used_by_a_store_that_never_had_a_volume_still_starts() {
    // What an earlier version left after running without volumes: a lock file, empty
    // directories and an empty WAL segment, but no catalog.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("layers")).unwrap();
    fs::create_dir_all(dir.path().join("wal")).unwrap();
    fs::write(dir.path().join("lock"), b"").unwrap();
    fs::write(dir.path().join("wal/0000000000000003.wal"), b"").unwrap();
    let store = open(dir.path()).unwrap();
    assert!(store.list_volumes().is_empty());
    assert!(dir.path().join("catalog.json").is_file());
}

#[test]
fn a_lost_catalog_refuses_to_start_and_keeps_the_layers() {
    let dir = tempfile::tempdir().unwrap();
    store_with_data(dir.path());
    let cat = dir.path().join("catalog.json");
    let saved = fs::read(&cat).unwrap();
    let layers = layer_files(dir.path());
    // One layer: data, checksums, zero ranges; and the directory's zero-range marker.
    assert_eq!(layers.len(), 4, "{layers:?}");
    fs::remove_file(&cat).unwrap();
    // A save cut short before its rename leaves this; it must not pass for a catalog.
    fs::write(dir.path().join("catalog.json.tmp"), &saved).unwrap();

    for _ in 0..2 {
        let err = refused(dir.path());
        assert!(err.contains(&cat.display().to_string()), "{err}");
        assert!(err.contains("missing"), "{err}");
        assert!(
            err.contains("layers/"),
            "the error names the data it found: {err}"
        );
    }
    assert!(!cat.exists(), "an empty catalog was written");
    assert_eq!(layer_files(dir.path()), layers, "layer files were touched");
    assert!(
        dir.path().join("catalog.json.tmp").exists(),
        "the temporary file is left for whoever repairs the directory"
    );

    fs::write(&cat, &saved).unwrap();
    reads_back(dir.path());
    assert!(!dir.path().join("catalog.json.tmp").exists());
}

#[test]
fn a_wal_with_records_but_no_catalog_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("wal")).unwrap();
    let seg = dir.path().join("wal/0000000000000001.wal");
    fs::write(&seg, [1u8; 64]).unwrap();
    let err = refused(dir.path());
    assert!(err.contains("catalog.json"), "{err}");
    assert!(err.contains(&seg.display().to_string()), "{err}");
    assert!(seg.exists(), "the WAL was not replayed or removed");
}

#[test]
fn a_lost_layer_file_refuses_to_start_naming_it_and_is_not_recreated() {
    let dir = tempfile::tempdir().unwrap();
    store_with_data(dir.path());
    for gone in layer_files(dir.path()) {
        let kept = fs::read(&gone).unwrap();
        fs::remove_file(&gone).unwrap();
        let err = refused(dir.path());
        assert!(err.contains(&gone.display().to_string()), "{err}");
        assert!(!gone.exists(), "{} was recreated", gone.display());
        fs::write(&gone, kept).unwrap();
    }
    reads_back(dir.path());
}

#[test]
fn an_unreadable_or_malformed_catalog_refuses_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    store_with_data(dir.path());
    let cat = dir.path().join("catalog.json");
    let saved = fs::read(&cat).unwrap();
    let layers = layer_files(dir.path());

    fs::remove_file(&cat).unwrap();
    fs::create_dir(&cat).unwrap();
    let err = refused(dir.path());
    assert!(err.contains(&format!("reading {}", cat.display())), "{err}");
    fs::remove_dir(&cat).unwrap();

    let text = String::from_utf8(saved.clone()).unwrap();
    for bad in [
        &text[..text.len() / 2],
        "",
        "null",
        &text.replace("\"layers\"", "\"lairs\""),
    ] {
        fs::write(&cat, bad).unwrap();
        let err = refused(dir.path());
        assert!(err.contains(&format!("catalog {}", cat.display())), "{err}");
    }
    assert_eq!(layer_files(dir.path()), layers, "layer files were touched");
    fs::write(&cat, &saved).unwrap();
    reads_back(dir.path());
}
