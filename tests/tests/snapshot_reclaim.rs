//! Deleting a snapshot gives its space back (issue #9): a volume written and overwritten
//! with qemu-io over NBD, its snapshot deleted through the `tessera-store` CLI, the data
//! directory's layer files measured, and the volume compared with qemu-img against a model
//! written here, before and after a restart.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use tessera_tests::{require, run, StoreProcess};

const MIB: u64 = 1 << 20;

/// Bytes the layers' data files occupy on disk (their blocks, not their length).
fn layers_allocated(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("layers"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

/// The layers that have files in the data directory, by the name of their data file.
fn layers(data_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data_dir.join("layers"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".data").map(str::to_string)
        })
        .collect()
}

fn json(p: &StoreProcess, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&p.cli_ok(&all)).unwrap()
}

fn qemu_io(p: &StoreProcess, export: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(p.uri(export)));
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

fn assert_identical(p: &StoreProcess, model: &Path, export: &str) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(model)
        .arg(p.uri(export)));
    assert!(out.contains("identical"), "{export}: {out}");
}

#[test]
fn deleting_a_snapshot_gives_its_space_back_and_keeps_the_data() {
    require("qemu-io");
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let mut p = StoreProcess::start(&data);
    p.create_volume("v", "16M");
    qemu_io(&p, "v", &["write -P 0x11 0 16M"]);
    p.cli_ok(&["snapshot", "create", "v", "s1"]);
    // Overwrite half, discard a MiB (zero markers over the snapshot's data).
    qemu_io(&p, "v", &["write -P 0x22 0 8M", "discard 12M 1M"]);

    let mut want = vec![0x11u8; (16 * MIB) as usize];
    want[..(8 * MIB) as usize].fill(0x22);
    want[(12 * MIB) as usize..(13 * MIB) as usize].fill(0);
    let model = dir.path().join("model.raw");
    std::fs::write(&model, &want).unwrap();
    let snapshot = dir.path().join("snapshot.raw");
    std::fs::write(&snapshot, vec![0x11u8; (16 * MIB) as usize]).unwrap();
    assert_identical(&p, &model, "v");
    assert_identical(&p, &snapshot, "v@s1");

    let before = layers_allocated(&data);
    let layers_before = layers(&data);
    p.cli_ok(&["snapshot", "rm", "v", "s1"]);
    let after = layers_allocated(&data);
    // The snapshot's 16 MiB go; the 7 MiB of it the volume had not overwritten or
    // discarded move into the volume's own layer: 9 MiB come back.
    let back = before.saturating_sub(after);
    assert!(
        (9 * MIB - MIB / 4..=9 * MIB + MIB / 4).contains(&back),
        "layer files used {before} bytes before the delete, {after} after: expected 9 MiB back"
    );
    let layers_after = layers(&data);
    assert!(
        layers_after.is_subset(&layers_before) && layers_after.len() == layers_before.len() - 1,
        "the snapshot's layer should be gone: {layers_before:?} -> {layers_after:?}"
    );
    let info = json(&p, &["volume", "info", "v"]);
    assert!(info["snapshots"].as_array().unwrap().is_empty(), "{info}");
    // The volume's own layer now holds all its data: 8 MiB written + 7 MiB merged.
    let own = info["allocated"].as_u64().unwrap();
    assert!(own >= 15 * MIB - MIB / 4, "{info}");
    assert_identical(&p, &model, "v");
    assert!(!p.cli(&["snapshot", "rm", "v", "s1"]).status.success());

    // Writes after the merge land in the same layer; everything survives a restart.
    qemu_io(&p, "v", &["write -P 0x33 15M 64k"]);
    want[(15 * MIB) as usize..(15 * MIB + 65536) as usize].fill(0x33);
    std::fs::write(&model, &want).unwrap();
    p.stop();
    let p = StoreProcess::start(&data);
    assert_identical(&p, &model, "v");
    let scrub = p.cli(&["scrub"]);
    assert!(
        scrub.status.success(),
        "scrub found damage:\n{}",
        String::from_utf8_lossy(&scrub.stdout)
    );
    assert!(p.log_text().contains("merged"), "{}", p.log_text());
}
