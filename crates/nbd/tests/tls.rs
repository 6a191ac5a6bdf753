//! NBD over TCP with TLS required, checked with clients we did not write (libnbd's
//! `nbdinfo` and `nbdcopy`, and `qemu-img`, all with x509 credentials in a directory): without credentials a client is refused and learns nothing, not even the export
//! names; with a client certificate of another CA the handshake fails; with one of ours
//! the export is served, read and written.
// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use tessera_nbd::proto::Errno;
use tessera_nbd::{
    serve_tcp, Device, DeviceError, ExportEntry, Exports, Extent, ServerConfig, TlsRequired,
};
use tessera_pki::{node_key_and_request, ClusterCa, NodeCredentials};

// The workspace's one skip policy and allow-list (tests/skip-allowlist): a missing tool is
// a failure in CI, not a silent pass.
#[path = "../../../tests/src/skip_policy.rs"]
mod skip_policy;

const SIZE: usize = 4 << 20;

/// A 4 MiB disk in memory.
struct Mem(Mutex<Vec<u8>>);

impl Mem {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, DeviceError> {
        let start = offset as usize;
        match start.checked_add(len) {
            Some(end) if end <= SIZE => Ok(start..end),
            _ => Err(DeviceError::new(Errno::Inval, "out of range")),
        }
    }
}

impl Device for Mem {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _: bool) -> Result<(), DeviceError> {
        let r = self.range(offset, data.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _: bool) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len, false, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool, _: bool) -> Result<(), DeviceError> {
        let r = self.range(offset, len as usize)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn extents(&self, _: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
}

struct One(Arc<Mem>);

impl Exports for One {
    type Device = Mem;
    fn list(&self) -> Vec<ExportEntry> {
        vec![ExportEntry {
            name: "disk".into(),
            description: String::new(),
        }]
    }
    fn open(&self, name: &str) -> Result<Option<Arc<Mem>>, DeviceError> {
        Ok((name == "disk").then(|| self.0.clone()))
    }
}

/// A server requiring TLS with client certificates of `ca`, on a loopback port.
struct Server {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

fn serve(ca: &ClusterCa) -> Server {
    let (key_pem, csr) = node_key_and_request("node1").unwrap();
    let cert_pem = ca
        .issue_with_ips(&csr, "node1", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let tls =
        tessera_pki::server_config(&NodeCredentials { key_pem, cert_pem }, &ca.cert_pem).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = ServerConfig {
        tls: Some(TlsRequired::new(Arc::new(tls))),
        ..ServerConfig::default()
    };
    let exports = Arc::new(One(Arc::new(Mem(Mutex::new(vec![0; SIZE])))));
    rt.spawn(serve_tcp(listener, exports, cfg));
    Server { addr, _rt: rt }
}

/// Writes libnbd's x509 credentials directory: trusting `trust` (the server's CA), with
/// a client certificate issued by `issuer`.
fn credentials(dir: &Path, trust: &ClusterCa, issuer: &ClusterCa) {
    let (key, csr) = node_key_and_request("operator").unwrap();
    let cert = issuer.issue(&csr, "operator").unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &trust.cert_pem).unwrap();
    std::fs::write(dir.join("client-cert.pem"), cert).unwrap();
    std::fs::write(dir.join("client-key.pem"), key).unwrap();
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    eprintln!(
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tools_or_skip(test: &str) -> bool {
    for tool in ["nbdinfo", "nbdcopy", "qemu-img"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        if !found {
            skip_policy::report(
                test,
                &format!("{tool} is not installed (tests/setup installs it)"),
            );
            return false;
        }
    }
    true
}

#[test]
fn a_client_without_tls_is_refused_and_learns_no_export_names() {
    if !tools_or_skip("a_client_without_tls_is_refused_and_learns_no_export_names") {
        return;
    }
    let ca = ClusterCa::mint("tls-test").unwrap();
    let s = serve(&ca);
    let out = run(Command::new("nbdinfo").arg(format!("nbd://{}/disk", s.addr)));
    assert!(!out.status.success(), "a plain client was served");
    let out = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{}", s.addr)));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("disk"),
        "a plain client listed the exports"
    );
}

#[test]
fn a_client_certificate_of_another_ca_is_refused() {
    if !tools_or_skip("a_client_certificate_of_another_ca_is_refused") {
        return;
    }
    let ca = ClusterCa::mint("tls-test").unwrap();
    let other = ClusterCa::mint("someone-else").unwrap();
    let s = serve(&ca);
    let dir = tempfile::tempdir().unwrap();
    // The client trusts our server, but its own certificate is another cluster's.
    credentials(dir.path(), &ca, &other);
    let out = run(Command::new("nbdinfo").arg(format!(
        "nbds://{}/disk?tls-certificates={}",
        s.addr,
        dir.path().display()
    )));
    assert!(
        !out.status.success(),
        "a client certificate of another CA was accepted"
    );
    // Without any client certificate at all (only the CA to check the server with).
    std::fs::remove_file(dir.path().join("client-cert.pem")).unwrap();
    std::fs::remove_file(dir.path().join("client-key.pem")).unwrap();
    let out = run(Command::new("nbdinfo").arg(format!(
        "nbds://{}/disk?tls-certificates={}",
        s.addr,
        dir.path().display()
    )));
    assert!(
        !out.status.success(),
        "a client without a certificate was served"
    );
}

#[test]
fn a_client_with_our_certificate_is_served_reads_and_writes() {
    if !tools_or_skip("a_client_with_our_certificate_is_served_reads_and_writes") {
        return;
    }
    let ca = ClusterCa::mint("tls-test").unwrap();
    let s = serve(&ca);
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    credentials(&creds, &ca, &ca);
    let uri = format!(
        "nbds://{}/disk?tls-certificates={}",
        s.addr,
        creds.display()
    );
    let out = run(Command::new("nbdinfo").arg("--json").arg(&uri));
    assert!(out.status.success(), "the right certificate was refused");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("\"export-size\": {SIZE}")),
        "nbdinfo did not report the export's size"
    );
    // qemu's NBD client with the same credentials.
    let out = run(Command::new("qemu-img")
        .arg("info")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host={},port={},export=disk,tls-creds=tls0",
            s.addr.ip(),
            s.addr.port()
        )));
    assert!(out.status.success(), "qemu-img was refused");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("({SIZE} bytes)")),
        "qemu-img did not report the export's size"
    );
    // Data in and out through TLS.
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    let input = dir.path().join("in.img");
    let output = dir.path().join("out.img");
    std::fs::write(&input, &data).unwrap();
    assert!(run(Command::new("nbdcopy").arg(&input).arg(&uri))
        .status
        .success());
    assert!(run(Command::new("nbdcopy").arg(&uri).arg(&output))
        .status
        .success());
    assert!(
        std::fs::read(&output).unwrap() == data,
        "what nbdcopy read back over TLS differs from what it wrote"
    );
}
