//! `tessera volume cp` with qcow2 ends and `--resume` (issue #8), against a real
//! `tessera-store` with the QUIC export, checked with qemu-img, which we did not write:
//! a qcow2 image qemu-img made imports equal and sends only its allocated clusters; a
//! qcow2 image we write passes `qemu-img check` and compares equal; images we cannot
//! read (truncated or corrupt header, a backing file, compressed clusters, larger than
//! the volume) are refused in words with the volume untouched; an interrupted copy,
//! killed midway, resumes sending about what was left and ends equal, into a raw file
//! and into a qcow2 image (which `qemu-img check` accepts even right after the kill);
//! a qcow2 image qemu-img made is resumed into too; images a resume cannot continue
//! are refused in words and left unchanged.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::{bin, file_hash, output, require};

#[path = "volume_export/setup.rs"]
#[allow(dead_code)] // each test binary uses part of it
mod setup;
use setup::*;

fn qemu_img(args: &[&str]) -> String {
    let out = output(Command::new("qemu-img").args(args));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `cp ... --output json` (a global flag) and its numbers.
fn cp_json(s: &Setup, src: &str, dst: &str, more: &[&str]) -> serde_json::Value {
    let mut args = vec!["--output", "json"];
    args.extend_from_slice(more);
    serde_json::from_str(&s.cp_ok_with(src, dst, &args)).unwrap()
}

#[test]
fn qcow2_images_qemu_img_made_import_equal_and_ours_pass_qemu_img_check() {
    require("qemu-img");
    let s = setup();
    let size = 40 * MIB;
    s.store.create_volume("disk", "40M");
    // The volume holds other data first: the import must leave it equal to the image.
    let other = s.root.join("other.raw");
    sparse_source(&other, size, 9);
    std::fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .write_all_at(&vec![0x5a; (6 * MIB) as usize], 30 * MIB)
        .unwrap();
    s.cp_ok(p(&other), &s.url("disk"));

    let raw = s.root.join("src.raw");
    sparse_source(&raw, size, 1);
    for compat in ["1.1", "0.10"] {
        // Version 3 (zero clusters possible) and version 2 images.
        let img = s.root.join(format!("src-{compat}.qcow2"));
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            p(&raw),
            p(&img),
        ]);
        let n = cp_json(&s, p(&img), &s.url("disk"), &[]);
        // Only allocated clusters travel: the source holds about 5 MiB of data.
        let data = n["data_bytes"].as_u64().unwrap();
        assert!(data > 5 * MIB && data < 6 * MIB, "{compat}: {n}");
        assert_eq!(n["bytes"].as_u64().unwrap(), size, "{n}");
        let back = s.root.join("back.raw");
        s.cp_ok(&s.url("disk"), p(&back));
        assert_eq!(file_hash(&back), file_hash(&raw), "compat {compat}");
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&back), p(&img)]);
    }

    // Export: by the name's extension, and with --format under another name.
    let out = s.root.join("out.qcow2");
    s.cp_ok(&s.url("disk"), p(&out));
    let named = s.root.join("out.img");
    let n = cp_json(&s, &s.url("disk"), p(&named), &["--format", "qcow2"]);
    assert!(n["data_bytes"].as_u64().unwrap() < 6 * MIB, "{n}");
    for img in [&out, &named] {
        let check = qemu_img(&["check", "-f", "qcow2", p(img)]);
        assert!(check.contains("No errors were found"), "{check}");
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&raw), p(img)]);
        let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
            "info",
            "--output",
            "json",
            "-f",
            "qcow2",
            p(img),
        ]))
        .unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");
        // Zeros are not written: the image holds about the data.
        let used = std::fs::metadata(img).unwrap().blocks() * 512;
        assert!(used < 8 * MIB, "{} uses {used} bytes", img.display());
    }
    // Our image read back by our reader (qemu-img agreed above).
    let again = s.root.join("again.raw");
    s.cp_ok(p(&out), &s.url("disk"));
    s.cp_ok(&s.url("disk"), p(&again));
    assert_eq!(file_hash(&again), file_hash(&raw));
}

