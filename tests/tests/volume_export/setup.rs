//! One `tessera-store` with the QUIC export and a user's credentials, and `tessera
//! volume cp` run against it: shared by volume_export.rs and volume_cp_qcow2.rs.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tessera_pki::{node_key_and_request, ClusterCa};
use tessera_tests::{bin, free_port, output, StoreProcess};
use tessera_volume_client::{Credentials, Volume};

pub const MIB: u64 = 1 << 20;

/// A store serving NBD (plain, loopback) and the QUIC export, with a node certificate
/// for 127.0.0.1, and a user's client credentials written as `export-creds` writes them.
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub store: StoreProcess,
    pub quic: SocketAddr,
    pub creds: PathBuf,
    pub root: PathBuf,
}

pub fn write_user_creds(dir: &Path, ca: &ClusterCa, user: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = ca.issue_client(user).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("client-cert.pem"), cert).unwrap();
    std::fs::write(dir.join("client-key.pem"), key).unwrap();
}

pub fn setup() -> Setup {
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
    pub fn url(&self, export: &str) -> String {
        format!("quic://{}/{export}", self.quic)
    }

    /// `tessera volume cp SRC DST --creds DIR`.
    pub fn cp(&self, src: &str, dst: &str) -> Output {
        self.cp_with(src, dst, &self.creds)
    }

    /// `tessera volume cp SRC DST --creds DIR` and more arguments.
    pub fn cp_args(&self, src: &str, dst: &str, more: &[&str]) -> Output {
        output(
            Command::new(bin("tessera"))
                .args(["volume", "cp", src, dst, "--creds"])
                .arg(&self.creds)
                .args(more),
        )
    }

    pub fn cp_with(&self, src: &str, dst: &str, creds: &Path) -> Output {
        output(
            Command::new(bin("tessera"))
                .args(["volume", "cp", src, dst, "--creds"])
                .arg(creds),
        )
    }

    pub fn cp_ok(&self, src: &str, dst: &str) -> String {
        self.cp_ok_with(src, dst, &[])
    }

    /// [`Setup::cp_ok`] with more arguments; its standard output.
    pub fn cp_ok_with(&self, src: &str, dst: &str, more: &[&str]) -> String {
        let out = self.cp_args(src, dst, more);
        assert!(
            out.status.success(),
            "tessera volume cp {src} {dst} {more:?} failed: {}\nstore log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.store.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cp_refused(&self, src: &str, dst: &str, words: &str) {
        let out = self.cp(src, dst);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "cp {src} {dst} succeeded");
        assert!(
            err.contains(words),
            "cp {src} {dst}: {err:?} lacks {words:?}"
        );
    }

    pub fn volume(&self, export: &str) -> (tokio::runtime::Runtime, Volume) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let creds = Credentials::from_dir(&self.creds).unwrap();
        let v = rt
            .block_on(Volume::open(self.quic, "127.0.0.1", &creds, export))
            .unwrap();
        (rt, v)
    }

    /// Waits (20 s at most) for `words` in the store's log.
    pub fn wait_log(&self, words: &str) {
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

    pub fn admin(&self, line: &str) -> String {
        let mut s = UnixStream::connect(&self.store.admin_sock).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        reply
    }
}

/// A file of `size` with data in some ranges and zeros (holes) elsewhere.
pub fn sparse_source(path: &Path, size: u64, seed: u8) {
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
