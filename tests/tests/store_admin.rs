//! Volume administration through the `tessera-store` CLI and admin socket, checked with
//! independent NBD clients.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

use tessera_tests::{output, require, run, StoreProcess};

fn store() -> (tempfile::TempDir, StoreProcess) {
    let dir = tempfile::tempdir().unwrap();
    let p = StoreProcess::start(&dir.path().join("store"));
    (dir, p)
}

fn json(p: &StoreProcess, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&p.cli_ok(&all)).unwrap()
}

#[test]
fn volumes_are_created_listed_grown_and_deleted() {
    require("qemu-img");
    let (_d, mut p) = store();
    let v = json(&p, &["volume", "create", "vm-100-disk-0", "--size", "10G"]);
    assert_eq!(v["size"], 10u64 << 30);
    assert_eq!(v["allocated"], 0, "a new volume must be thin");
    p.create_volume("small", "1M");
    let ls = json(&p, &["volume", "ls"]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["small", "vm-100-disk-0"]);
    let table = p.cli_ok(&["volume", "ls"]);
    assert!(
        table.contains("vm-100-disk-0") && table.contains("10.0 GiB"),
        "{table}"
    );

    let grown = json(&p, &["volume", "resize", "small", "--size", "2M"]);
    assert_eq!(grown["size"], 2 << 20);
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(p.uri("small")));
    assert!(info.contains("\"virtual-size\": 2097152"), "{info}");
    let shrink = p.cli(&["volume", "resize", "small", "--size", "1M"]);
    assert!(!shrink.status.success());
    assert!(String::from_utf8_lossy(&shrink.stderr).contains("only grow"));

    p.cli_ok(&["volume", "rm", "small"]);
    let gone = p.cli(&["volume", "info", "small"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));

    // State survives a restart.
    let data = p.data_dir.clone();
    p.stop();
    let p = StoreProcess::start(&data);
    let ls = json(&p, &["volume", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
}

#[test]
fn bad_names_and_sizes_are_refused_with_the_field_named() {
    let (_d, p) = store();
    for (args, needle) in [
        (vec!["volume", "create", "bad/name", "--size", "1G"], "name"),
        (vec!["volume", "create", "ok", "--size", "1000"], "size"),
        (
            vec!["volume", "create", "ok", "--size", "lots"],
            "not a size",
        ),
        (vec!["snapshot", "create", "missing", "s"], "not found"),
    ] {
        let out = p.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let ls = json(&p, &["volume", "ls"]);
    assert!(
        ls.as_array().unwrap().is_empty(),
        "a refused request left something behind"
    );
}

#[test]
fn snapshots_are_read_only_point_in_time_and_clones_are_writable() {
    require("qemu-io");
    let (_d, p) = store();
    p.create_volume("base", "8M");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 4M"])
        .arg(p.uri("base")));
    let s = json(&p, &["snapshot", "create", "base", "golden"]);
    assert_eq!(s["export"], "base@golden");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 0 1M"])
        .arg(p.uri("base")));

    // The snapshot still shows the old data; writes to it are refused.
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x11 0 4M"])
        .arg(p.uri("base@golden")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let w = output(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x33 0 4k"])
            .arg(p.uri("base@golden")),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        text.contains("ermission denied")
            || text.contains("read-only")
            || text.contains("read only"),
        "{text}"
    );

    // A clone starts identical to the snapshot, costs no space, and diverges on write.
    let c = json(&p, &["clone", "base", "golden", "vm-101"]);
    assert_eq!(c["origin"], "base@golden");
    assert_eq!(c["allocated"], 0);
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(p.uri("base@golden"))
        .arg(p.uri("vm-101")));
    assert!(cmp.contains("identical"), "{cmp}");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x44 1M 1M"])
        .arg(p.uri("vm-101")));
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x44 1M 1M",
            "-c",
            "read -P 0x11 2M 2M",
        ])
        .arg(p.uri("vm-101")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x11 1M 1M"])
        .arg(p.uri("base@golden")));
    assert!(
        !out.contains("Pattern verification failed"),
        "clone write leaked into the snapshot: {out}"
    );

    // Deleting the snapshot keeps the clone's data intact.
    p.cli_ok(&["snapshot", "rm", "base", "golden"]);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x11 0 1M"])
        .arg(p.uri("vm-101")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn a_volume_in_use_is_not_deleted() {
    let (_d, p) = store();
    p.create_volume("busy", "1M");
    let c = tessera_nbd::Client::connect_unix(&p.nbd_sock, "busy").unwrap();
    let out = p.cli(&["volume", "rm", "busy"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("busy"));
    c.disconnect().unwrap();
    // The server releases the export when the client leaves; poll briefly for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !p.cli(&["volume", "rm", "busy"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "volume stayed busy after disconnect"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn malformed_admin_requests_get_errors_and_the_connection_survives() {
    let (_d, p) = store();
    let s = UnixStream::connect(&p.admin_sock).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |line: &str| -> serde_json::Value {
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    let v = ask("this is not json");
    assert_eq!(v["error"]["kind"], "bad_request");
    let v = ask(r#"{"v":1,"op":{"type":"create_volume","name":"x","size":"big"}}"#);
    assert_eq!(v["error"]["kind"], "bad_request");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid type"));
    // Fields by position (a JSON array) are not the protocol: refused, nothing created.
    let v = ask(r#"[1,{"type":"create_volume","name":"arr","size":4096}]"#);
    assert_eq!(v["error"]["kind"], "bad_request");
    let v = ask(r#"{"v":1,"op":["create_volume","arr",4096]}"#);
    assert_eq!(v["error"]["kind"], "bad_request");
    let v = ask(r#"{"v":1,"op":{"type":"volume_info","name":"arr"}}"#);
    assert_eq!(v["error"]["kind"], "not_found", "{v}");
    let v = ask(r#"{"v":9,"op":{"type":"list_volumes"}}"#);
    assert_eq!(v["error"]["kind"], "unsupported_version");
    let v = ask(r#"{"v":1,"op":{"type":"create_volume","name":"x","size":4096}}"#);
    assert_eq!(v["ok"]["kind"], "volume");
    let v = ask(r#"{"v":1,"op":{"type":"create_volume","name":"x","size":4096}}"#);
    assert_eq!(v["error"]["kind"], "already_exists");
    // A line longer than the cap is refused, skipped, and the connection goes on.
    let v = ask(&"x".repeat(1_000_000));
    assert_eq!(v["error"]["kind"], "bad_request");
    let v = ask(r#"{"v":1,"op":{"type":"list_volumes"}}"#);
    assert_eq!(v["ok"]["kind"], "volumes");
}

#[test]
fn bit_rot_fails_reads_of_that_block_and_scrub_reports_it() {
    require("qemu-io");
    let (_d, mut p) = store();
    p.create_volume("rot", "4M");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 0 1M"])
        .arg(p.uri("rot")));
    let data = p.data_dir.clone();
    p.stop(); // clean stop: the WAL is checkpointed into the layer files

    // Flip one bit in the block at 64 KiB, behind the store's back.
    let file = std::fs::read_dir(data.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| {
            f.extension().is_some_and(|x| x == "data") && std::fs::metadata(f).unwrap().len() > 0
        })
        .expect("a data file");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[65536 + 100] ^= 0x04;
    std::fs::write(&file, bytes).unwrap();

    let p = StoreProcess::start(&data);
    let bad = output(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x77 64k 4k"])
            .arg(p.uri("rot")),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(
        text.contains("Input/output error"),
        "a corrupt block was returned: {text}"
    );
    let good = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x77 0 64k",
            "-c",
            "read -P 0x77 68k 956k",
        ])
        .arg(p.uri("rot")));
    assert!(!good.contains("Pattern verification failed"), "{good}");

    let scrub = p.cli(&["--output", "json", "scrub"]);
    assert!(
        !scrub.status.success(),
        "scrub must fail when it finds damage"
    );
    let report: serde_json::Value = serde_json::from_slice(&scrub.stdout).unwrap();
    let bad = report["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(bad[0]["offset"], 65536);
    assert_eq!(bad[0]["affects"][0], "rot");
}
