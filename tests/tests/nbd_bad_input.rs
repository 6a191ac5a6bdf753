//! Hostile and broken NBD clients, byte by byte. Every case checks the answer the protocol
//! prescribes, then that the server still serves other clients.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tessera_nbd::proto::*;
use tessera_tests::{require, StoreProcess};

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EPERM: u32 = 1;

struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and completes the initial greeting (fixed newstyle, no zeroes).
    fn greet(p: &StoreProcess, client_flags: u32) -> Raw {
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut head = [0u8; 18];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head[0..8], b"NBDMAGIC");
        assert_eq!(&head[8..16], b"IHAVEOPT");
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Raw { s }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one option reply: (type, payload).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        self.s.read_exact(&mut body).unwrap();
        (kind, body)
    }

    fn go(&mut self, export: &str) {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (kind, _) = self.option_reply();
            match kind {
                REP_INFO => continue,
                REP_ACK => return,
                other => panic!("GO refused: {other:#x}"),
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32) {
        let r = Request {
            flags,
            kind,
            cookie: 0xc00c1e,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
    }

    /// Reads a simple reply and returns its error.
    fn simple_reply(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 0xc00c1e);
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(CMD_READ, 0, offset, len);
        assert_eq!(self.simple_reply(), 0);
        let mut b = vec![0u8; len as usize];
        self.s.read_exact(&mut b).unwrap();
        b
    }
}

fn setup() -> (tempfile::TempDir, StoreProcess) {
    require("nbdinfo");
    let d = tempfile::tempdir().unwrap();
    let p = StoreProcess::start(&d.path().join("store"));
    p.create_volume("v", "1M");
    (d, p)
}

fn transmission(p: &StoreProcess) -> Raw {
    let mut r = Raw::greet(p, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    r.go("v");
    r
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (_d, mut p) = setup();
    let mut other = transmission(&p);
    let mut r = transmission(&p);
    r.s.write_all(&[0xde; REQUEST_LEN]).unwrap();
    assert!(r.closed());
    assert_eq!(
        other.read_ok(0, 512),
        vec![0; 512],
        "the other connection kept working"
    );
    p.assert_healthy();
}

#[test]
fn bad_handshake_magic_and_flags_close_the_connection() {
    let (_d, mut p) = setup();
    let mut r = Raw::greet(&p, CLIENT_FIXED_NEWSTYLE);
    r.s.write_all(&[0u8; 16]).unwrap();
    assert!(r.closed());
    let mut r = Raw::greet(&p, 0x8000_0000);
    assert!(r.closed(), "unknown client flags must end the handshake");
    p.assert_healthy();
}

#[test]
fn option_lengths_are_capped() {
    let (_d, mut p) = setup();
    // 100 KiB: refused with TOO_BIG, payload drained, negotiation continues.
    let mut r = Raw::greet(&p, CLIENT_FIXED_NEWSTYLE);
    r.option(OPT_LIST, &vec![0u8; 100 * 1024]);
    assert_eq!(r.option_reply().0, REP_ERR_TOO_BIG);
    r.go("v");
    assert_eq!(r.read_ok(0, 4096).len(), 4096);
    // 4 GiB claimed: the server hangs up instead of reading it.
    let mut r = Raw::greet(&p, CLIENT_FIXED_NEWSTYLE);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    r.s.write_all(&b).unwrap();
    assert!(r.closed());
    p.assert_healthy();
}

#[test]
fn malformed_option_payloads_get_invalid() {
    let (_d, mut p) = setup();
    let mut r = Raw::greet(&p, CLIENT_FIXED_NEWSTYLE);
    // Name length larger than the payload.
    let mut d = 1000u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"v\0\0");
    r.option(OPT_GO, &d);
    assert_eq!(r.option_reply().0, REP_ERR_INVALID);
    // A name over 4096 bytes.
    let long = "x".repeat(5000);
    let mut d = (long.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(long.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    r.option(OPT_INFO, &d);
    assert_eq!(r.option_reply().0, REP_ERR_INVALID);
    // Unknown export and unknown option.
    let mut d = 7u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"missing");
    d.extend_from_slice(&0u16.to_be_bytes());
    r.option(OPT_GO, &d);
    let (kind, msg) = r.option_reply();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("missing"));
    r.option(0x7777, &[]);
    assert_eq!(r.option_reply().0, REP_ERR_UNSUP);
    // SET_META_CONTEXT before structured replies.
    let mut d = 1u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"v");
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
    r.option(OPT_SET_META_CONTEXT, &d);
    assert_eq!(r.option_reply().0, REP_ERR_INVALID);
    // Still usable after all that.
    r.go("v");
    assert_eq!(r.read_ok(0, 512).len(), 512);
    p.assert_healthy();
}

