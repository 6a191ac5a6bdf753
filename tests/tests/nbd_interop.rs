//! Real NBD clients we did not write (libnbd's nbdinfo/nbdcopy, QEMU's qemu-img/qemu-io,
//! fio) against a real `tessera-store` process.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::Command;

use tessera_tests::{file_hash, require, run, StoreProcess};

fn store() -> (tempfile::TempDir, StoreProcess) {
    let dir = tempfile::tempdir().unwrap();
    let p = StoreProcess::start(&dir.path().join("store"));
    (dir, p)
}

#[test]
fn nbdinfo_lists_exports_and_shows_size_flags_and_extents() {
    require("nbdinfo");
    let (_d, s) = store();
    s.create_volume("vol1", "64M");
    s.cli_ok(&["snapshot", "create", "vol1", "before"]);
    // Write 1 MiB at 4 MiB so the map has data between holes.
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), vec![0x5a; 1 << 20]).unwrap();
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 4M 1M"])
        .arg(s.uri("vol1")));

    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://127.0.0.1:{}", s.port)));
    assert!(list.contains("export=\"vol1\""), "{list}");
    assert!(list.contains("export=\"vol1@before\""), "{list}");

    let json = run(Command::new("nbdinfo").arg("--json").arg(s.uri("vol1")));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 64 << 20);
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_fast_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} in {json}");
    }
    assert_eq!(e["block_size_preferred"], 4096);
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{json}"
    );

    let snap = run(Command::new("nbdinfo")
        .arg("--json")
        .arg(s.uri("vol1@before")));
    let v: serde_json::Value = serde_json::from_str(&snap).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);

    let map = run(Command::new("nbdinfo")
        .arg("--map")
        .arg("--json")
        .arg(s.uri("vol1")));
    let extents: serde_json::Value = serde_json::from_str(&map).unwrap();
    let runs: Vec<(u64, u64, u64)> = extents
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["offset"].as_u64().unwrap(),
                x["length"].as_u64().unwrap(),
                x["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (0, 4 << 20, 3),
            (4 << 20, 1 << 20, 0),
            (5 << 20, 59 << 20, 3)
        ],
        "{map}"
    );
}

#[test]
fn qemu_img_converts_a_qcow2_in_and_compares_identical() {
    require("qemu-img");
    let (d, s) = store();
    s.create_volume("disk", "64M");
    // A qcow2 with data in a few places and holes elsewhere.
    let qcow = d.path().join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&qcow)
        .arg("64M"));
    for (pat, off, len) in [
        ("0x11", "0", "1M"),
        ("0x22", "10M", "3M"),
        ("0x33", "63M", "512k"),
    ] {
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P {pat} {off} {len}")])
            .arg(&qcow));
    }
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow)
        .arg(s.uri("disk")));
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qcow)
        .arg(s.uri("disk")));
    assert!(out.contains("Images are identical"), "{out}");
    // And qemu-img info reads it as a raw disk of the right size.
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(s.uri("disk")));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 64 << 20);
}

#[test]
fn nbdcopy_round_trips_one_gib_of_random_data() {
    require("nbdcopy");
    let (d, s) = store();
    s.create_volume("big", "1G");
    let src = d.path().join("random.bin");
    {
        use rand::RngCore;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut rng = rand::thread_rng();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).unwrap();
        }
    }
    run(Command::new("nbdcopy").arg(&src).arg(s.uri("big")));
    let back = d.path().join("back.bin");
    // Read back over the Unix socket: both transports carry the same data.
    run(Command::new("nbdcopy").arg(s.unix_uri("big")).arg(&back));
    assert_eq!(
        file_hash(&src),
        file_hash(&back),
        "data changed on the way through the store"
    );
}

fn fio_verify(uri: &str, iodepth: u32, name: &str) {
    let out = run(Command::new("fio")
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(["--rw=randwrite", "--bs=4k", "--size=64M", "--io_size=32M"])
        .arg(format!("--iodepth={iodepth}"))
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would otherwise leave a verify state file in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
        "{out}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() > 0,
        "verify phase read nothing: {out}"
    );
}

#[test]
fn fio_random_writes_verify_at_qd1_and_qd32_over_tcp_and_unix() {
    require("fio");
    let (_d, s) = store();
    s.create_volume("fio", "64M");
    fio_verify(&s.uri("fio"), 1, "qd1-tcp");
    fio_verify(&s.uri("fio"), 32, "qd32-tcp");
    fio_verify(&s.unix_uri("fio"), 32, "qd32-unix");
}

#[test]
fn qemu_io_discard_and_write_zeroes_read_back_zeroes() {
    require("qemu-io");
    let (_d, s) = store();
    s.create_volume("z", "16M");
    let uri = s.uri("z");
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xcd 0 8M",
            "-c",
            "discard 1M 1M",
            "-c",
            "write -z 3M 512k",
            "-c",
            "write -z -u 5M 1M",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "read -P 0 3M 512k",
            "-c",
            "read -P 0 5M 1M",
            "-c",
            "read -P 0xcd 0 1M",
            "-c",
            "read -P 0xcd 2M 1M",
            "-c",
            "read -P 0xcd 7M 1M",
        ])
        .arg(&uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Unaligned discard and zeroing keep the bytes around them.
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -z 4097 1000",
            "-c",
            "read -P 0xcd 4096 1",
            "-c",
            "read -P 0 4097 1000",
            "-c",
            "read -P 0xcd 5097 3095",
        ])
        .arg(&uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The trimmed range is a hole again (thin provisioning gives the space back).
    let map = run(Command::new("nbdinfo").arg("--map").arg(&uri));
    assert!(
        map.lines()
            .any(
                |l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["1048576", "1048576"]
                    && l.contains("hole")
            ),
        "{map}"
    );
}

#[test]
fn many_clients_on_many_exports_at_once() {
    require("nbdcopy");
    require("fio");
    let (d, s) = store();
    for v in ["a", "b"] {
        s.create_volume(v, "64M");
    }
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x61 0 64M"])
        .arg(s.uri("a")));
    s.cli_ok(&["snapshot", "create", "a", "s"]);
    // Writers on b (TCP and Unix) while readers copy a and a@s out, all at once.
    let mut jobs = Vec::new();
    for (i, uri) in [s.uri("b"), s.unix_uri("b")].into_iter().enumerate() {
        jobs.push(
            Command::new("fio")
                .arg(format!("--name=w{i}"))
                .args([
                    "--ioengine=nbd",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=8",
                    "--size=32M",
                ])
                .arg(format!("--offset={}", i * (32 << 20)))
                .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"])
                .arg("--verify_state_save=0")
                .arg(format!("--uri={uri}"))
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let outs: Vec<_> = (0..4)
        .map(|i| {
            let export = if i % 2 == 0 { "a" } else { "a@s" };
            let path = d.path().join(format!("out{i}.raw"));
            let child = Command::new("nbdcopy")
                .arg(s.uri(export))
                .arg(&path)
                .spawn()
                .unwrap();
            (child, path)
        })
        .collect();
    for mut j in jobs {
        assert!(
            j.wait().unwrap().success(),
            "a concurrent fio verify failed"
        );
    }
    let expect = vec![0x61u8; 64 << 20];
    for (mut c, path) in outs {
        assert!(c.wait().unwrap().success());
        assert!(
            std::fs::read(&path).unwrap() == expect,
            "{} differs",
            path.display()
        );
    }
}