#[test]
fn bad_qcow2_images_are_refused_in_words_and_nothing_is_written() {
    require("qemu-img");
    let s = setup();
    s.store.create_volume("v", "8M");
    let src = s.root.join("v.raw");
    sparse_source(&src, 8 * MIB, 4);
    s.cp_ok(p(&src), &s.url("v"));
    let good = s.root.join("good.qcow2");
    let data = s.root.join("data.raw");
    sparse_source(&data, 8 * MIB, 5);
    qemu_img(&["convert", "-O", "qcow2", p(&data), p(&good)]);

    let variant = |name: &str, edit: &dyn Fn(&std::fs::File)| {
        let path = s.root.join(name);
        std::fs::copy(&good, &path).unwrap();
        edit(
            &std::fs::File::options()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
        );
        path
    };
    let truncated = variant("truncated.qcow2", &|f| f.set_len(40).unwrap());
    let l1_outside = variant("l1.qcow2", &|f| {
        f.write_all_at(&(1u64 << 40).to_be_bytes(), 40).unwrap()
    });
    let big = s.root.join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&big), "9M"]);
    let child = s.root.join("child.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        p(&good),
        "-F",
        "qcow2",
        p(&child),
    ]);
    let compressed = s.root.join("compressed.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&data), p(&compressed)]);
    for (img, words) in [
        (
            &truncated,
            &["not a valid qcow2 image", "less than a qcow2 header"][..],
        ),
        (
            &l1_outside,
            &["not a valid qcow2 image", "outside the file"],
        ),
        (&big, &["is larger than the destination volume"]),
        (&child, &["backing file", "not supported yet"]),
        (&compressed, &["compressed cluster", "not supported yet"]),
    ] {
        let out = s.cp(p(img), &s.url("v"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was copied", img.display());
        for w in words.iter().chain(&["nothing copied"]) {
            assert!(err.contains(w), "{}: {err:?} lacks {w:?}", img.display());
        }
    }
    // --resume into files it cannot continue: refused in words, each file unchanged.
    let not_qcow2 = s.root.join("not.qcow2");
    std::fs::write(&not_qcow2, vec![0x11u8; MIB as usize]).unwrap();
    let other_size = s.root.join("other-size.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&other_size), "16M"]);
    let big_clusters = s.root.join("big-clusters.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        p(&big_clusters),
        "8M",
    ]);
    let v2 = s.root.join("v2.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "compat=0.10", p(&v2), "8M"]);
    // An L2 entry of qemu-img's image pointed past the end of the file.
    let broken = variant("broken.qcow2", &|f| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 40).unwrap();
        let l1 = u64::from_be_bytes(b);
        f.read_exact_at(&mut b, l1).unwrap();
        let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
        f.write_all_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), l2)
            .unwrap();
    });
    for (img, words) in [
        (&not_qcow2, &["no qcow2 magic"][..]),
        (
            &other_size,
            &["virtual size is 16777216 bytes", "the source's 8388608"],
        ),
        (
            &big_clusters,
            &["2097152-byte clusters", "not supported yet"],
        ),
        (&v2, &["version 2", "not supported yet"]),
        (&child, &["backing file", "not supported yet"]),
        (&broken, &["not a valid qcow2 image", "outside the file"]),
    ] {
        let before = file_hash(img);
        let out = s.cp_args(&s.url("v"), p(img), &["--resume"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "resumed into {}", img.display());
        for w in words
            .iter()
            .chain(&["cannot resume into it, the file is left unchanged"])
        {
            assert!(err.contains(w), "{}: {err:?} lacks {w:?}", img.display());
        }
        assert_eq!(file_hash(img), before, "{} changed", img.display());
    }
    let after = s.root.join("after.raw");
    s.cp_ok(&s.url("v"), p(&after));
    assert_eq!(
        file_hash(&after),
        file_hash(&src),
        "a refused image wrote something"
    );
    // --resume into a raw file that holds other bytes: the pieces differ, so they are
    // copied, and where the volume reads as zeros the file's old bytes are punched out.
    let stale = s.root.join("stale.raw");
    std::fs::write(&stale, vec![0xffu8; (8 * MIB) as usize]).unwrap();
    let n = cp_json(&s, &s.url("v"), p(&stale), &["--resume"]);
    assert_eq!(n["same_bytes"].as_u64(), Some(0), "{n}");
    assert_eq!(file_hash(&stale), file_hash(&src));
}