#[test]
fn out_of_range_requests_get_the_prescribed_errors() {
    let (_d, mut p) = setup();
    let mut r = transmission(&p);
    let size = 1u64 << 20;
    r.request(CMD_READ, 0, size - 100, 200);
    assert_eq!(r.simple_reply(), EINVAL);
    r.request(CMD_TRIM, 0, size, 4096);
    assert_eq!(r.simple_reply(), EINVAL);
    r.request(CMD_BLOCK_STATUS, 0, size, 4096);
    assert_eq!(r.simple_reply(), EINVAL);
    r.request(CMD_WRITE_ZEROES, 0, size - 512, 4096);
    assert_eq!(r.simple_reply(), ENOSPC);
    // An out-of-range write: its payload must be consumed to stay in sync.
    r.request(CMD_WRITE, 0, size - 512, 4096);
    r.s.write_all(&[0xee; 4096]).unwrap();
    assert_eq!(r.simple_reply(), ENOSPC);
    // offset + length overflows u64.
    r.request(CMD_READ, 0, u64::MAX - 10, 4096);
    assert_eq!(r.simple_reply(), EINVAL);
    r.request(CMD_WRITE, 0, u64::MAX - 10, 16);
    r.s.write_all(&[1; 16]).unwrap();
    assert_eq!(r.simple_reply(), ENOSPC);
    // Nothing was written anywhere by the refused requests.
    assert_eq!(r.read_ok(size - 4096, 4096), vec![0; 4096]);
    p.assert_healthy();
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let (_d, mut p) = setup();
    let mut r = transmission(&p);
    r.request(42, 0, 0, 512);
    assert_eq!(r.simple_reply(), EINVAL);
    r.request(CMD_READ, 1 << 12, 0, 512);
    assert_eq!(r.simple_reply(), EINVAL);
    r.request(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512);
    r.s.write_all(&[3; 512]).unwrap();
    assert_eq!(r.simple_reply(), EINVAL);
    // Block status needs structured replies and the context.
    r.request(CMD_BLOCK_STATUS, 0, 0, 4096);
    assert_eq!(r.simple_reply(), EINVAL);
    assert_eq!(
        r.read_ok(0, 512),
        vec![0; 512],
        "refused write left no trace"
    );
    p.assert_healthy();
}

#[test]
fn oversize_write_is_refused_without_buffering_it() {
    let (_d, mut p) = setup();
    let mut r = transmission(&p);
    let before = p.peak_rss_kib();
    // 512 MiB announced and sent: far over the 32 MiB maximum.
    let len: u32 = 512 << 20;
    r.request(CMD_WRITE, 0, 0, len);
    let chunk = vec![0xab; 1 << 20];
    for _ in 0..512 {
        r.s.write_all(&chunk).unwrap();
    }
    assert_eq!(r.simple_reply(), EINVAL);
    assert_eq!(
        r.read_ok(0, 512),
        vec![0; 512],
        "connection stays in sync after the drained payload"
    );
    let after = p.peak_rss_kib();
    assert!(
        after < before + 64 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB: the payload was buffered"
    );
    // An oversize read is refused too, and nothing follows its error reply.
    r.request(CMD_READ, 0, 0, 64 << 20);
    assert_eq!(r.simple_reply(), EINVAL);
    assert_eq!(r.read_ok(0, 16), vec![0; 16]);
    p.assert_healthy();
}

#[test]
fn writes_to_a_snapshot_get_eperm() {
    let (_d, mut p) = setup();
    p.cli_ok(&["snapshot", "create", "v", "s"]);
    let mut r = Raw::greet(&p, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    r.go("v@s");
    r.request(CMD_WRITE, 0, 0, 512);
    r.s.write_all(&[9; 512]).unwrap();
    assert_eq!(r.simple_reply(), EPERM);
    r.request(CMD_TRIM, 0, 0, 4096);
    assert_eq!(r.simple_reply(), EPERM);
    assert_eq!(r.read_ok(0, 512), vec![0; 512]);
    p.assert_healthy();
}

#[test]
fn client_vanishing_mid_request_hurts_no_one() {
    let (_d, mut p) = setup();
    for cut in [3usize, REQUEST_LEN, REQUEST_LEN + 100] {
        let mut r = transmission(&p);
        let req = Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 4096,
        }
        .encode();
        let mut bytes = req.to_vec();
        bytes.extend_from_slice(&[7u8; 4096]);
        r.s.write_all(&bytes[..cut]).unwrap();
        drop(r);
    }
    let mut r = transmission(&p);
    assert_eq!(
        r.read_ok(0, 4096),
        vec![0; 4096],
        "a half-sent write must not land"
    );
    p.assert_healthy();
}

#[test]
fn export_name_option_with_unknown_name_closes() {
    let (_d, mut p) = setup();
    let mut r = Raw::greet(&p, CLIENT_FIXED_NEWSTYLE);
    r.option(OPT_EXPORT_NAME, b"nope");
    assert!(r.closed());
    // The old-style option still works for a good name (with the 124 zero bytes).
    let mut r = Raw::greet(&p, CLIENT_FIXED_NEWSTYLE);
    r.option(OPT_EXPORT_NAME, b"v");
    let mut reply = [0u8; 8 + 2 + 124];
    r.s.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), 1 << 20);
    assert!(reply[10..].iter().all(|b| *b == 0));
    assert_eq!(r.read_ok(0, 512).len(), 512);
    p.assert_healthy();
}
