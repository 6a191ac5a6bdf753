//! The NBD server's limits against a real `tessera-store` process: a client that
//! pipelines reads without reading replies, clients that stall in negotiation, and a
//! process out of file descriptors. After each, a fresh `nbdinfo` must still work.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_nbd::proto::*;
use tessera_tests::{free_port, require, run, StoreProcess};

const MIB: u32 = 1 << 20;

/// A client speaking raw bytes over TCP.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects, takes the greeting and negotiates `export` with `NBD_OPT_GO` (simple
    /// replies).
    fn transmission(p: &StoreProcess, export: &str) -> Raw {
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        let flags = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
        s.write_all(&flags.to_be_bytes()).unwrap();
        let mut go = (export.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(go.len() as u32).to_be_bytes());
        opt.extend_from_slice(&go);
        s.write_all(&opt).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).unwrap();
            match kind {
                REP_INFO => continue,
                REP_ACK => return Raw { s },
                other => panic!("GO refused: {other:#x}"),
            }
        }
    }

    /// Reads one simple reply, checks its cookie and success, and fills `data`.
    fn reply(&mut self, cookie: u64, data: &mut [u8]) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0, "error");
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        self.s.read_exact(data).unwrap();
    }

    fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let head = request(CMD_WRITE, 7, offset, data.len() as u32);
        self.s.write_all(&head).unwrap();
        self.s.write_all(data).unwrap();
        self.reply(7, &mut []);
    }

    fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let head = request(CMD_READ, 8, offset, len);
        self.s.write_all(&head).unwrap();
        let mut b = vec![0u8; len as usize];
        self.reply(8, &mut b);
        b
    }
}

/// A simple-reply request header.
fn request(kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
    Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(p: &StoreProcess, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc status"))
}

/// True when the server closed the connection (after whatever it had sent).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).is_ok()
}

fn store(extra: &[&str]) -> (tempfile::TempDir, StoreProcess) {
    require("nbdinfo");
    let d = tempfile::tempdir().unwrap();
    let p = StoreProcess::start_with(&d.path().join("store"), free_port(), extra);
    (d, p)
}

#[test]
fn two_thousand_unread_32_mib_reads_stay_within_the_connection_budget() {
    let (_d, mut p) = store(&[]);
    p.create_volume("v", "32M");
    let mut r = Raw::transmission(&p, "v");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    r.write_ok(0, &pattern);
    let (rss_before, peak_before) = (status_kib(&p, "VmRSS"), status_kib(&p, "VmHWM"));

    // 2,000 reads of 32 MiB (62.5 GiB of replies) sent at once; nothing read back yet.
    const READS: u64 = 2000;
    let mut burst = Vec::new();
    for cookie in 0..READS {
        burst.extend_from_slice(&request(CMD_READ, cookie, 0, 32 * MIB));
    }
    r.s.write_all(&burst).unwrap();
    // Give the server time to take in as much as it will.
    let mut peak = peak_before;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        peak = status_kib(&p, "VmHWM");
    }
    let rss = status_kib(&p, "VmRSS");
    eprintln!("VmHWM {peak_before} -> {peak} KiB, VmRSS {rss_before} -> {rss} KiB");
    // The budget is 64 MiB of reply data per connection; allow as much again for the
    // reads being produced and the allocator's slack.
    let bound = 192 * 1024;
    assert!(
        peak < peak_before + bound,
        "peak RSS grew from {peak_before} KiB to {peak} KiB with 2,000 unread 32 MiB reads"
    );
    assert!(
        rss < rss_before + bound,
        "RSS grew from {rss_before} KiB to {rss} KiB"
    );

    // The client now reads, and replies flow again. (Reading all 62.5 GiB would take
    // minutes of loopback copying; the crate's own tests read every reply back.)
    let mut data = vec![0u8; 32 << 20];
    for i in 0..32 {
        let mut h = [0u8; 16];
        r.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            0,
            "read {i} failed"
        );
        assert!(u64::from_be_bytes(h[8..16].try_into().unwrap()) < READS);
        r.s.read_exact(&mut data).unwrap();
        assert_eq!(
            &data[..4096],
            &pattern[..],
            "reply {i} has the written data"
        );
    }
    // Leaving with the rest unread costs the server nothing more either.
    drop(r);
    std::thread::sleep(Duration::from_secs(1));
    let peak = status_kib(&p, "VmHWM");
    assert!(
        peak < peak_before + bound,
        "peak RSS grew from {peak_before} KiB to {peak} KiB while replies were read"
    );
    let mut r = Raw::transmission(&p, "v");
    assert_eq!(r.read_ok(0, 4096), pattern);
    p.assert_healthy();
}

#[test]
fn clients_stalled_in_negotiation_are_disconnected_after_the_timeout() {
    let (_d, mut p) = store(&["--nbd-negotiation-timeout-ms", "1000"]);
    p.create_volume("v", "1M");
    let start = Instant::now();
    // Connects and reads nothing, not even the greeting.
    let mut mute = TcpStream::connect(p.addr()).unwrap();
    // Takes the greeting and says nothing.
    let mut silent = TcpStream::connect(p.addr()).unwrap();
    let mut greeting = [0u8; 18];
    silent.read_exact(&mut greeting).unwrap();
    // Stops in the middle of an option header.
    let mut halfway = TcpStream::connect(p.addr()).unwrap();
    halfway.read_exact(&mut greeting).unwrap();
    halfway
        .write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    halfway.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    // A client that negotiated promptly may idle in transmission as long as it likes.
    let mut idle = Raw::transmission(&p, "v");

    for (name, s) in [
        ("mute", &mut mute),
        ("silent", &mut silent),
        ("halfway", &mut halfway),
    ] {
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "the {name} client was not disconnected"
        );
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
        "disconnected after {waited:?}, expected about the 1 s timeout"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        idle.read_ok(0, 512),
        vec![0; 512],
        "the idle client still works"
    );
    assert!(p.log_text().contains("did not finish negotiating"));
    p.assert_healthy();
}

#[test]
fn the_listener_survives_running_out_of_file_descriptors() {
    require("prlimit");
    let (_d, mut p) = store(&[]);
    p.create_volume("v", "1M");
    let pid = p.child.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // Room for a few connections, then accept fails with EMFILE.
    let limit = open + 4;
    run(Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}")));

    let mut held = Vec::new();
    let starved = loop {
        assert!(held.len() < 64, "never ran out of descriptors at {limit}");
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut greeting = [0u8; 18];
        if s.read_exact(&mut greeting).is_err() {
            // The kernel queued the connection but the server could not accept it.
            break s;
        }
        held.push(s);
    };
    assert!(!held.is_empty(), "some connections fit under the limit");
    assert!(
        p.log_text().contains("NBD accept failed"),
        "the failed accept is logged:\n{}",
        p.log_text()
    );
    drop(starved);
    drop(held);
    // With descriptors free again (and the limit still in force) a new client is served.
    let mut r = Raw::transmission(&p, "v");
    assert_eq!(r.read_ok(0, 512), vec![0; 512]);
    drop(r);
    p.assert_healthy();
    let info = run(Command::new("nbdinfo").arg(p.uri("v")));
    assert!(info.contains("export-size: 1048576"), "{info}");
}
