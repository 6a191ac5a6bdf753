//! The QUIC volume export (issue #8) and `tessera volume cp` on it: a real
//! `tessera-store` with `--export-quic`, a user's client certificate of its CA, the
//! `tessera` binary copying, and clients we did not write (qemu-img, nbdinfo) reading the
//! same volume back over NBD. Bad input: a certificate of another cluster, an unknown
//! volume, oversize and malformed frames, a source larger than the volume, writes to a
//! snapshot and to a replica's copy; each refused clearly, nothing written, the export
//! still serving afterwards. qcow2 ends and `--resume`: volume_cp_qcow2.rs.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use tessera_pki::ClusterCa;
use tessera_tests::{file_hash, output, require};
use tessera_volume_client::proto::{self, ErrorCode, Kind, Request, MAX_DATA};

#[path = "volume_export/setup.rs"]
#[allow(dead_code)] // each test binary uses part of it
mod setup;
use setup::*;

#[test]
fn a_file_copied_into_a_volume_and_back_is_identical_and_nbd_clients_agree() {
    require("qemu-img");
    require("nbdinfo");
    let s = setup();
    s.store.create_volume("disk", "48M");
    let (a, b, back) = (
        s.root.join("a.raw"),
        s.root.join("b.raw"),
        s.root.join("back.raw"),
    );
    // A first copy fills the volume with other data, so the second must overwrite and
    // zero it, not only fill holes.
    std::fs::write(&b, vec![0x5a; (48 * MIB) as usize]).unwrap();
    s.cp_ok(b.to_str().unwrap(), &s.url("disk"));
    sparse_source(&a, 48 * MIB, 1);
    let said = s.cp_ok(a.to_str().unwrap(), &s.url("disk"));
    assert!(said.contains("skipped as zeros"), "{said}");
    let said = s.cp_ok(&s.url("disk"), back.to_str().unwrap());
    assert!(
        said.contains("48.0 MiB") || said.contains("48 MiB"),
        "{said}"
    );
    assert_eq!(file_hash(&a), file_hash(&back), "volume read back differs");
    // The copy back skipped what the volume holds as holes: the file stays sparse.
    let allocated = std::fs::metadata(&back).unwrap().blocks() * 512;
    assert!(
        allocated < 8 * MIB,
        "{allocated} bytes allocated in the copy"
    );
    // Clients we did not write read the same volume through NBD.
    let out = output(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        a.to_str().unwrap(),
        &s.store.uri("disk"),
    ]));
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let size = output(Command::new("nbdinfo").args(["--size", &s.store.uri("disk")]));
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (48 * MIB).to_string()
    );
    // A snapshot copies too, and a volume to a volume.
    s.store.cli_ok(&["snapshot", "create", "disk", "s1"]);
    s.store.create_volume("copy", "64M");
    s.cp_ok(&s.url("disk@s1"), &s.url("copy"));
    let again = s.root.join("again.raw");
    s.cp_ok(&s.url("disk@s1"), again.to_str().unwrap());
    assert_eq!(file_hash(&a), file_hash(&again));
    let (rt, v) = s.volume("copy");
    let head = rt.block_on(v.read(0, (48 * MIB) as usize)).unwrap();
    assert_eq!(
        blake3::hash(&head),
        file_hash(&a),
        "the volume-to-volume copy differs"
    );
}

#[test]
fn the_client_library_reads_writes_flushes_trims_and_reports_holes() {
    let s = setup();
    s.store.create_volume("lib", "16M");
    let (rt, v) = s.volume("lib");
    assert_eq!((v.size(), v.read_only()), (16 * MIB, false));
    let data = vec![7u8; 10 * MIB as usize];
    rt.block_on(v.write(MIB, &data, true)).unwrap();
    rt.block_on(v.flush()).unwrap();
    assert_eq!(rt.block_on(v.read(MIB, data.len())).unwrap(), data);
    rt.block_on(v.trim(2 * MIB, MIB, false)).unwrap();
    assert_eq!(
        rt.block_on(v.read(2 * MIB, MIB as usize)).unwrap(),
        vec![0u8; MIB as usize]
    );
    let ex = rt.block_on(v.block_status(0, 16 * MIB)).unwrap();
    let runs: Vec<(u64, bool)> = ex.iter().map(|e| (e.length, e.is_zero())).collect();
    assert_eq!(
        runs,
        vec![
            (MIB, true),
            (MIB, false),
            (MIB, true),
            (8 * MIB, false),
            (5 * MIB, true)
        ]
    );
}

