//! The QUIC volume export (issue #8) and `tessera volume cp` on it: a real
//! `tessera-store` with `--export-quic`, a user's client certificate of its CA, the
//! `tessera` binary copying, and clients we did not write (qemu-img, nbdinfo) reading the
//! same volume back over NBD. Bad input: a certificate of another cluster, an unknown
//! volume, oversize and malformed frames, a source larger than the volume, a qcow2
//! image, writes to a snapshot and to a replica's copy; each refused clearly, nothing
//! written, the export still serving afterwards.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tessera_pki::{node_key_and_request, ClusterCa};
use tessera_tests::{bin, file_hash, free_port, output, require, StoreProcess};
use tessera_volume_client::proto::{self, ErrorCode, Kind, Request, MAX_DATA};
use tessera_volume_client::{Credentials, Volume};

const MIB: u64 = 1 << 20;

/// A store serving NBD (plain, loopback) and the QUIC export, with a node certificate
/// for 127.0.0.1, and a user's client credentials written as `export-creds` writes them.
struct Setup {
    _dir: tempfile::TempDir,
    store: StoreProcess,
    quic: SocketAddr,
    creds: PathBuf,
    root: PathBuf,
}

fn write_user_creds(dir: &Path, ca: &ClusterCa, user: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = ca.issue_client(user).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("client-cert.pem"), cert).unwrap();
    std::fs::write(dir.join("client-key.pem"), key).unwrap();
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let ca = ClusterCa::mint("export-test").unwrap();
    let tls = root.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (key, csr) = node_key_and_request("node1").unwrap();
    let cert = ca
        .issue_with_ips(&csr, "node1", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    std::fs::write(tls.join("ca.crt"), &ca.cert_pem).unwrap();
    std::fs::write(tls.join("node.crt"), cert).unwrap();
    std::fs::write(tls.join("node.key"), key).unwrap();
    let creds = root.join("creds");
    write_user_creds(&creds, &ca, "alice");
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let quic: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let store = StoreProcess::start_with(
        &root.join("store"),
        free_port(),
        &[
            "--nbd-tls-dir",
            tls.to_str().unwrap(),
            "--export-quic",
            &quic.to_string(),
        ],
    );
    // The export takes connections once it installed the credentials (polled at start).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.log_text().lines().any(|l| {
        l.contains("serving with this node's certificate") && l.contains("tessera-export/1")
    }) {
        assert!(
            Instant::now() < deadline,
            "the export never served; log:\n{}",
            store.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Setup {
        _dir: dir,
        store,
        quic,
        creds,
        root,
    }
}

impl Setup {
    fn url(&self, export: &str) -> String {
        format!("quic://{}/{export}", self.quic)
    }

    /// `tessera volume cp SRC DST --creds DIR`.
    fn cp(&self, src: &str, dst: &str) -> Output {
        self.cp_with(src, dst, &self.creds)
    }

    fn cp_with(&self, src: &str, dst: &str, creds: &Path) -> Output {
        output(
            Command::new(bin("tessera"))
                .args(["volume", "cp", src, dst, "--creds"])
                .arg(creds),
        )
    }

    fn cp_ok(&self, src: &str, dst: &str) -> String {
        let out = self.cp(src, dst);
        assert!(
            out.status.success(),
            "tessera volume cp {src} {dst} failed: {}\nstore log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.store.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cp_refused(&self, src: &str, dst: &str, words: &str) {
        let out = self.cp(src, dst);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "cp {src} {dst} succeeded");
        assert!(
            err.contains(words),
            "cp {src} {dst}: {err:?} lacks {words:?}"
        );
    }

    fn volume(&self, export: &str) -> (tokio::runtime::Runtime, Volume) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let creds = Credentials::from_dir(&self.creds).unwrap();
        let v = rt
            .block_on(Volume::open(self.quic, "127.0.0.1", &creds, export))
            .unwrap();
        (rt, v)
    }

    /// Waits (20 s at most) for `words` in the store's log.
    fn wait_log(&self, words: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.store.log_text().contains(words) {
            assert!(
                Instant::now() < deadline,
                "{words:?} never logged; log:\n{}",
                self.store.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn admin(&self, line: &str) -> String {
        let mut s = UnixStream::connect(&self.store.admin_sock).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        reply
    }
}

/// A file of `size` with data in some ranges and zeros (holes) elsewhere.
fn sparse_source(path: &Path, size: u64, seed: u8) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let pattern = |len: u64, salt: u64| -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let mut h = blake3::Hasher::new();
        h.update(&[seed]);
        h.update(&salt.to_le_bytes());
        let mut r = h.finalize_xof();
        out.resize(len as usize, 0);
        r.fill(&mut out);
        out
    };
    for (at, len) in [
        (0, 3 * MIB + 4096),
        (9 * MIB + 512, 8192),
        (20 * MIB, MIB),
        (size - MIB, MIB),
    ]
    .into_iter()
    .filter(|(at, len)| at + len <= size)
    {
        f.write_all_at(&pattern(len, at), at).unwrap();
    }
}

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
    let qcow = s.root.join("img.qcow2");
    let made = output(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        qcow.to_str().unwrap(),
        "8M",
    ]));
    if made.status.success() {
        s.cp_refused(
            qcow.to_str().unwrap(),
            &s.url("v"),
            "qcow2 image: not supported yet",
        );
    }
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
