//! tessera-vmm's NBD disk under a misbehaving server, with the test guest driving it: a
//! `tessera-store` killed and restarted while the guest writes (the guest's I/O pauses and
//! carries on, data intact), a server that never answers (the guest gets an I/O error
//! after the timeout and the VMM does not hang), and a TLS-only server (`qemu-nbd` with
//! x509 credentials made by `openssl` here) reached through an `nbds://` URI.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_nbd::proto::{self, Info, OptionHeader, OptionReplyHeader, OPTION_HEADER_LEN};
use tessera_tests::{bin, counts, free_port, require, run, wait_console, StoreProcess, VmApi};

const GUEST: &str = env!("TESSERA_TEST_GUEST");

fn vmm(disk: &str, mode: &str, dir: &Path, extra: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join("vmm.log")).unwrap();
    Command::new(bin("tessera-vmm"))
        .args(["--kernel", GUEST, "--memory-mib", "64", "--disk", disk])
        .arg("--cmdline")
        .arg(format!("console=ttyS0 {mode}"))
        .arg("--serial-out")
        .arg(dir.join("console.log"))
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits at most `secs` for the VMM to exit; kills it and fails otherwise.
fn exits_within(child: &mut Child, secs: u64, dir: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "tessera-vmm still running after {secs} s; console:\n{}\nlog:\n{}",
                std::fs::read_to_string(dir.join("console.log")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sector1_count(image: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(&image[512..540])
        .trim_end_matches('\0')
        .to_string();
    text.strip_prefix("COUNT=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("sector 1: {text:?}"))
}

#[test]
fn a_store_restart_pauses_the_guests_disk_and_it_carries_on() {
    if !tessera_tests::kvm_or_skip("a_store_restart_pauses_the_guests_disk_and_it_carries_on") {
        return;
    }
    require("nbdcopy");
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("store");
    let port = free_port();
    let mut store = StoreProcess::start_with_port(&data, port);
    store.create_volume("vm-1-disk-0", "16M");
    let uri = store.unix_uri("vm-1-disk-0");
    let mut child = vmm(
        &uri,
        "tessera.mode=count",
        d.path(),
        &["--disk-timeout-ms", "60000"],
    );
    let con = d.path().join("console.log");
    wait_console(&con, "count 6", |t| {
        counts(t).last().is_some_and(|n| *n >= 6)
    });
    store.kill9();
    // The guest's next disk write (every fifth count, right after printing it) now waits
    // for the store: wait for that count rather than sleeping and hoping it was reached
    // (a loaded machine runs the emulated guest slower).
    let at_kill = *counts(&std::fs::read_to_string(&con).unwrap())
        .last()
        .unwrap();
    let write_at = (at_kill / 5 + 1) * 5;
    wait_console(&con, "the count of the next disk write", |t| {
        counts(t).last().is_some_and(|n| *n >= write_at)
    });
    std::thread::sleep(Duration::from_millis(500));
    let stalled = *counts(&std::fs::read_to_string(&con).unwrap())
        .last()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let still = *counts(&std::fs::read_to_string(&con).unwrap())
        .last()
        .unwrap();
    assert_eq!(
        stalled, still,
        "the guest counted on past a disk write with no store"
    );
    let store = StoreProcess::start_with_port(&data, port);
    let text = wait_console(&con, "counting to go on after the restart", |t| {
        counts(t).last().is_some_and(|n| *n >= stalled + 11)
    });
    assert!(!text.contains("FAIL"), "{text}");
    VmApi::connect(&d.path().join("api.sock")).call(json!({ "type": "power_off" }));
    assert!(exits_within(&mut child, 30, d.path()).success());
    let log = std::fs::read_to_string(d.path().join("vmm.log")).unwrap();
    assert!(log.contains("re-established"), "{log}");

    let dump = d.path().join("dump.raw");
    run(Command::new("nbdcopy")
        .arg(store.uri("vm-1-disk-0"))
        .arg(&dump));
    let image = std::fs::read(&dump).unwrap();
    assert!(
        image.starts_with(b"TESSERA-MARK-BEFORE-SNAPSHOT"),
        "the write before the restart is gone"
    );
    assert!(
        sector1_count(&image) > stalled,
        "no write after the restart landed (snapshot {stalled})"
    );
}

/// Does a fixed-newstyle handshake as a server of one 1 MiB export.
fn handshake(s: &mut TcpStream) {
    let mut g = Vec::new();
    g.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g).unwrap();
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags).unwrap();
    let mut h = [0u8; OPTION_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let opt = OptionHeader::decode(&h).unwrap();
    let mut payload = vec![0u8; opt.length as usize];
    s.read_exact(&mut payload).unwrap();
    let info = Info::Export {
        size: 1 << 20,
        flags: 1 | 4 | 32, // HAS_FLAGS, SEND_FLUSH, SEND_TRIM
    }
    .encode();
    let rep = |kind, len| OptionReplyHeader {
        option: proto::OPT_GO,
        kind,
        length: len,
    };
    s.write_all(&rep(proto::REP_INFO, info.len() as u32).encode())
        .unwrap();
    s.write_all(&info).unwrap();
    s.write_all(&rep(proto::REP_ACK, 0).encode()).unwrap();
}

#[test]
fn a_server_that_never_answers_gives_the_guest_an_io_error_not_a_hang() {
    if !tessera_tests::kvm_or_skip(
        "a_server_that_never_answers_gives_the_guest_an_io_error_not_a_hang",
    ) {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                handshake(&mut s);
                // Swallows requests, answers none.
                let mut sink = [0u8; 65536];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    let d = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = vmm(
        &format!("nbd://{addr}/disk"),
        "",
        d.path(),
        &["--disk-timeout-ms", "1500"],
    );
    let status = exits_within(&mut child, 60, d.path());
    let took = started.elapsed();
    let console = std::fs::read_to_string(d.path().join("console.log")).unwrap();
    assert!(status.success(), "{status}: {console}");
    assert!(
        console.contains("TESSERA-GUEST: FAIL write"),
        "the guest did not see its write fail:\n{console}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "failed before the timeout: {took:?}"
    );
    let log = std::fs::read_to_string(d.path().join("vmm.log")).unwrap();
    assert!(log.contains("did not answer"), "{log}");
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with
/// `openssl`, in the file names both qemu (server side) and libnbd (client side) expect.
fn make_credentials(server_dir: &Path, client_dir: &Path) {
    std::fs::create_dir_all(server_dir).unwrap();
    std::fs::create_dir_all(client_dir).unwrap();
    let script = r#"
set -e
cd "$1"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout ca-key.pem -out ca-cert.pem -days 30 -subj /CN=vmm-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
for who in server client; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout $who-key.pem -out $who.csr -subj /CN=$who 2>/dev/null
done
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > server.ext
printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' > client.ext
for who in server client; do
  openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
    -out $who-cert.pem -days 30 -extfile $who.ext 2>/dev/null
done
cp ca-cert.pem client-cert.pem client-key.pem "$2"/
rm ca-key.pem client-cert.pem client-key.pem
"#;
    run(Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(server_dir)
        .arg(client_dir));
}

#[test]
fn a_tls_only_server_is_reached_through_nbds_with_a_client_certificate() {
    if !tessera_tests::kvm_or_skip(
        "a_tls_only_server_is_reached_through_nbds_with_a_client_certificate",
    ) {
        return;
    }
    require("qemu-nbd");
    require("openssl");
    let d = tempfile::tempdir().unwrap();
    let (server_dir, client_dir) = (d.path().join("server-pki"), d.path().join("client-pki"));
    make_credentials(&server_dir, &client_dir);
    let image = d.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let port = free_port();
    let mut server = Command::new("qemu-nbd")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on",
            server_dir.display()
        ))
        .args([
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            "-x",
            "disk",
            "--persistent",
        ])
        // The guest checks that discarded sectors read back as zeroes.
        .arg("--discard=unmap")
        .args(["-b", "127.0.0.1", "-p", &port.to_string()])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Credentials as flags.
    let run_dir = d.path().join("flags");
    std::fs::create_dir(&run_dir).unwrap();
    let mut child = vmm(
        &format!("nbds://127.0.0.1:{port}/disk"),
        "",
        &run_dir,
        &[
            "--disk-tls-ca",
            client_dir.join("ca-cert.pem").to_str().unwrap(),
            "--disk-tls-cert",
            client_dir.join("client-cert.pem").to_str().unwrap(),
            "--disk-tls-key",
            client_dir.join("client-key.pem").to_str().unwrap(),
        ],
    );
    let status = exits_within(&mut child, 60, &run_dir);
    let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap();
    assert!(status.success(), "{status}: {console}");
    assert!(
        console.contains("TESSERA-GUEST: PASS writes=4"),
        "{console}"
    );
    // The guest's pattern for sector 0 (byte i is i * 7 + i / 512) is in the image.
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(&bytes[..4], &[0, 7, 14, 21]);

    // Credentials the libnbd way: a directory named in the URI.
    let run_dir = d.path().join("dir");
    std::fs::create_dir(&run_dir).unwrap();
    let mut child = vmm(
        &format!(
            "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
            client_dir.display()
        ),
        "",
        &run_dir,
        &[],
    );
    let status = exits_within(&mut child, 60, &run_dir);
    let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap();
    assert!(status.success(), "{status}: {console}");
    assert!(
        console.contains("TESSERA-GUEST: PASS writes=4"),
        "{console}"
    );

    // Plain NBD to the TLS-only server: refused at start, saying why.
    let run_dir = d.path().join("plain");
    std::fs::create_dir(&run_dir).unwrap();
    let mut child = vmm(&format!("nbd://127.0.0.1:{port}/disk"), "", &run_dir, &[]);
    let status = exits_within(&mut child, 30, &run_dir);
    let log = std::fs::read_to_string(run_dir.join("vmm.log")).unwrap();
    assert!(!status.success());
    assert!(log.contains("requires TLS"), "{log}");

    let _ = server.kill();
    let _ = server.wait();
}