/// `size` bytes of data no run of zeros interrupts.
fn random_file(path: &Path, size: u64, seed: u8) {
    let mut r = blake3::Hasher::new().update(&[seed]).finalize_xof();
    let f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; (4 * MIB) as usize];
    for at in (0..size).step_by(buf.len()) {
        r.fill(&mut buf);
        f.write_all_at(&buf, at).unwrap();
    }
}

#[test]
fn an_interrupted_copy_resumes_sending_about_what_was_left_and_ends_equal() {
    let s = setup();
    let size = 128 * MIB;
    s.store.create_volume("big", "128M");
    let src = s.root.join("src.raw");
    random_file(&src, size, 7);

    // Import: half the file went in before (a copy cut short), --resume sends the rest;
    // the volume's digests are computed by its store, so the first half does not travel.
    let half = s.root.join("half.raw");
    std::fs::copy(&src, &half).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&half)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    s.cp_ok(p(&half), &s.url("big"));
    let n = cp_json(&s, p(&src), &s.url("big"), &["--resume"]);
    assert_eq!(n["same_bytes"].as_u64(), Some(size / 2), "{n}");
    assert_eq!(n["data_bytes"].as_u64(), Some(size / 2), "{n}");
    let n = cp_json(&s, p(&src), &s.url("big"), &["--resume"]);
    assert_eq!(
        n["data_bytes"].as_u64(),
        Some(0),
        "nothing differs now: {n}"
    );

    // Export, killed midway: the file is polled until a third of it is written.
    let out = s.root.join("out.raw");
    let mut child = Command::new(bin("tessera"))
        .args(["volume", "cp", &s.url("big"), p(&out), "--creds"])
        .arg(&s.creds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let written = std::fs::metadata(&out).map_or(0, |m| m.blocks() * 512);
        if written >= size / 3 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before a third of it was written"
        );
        assert!(Instant::now() < deadline, "the copy never got a third done");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the copy was not killed: {status}");
    let written = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(written < size, "the copy finished before it was killed");
    let n = cp_json(&s, &s.url("big"), p(&out), &["--resume"]);
    eprintln!("killed with {written} bytes written; the resumed copy: {n}");
    // About what was left: pieces in flight when it was killed (8 of 4 MiB) may have
    // been half written and go again.
    sent_about_what_was_left(&n, size, written, 32 * MIB);
    assert_eq!(file_hash(&out), file_hash(&src));
}