#[test]
fn bad_input_is_refused_clearly_and_nothing_is_written() {
    let s = setup();
    s.store.create_volume("v", "8M");
    let src = s.root.join("src.raw");
    sparse_source(&src, 8 * MIB, 2);
    s.cp_ok(src.to_str().unwrap(), &s.url("v"));
    let before = s.root.join("before.raw");
    s.cp_ok(&s.url("v"), before.to_str().unwrap());

    // A client certificate of another cluster: the handshake fails, nothing is served.
    let foreign = s.root.join("foreign");
    write_user_creds(&foreign, &ClusterCa::mint("other").unwrap(), "mallory");
    let out = s.cp_with(
        &s.url("v"),
        s.root.join("x.raw").to_str().unwrap(),
        &foreign,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("opening v at"),
        "{err}"
    );
    s.wait_log("volume export: handshake refused");
    // Unknown volume, source larger than the volume, qcow2, a snapshot as destination.
    s.cp_refused(
        &s.url("nope"),
        s.root.join("y.raw").to_str().unwrap(),
        "no volume or snapshot named \"nope\"",
    );
    let big = s.root.join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(9 * MIB)
        .unwrap();
    s.cp_refused(big.to_str().unwrap(), &s.url("v"), "nothing copied");
    s.store.cli_ok(&["snapshot", "create", "v", "snap"]);
    s.cp_refused(
        src.to_str().unwrap(),
        &s.url("v@snap"),
        "snapshots are read-only",
    );

    // Frames this client never sends, on one connection that keeps working after each.
    let (rt, v) = s.volume("v");
    let raw = |kind: Kind, offset: u64, length: u64, payload: &[u8]| {
        let r = Request {
            kind,
            fua: false,
            forwarded: false,
            offset,
            length,
        };
        rt.block_on(v.call_raw(proto::encode_request(&r), payload, MAX_DATA))
    };
    let code = |r: Result<Vec<u8>, tessera_volume_client::ClientError>| r.unwrap_err().code();
    let oversize = vec![1u8; (MAX_DATA + 1) as usize];
    assert_eq!(
        code(raw(Kind::Write, 0, MAX_DATA + 1, &oversize)),
        Some(ErrorCode::TooLarge)
    );
    assert_eq!(
        code(raw(Kind::Read, 0, MAX_DATA + 1, &[])),
        Some(ErrorCode::TooLarge)
    );
    assert_eq!(
        code(raw(Kind::Write, 8 * MIB - 512, 4096, &[1; 4096])),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        code(raw(Kind::Trim, u64::MAX - 1, 4096, &[])),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(code(raw(Kind::Open, 0, 1, b"v")), Some(ErrorCode::Invalid));
    let mut version = proto::encode_request(&Request {
        kind: Kind::Write,
        fua: false,
        forwarded: false,
        offset: 0,
        length: 4096,
    });
    version[5] = 9;
    let e = rt.block_on(v.call_raw(version, &[1; 4096], 0)).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotSupported), "{e}");
    assert!(e.to_string().contains("version 9"), "{e}");
    drop((v, rt));
    let after = s.root.join("after.raw");
    s.cp_ok(&s.url("v"), after.to_str().unwrap());
    assert_eq!(
        file_hash(&before),
        file_hash(&after),
        "a refused request wrote something"
    );

    // A replica's copy is written only by its primary (in a cluster: a volume a running
    // VM uses is written only from the VM's node): the same refusal as over NBD.
    s.store.create_volume("r", "8M");
    let reply = s.admin(r#"{"v":1,"op":{"type":"set_replication","volume":"r","generation":2,"role":{"type":"replica","catching_up":false}}}"#);
    assert!(!reply.contains("\"error\""), "set_replication: {reply}");
    s.cp_refused(
        src.to_str().unwrap(),
        &s.url("r"),
        "is a replica on this store: only its primary writes it",
    );
    let zero = s.root.join("r.raw");
    s.cp_ok(&s.url("r"), zero.to_str().unwrap());
    assert_eq!(
        file_hash(&zero),
        blake3::hash(&vec![0u8; (8 * MIB) as usize])
    );
    assert!(s
        .store
        .log_text()
        .contains("volume export: request refused"));
}