/// Starts `tessera volume cp SRC DST` and SIGKILLs it once `dst` holds `at_least`
/// bytes; returns the bytes it held then.
fn killed_midway(s: &Setup, src: &str, dst: &Path, at_least: u64) -> u64 {
    let mut child = Command::new(bin("tessera"))
        .args(["volume", "cp", src, p(dst), "--creds"])
        .arg(&s.creds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let written = std::fs::metadata(dst).map_or(0, |m| m.blocks() * 512);
        if written >= at_least {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before {at_least} bytes were written"
        );
        assert!(Instant::now() < deadline, "the copy never wrote {at_least}");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the copy was not killed: {status}");
    std::fs::metadata(dst).unwrap().blocks() * 512
}

/// `qemu-img check` of an image: no error (leaked clusters allowed when `leaks_ok`).
fn checked(img: &Path, leaks_ok: bool) -> String {
    let out = output(Command::new("qemu-img").args(["check", "-f", "qcow2", p(img)]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-img check: 0 no problem, 3 leaked clusters only (2 and 1: errors).
    let code = out.status.code();
    assert!(
        code == Some(0) || (leaks_ok && code == Some(3)),
        "qemu-img check {}: {code:?} {text}",
        img.display()
    );
    assert!(!text.contains("ERROR"), "{text}");
    text
}

#[test]
fn a_qcow2_export_killed_midway_resumes_into_a_valid_image_sending_what_was_left() {
    require("qemu-img");
    let s = setup();
    let size = 128 * MIB;
    s.store.create_volume("big", "128M");
    let src = s.root.join("src.raw");
    random_file(&src, size, 8);
    s.cp_ok(p(&src), &s.url("big"));

    let out = s.root.join("out.qcow2");
    let written = killed_midway(&s, &s.url("big"), &out, size / 3);
    assert!(written < size, "the copy finished before it was killed");
    // Right after the kill the file is already a valid image: leaked clusters at most.
    let check = checked(&out, true);
    eprintln!("killed with {written} bytes written; qemu-img check: {check}");
    let n = cp_json(&s, &s.url("big"), p(&out), &["--resume"]);
    eprintln!("the resumed copy: {n}");
    // About what was left: pieces in flight at the kill (8 of 4 MiB) may go again; the
    // file also holds its tables (a few clusters).
    sent_about_what_was_left(&n, size, written, 33 * MIB);
    let check = checked(&out, false);
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&out)]);
    let n = cp_json(&s, &s.url("big"), p(&out), &["--resume"]);
    assert_eq!(
        n["data_bytes"].as_u64(),
        Some(0),
        "nothing differs now: {n}"
    );
    assert_eq!(n["same_bytes"].as_u64(), Some(size), "{n}");

    // The volume changes (8 MiB rewritten, 4 MiB made zeros): a resume into the
    // complete image rewrites those clusters in place and frees the zeroed ones.
    let f = std::fs::File::options().write(true).open(&src).unwrap();
    let mut r = blake3::Hasher::new().update(&[9]).finalize_xof();
    let mut fresh = vec![0u8; (8 * MIB) as usize];
    r.fill(&mut fresh);
    f.write_all_at(&fresh, 16 * MIB).unwrap();
    f.write_all_at(&vec![0u8; (4 * MIB) as usize], 64 * MIB)
        .unwrap();
    s.cp_ok(p(&src), &s.url("big"));
    let used = std::fs::metadata(&out).unwrap().blocks() * 512;
    let n = cp_json(&s, &s.url("big"), p(&out), &["--resume"]);
    assert_eq!(n["data_bytes"].as_u64(), Some(8 * MIB), "{n}");
    assert_eq!(n["same_bytes"].as_u64(), Some(size - 12 * MIB), "{n}");
    let check = checked(&out, false);
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&out)]);
    let now = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        now <= used - 3 * MIB,
        "the zeroed clusters still take space: {used} -> {now} bytes"
    );
}

#[test]
fn a_resume_into_an_image_qemu_img_made_copies_only_the_differing_pieces() {
    require("qemu-img");
    let s = setup();
    let size = 64 * MIB;
    s.store.create_volume("vm", "64M");
    let src = s.root.join("src.raw");
    random_file(&src, size, 11);
    s.cp_ok(p(&src), &s.url("vm"));

    // qemu-img's image of a copy of which only the first half got through.
    let half = s.root.join("half.raw");
    std::fs::copy(&src, &half).unwrap();
    let f = std::fs::File::options().write(true).open(&half).unwrap();
    f.set_len(size / 2).unwrap();
    f.set_len(size).unwrap();
    let img = s.root.join("qemu.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&half), p(&img)]);
    let n = cp_json(&s, &s.url("vm"), p(&img), &["--resume"]);
    assert_eq!(n["same_bytes"].as_u64(), Some(size / 2), "{n}");
    assert_eq!(n["data_bytes"].as_u64(), Some(size / 2), "{n}");
    let check = checked(&img, false);
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&img)]);

    // An empty image qemu-img created gets everything.
    let empty = s.root.join("empty.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&empty), "64M"]);
    let n = cp_json(&s, &s.url("vm"), p(&empty), &["--resume"]);
    assert_eq!(n["same_bytes"].as_u64(), Some(0), "{n}");
    assert_eq!(n["data_bytes"].as_u64(), Some(size), "{n}");
    let check = checked(&empty, false);
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&empty)]);
}

/// A resumed copy of `size` bytes (its JSON summary `n`) into a file the killed copy had
/// written `written` bytes of: it sent about what was left and skipped the rest, give or
/// take `slack`.
fn sent_about_what_was_left(n: &serde_json::Value, size: u64, written: u64, slack: u64) {
    let (data, same) = (
        n["data_bytes"].as_u64().unwrap(),
        n["same_bytes"].as_u64().unwrap(),
    );
    assert_eq!(data + same, size, "{n}");
    assert!(
        data <= size - written + slack,
        "{n}, {written} written before"
    );
    assert!(
        same >= written.saturating_sub(slack),
        "{n}, {written} written before"
    );
}
