//! A bounded-time fuzz of the NBD server's state machine (not only its parsers): seeded
//! random sequences of handshake options (right, wrong and lying lengths, unknown ones,
//! repeated ones, STARTTLS without TLS) and, after a GO or EXPORT_NAME, transmission
//! requests (every command, random flags, offsets and lengths in and out of range, short
//! payloads), often cut off mid-message, against an in-process server on an in-memory
//! pipe. Each connection must end by itself once the client's bytes are done (no hang), the
//! server must not panic, every answer starts with the server's greeting, and the device
//! is never asked for bytes outside it.
//!
//! Stable Rust, no cargo-fuzz: a small seeded generator and a time budget
//! (`TESSERA_FUZZ_SECS`, default 15; `TESSERA_FUZZ_SEED` to start from a given seed). A
//! failure names the seed that reproduces it.
// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tessera_nbd::{
    serve_connection, Device, DeviceError, ExportEntry, Exports, Extent, ServerConfig,
};

const SIZE: u64 = 1 << 20;
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;

/// xorshift64*: small, seeded, good enough to pick bytes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A 1 MiB in-memory disk that notes any request outside it.
struct Mem {
    data: Mutex<Vec<u8>>,
    outside: AtomicBool,
}

impl Mem {
    fn check(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if offset.checked_add(len).is_none_or(|end| end > SIZE) {
            self.outside.store(true, Ordering::SeqCst);
            return Err(DeviceError::new(
                tessera_nbd::proto::Errno::Inval,
                "outside the device",
            ));
        }
        Ok(())
    }
}

impl Device for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check(offset, buf.len() as u64)?;
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8], _: bool) -> Result<(), DeviceError> {
        self.check(offset, buf.len() as u64)?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _: bool) -> Result<(), DeviceError> {
        self.check(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool, _: bool) -> Result<(), DeviceError> {
        self.check(offset, len)?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.check(offset, len)?;
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
            name: "vol".into(),
            description: "fuzz".into(),
        }]
    }
    fn open(&self, name: &str) -> Result<Option<Arc<Mem>>, DeviceError> {
        Ok((name == "vol").then(|| self.0.clone()))
    }
}

fn option(out: &mut Vec<u8>, r: &mut Rng, opt: u32, data: &[u8]) {
    let magic = if r.chance(97) { IHAVEOPT } else { r.next() };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    let len = if r.chance(92) {
        data.len() as u32
    } else {
        r.next() as u32 % 70_000
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// GO/INFO data: the export name and some information requests.
fn go_data(r: &mut Rng) -> Vec<u8> {
    let name: &[u8] = match r.below(4) {
        0 => b"",
        1 => b"nope",
        _ => b"vol",
    };
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    let n = r.below(4) as u16;
    d.extend_from_slice(&n.to_be_bytes());
    for _ in 0..n {
        d.extend_from_slice(&(r.below(5) as u16).to_be_bytes());
    }
    d
}

/// META_CONTEXT data: the export name and some queries.
fn meta_data(r: &mut Rng) -> Vec<u8> {
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"vol");
    let queries: Vec<&[u8]> = match r.below(3) {
        0 => vec![],
        1 => vec![b"base:allocation"],
        _ => vec![b"base:", b"qemu:dirty-bitmap:x"],
    };
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

fn request(out: &mut Vec<u8>, r: &mut Rng) {
    let magic = if r.chance(98) {
        REQUEST_MAGIC
    } else {
        r.next() as u32
    };
    let flags = if r.chance(70) { 0 } else { r.next() as u16 };
    let ty = if r.chance(95) {
        r.below(9) as u16
    } else {
        r.next() as u16
    };
    let offset = match r.below(10) {
        0 => r.next(),
        1 => SIZE - r.below(4096),
        _ => r.below(SIZE / 512) * 512,
    };
    let len = match r.below(10) {
        0 => r.next() as u32,
        1 => 0,
        _ => r.below(65_536) as u32,
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&r.next().to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    if ty == 1 {
        // WRITE: its payload, whole or (sometimes) short.
        let n = if r.chance(90) {
            len.min(1 << 20) as usize
        } else {
            r.below(u64::from(len.min(1 << 20)) + 1) as usize
        };
        out.extend_from_slice(&r.bytes(n));
    }
}

/// Everything one client sends, from its flags to its last (maybe cut off) request.
fn client_bytes(seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut out = Vec::new();
    let flags: u32 = if r.chance(90) {
        1 | (r.below(2) as u32 * 2)
    } else {
        r.next() as u32
    };
    out.extend_from_slice(&flags.to_be_bytes());
    let mut transmission = false;
    for _ in 0..r.below(8) {
        let opt = match r.below(14) {
            0 => 1,               // EXPORT_NAME
            1 => 2,               // ABORT
            2 => 3,               // LIST
            3 => 5,               // STARTTLS (no TLS here)
            4 => 6,               // INFO
            5..=7 => 7,           // GO
            8 => 8,               // STRUCTURED_REPLY
            9 => 9,               // LIST_META_CONTEXT
            10 => 10,             // SET_META_CONTEXT
            11 => 11,             // EXTENDED_HEADERS
            _ => r.next() as u32, // unknown
        };
        let data = match opt {
            1 => b"vol".to_vec(),
            6 | 7 => go_data(&mut r),
            9 | 10 => meta_data(&mut r),
            _ if r.chance(70) => Vec::new(),
            _ => {
                let n = r.below(64) as usize;
                r.bytes(n)
            }
        };
        option(&mut out, &mut r, opt, &data);
        if opt == 1 || opt == 7 {
            transmission = true;
            break;
        }
        if opt == 2 {
            break;
        }
    }
    if transmission {
        for _ in 0..r.below(24) {
            request(&mut out, &mut r);
        }
    }
    if r.chance(30) {
        let cut = r.below(out.len() as u64 + 1) as usize;
        out.truncate(cut);
    }
    out
}

/// One connection: the client's bytes in, then EOF; returns the server's answer.
async fn one(seed: u64, mem: Arc<Mem>) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let cfg = ServerConfig {
        max_payload: 1 << 20,
        negotiation_timeout: Duration::from_secs(3),
        ..ServerConfig::default()
    };
    let srv =
        tokio::spawn(
            async move { serve_connection(server, Arc::new(One(mem)), cfg, "fuzz").await },
        );
    let (mut rd, mut wr) = tokio::io::split(client);
    let bytes = client_bytes(seed);
    let writer = tokio::spawn(async move {
        // The server may stop reading and close first: a broken pipe is its right.
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
        wr
    });
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if got.len() < 64 {
                got.extend_from_slice(&buf[..n.min(64)]);
            }
        }
        got
    });
    let ended = tokio::time::timeout(Duration::from_secs(10), srv).await;
    let ended = ended.unwrap_or_else(|_| panic!("seed {seed}: the connection did not end"));
    match ended {
        Ok(_io_result) => {}
        Err(e) => panic!("seed {seed}: the server panicked: {e}"),
    }
    let _wr = writer.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the server's side stayed open"))
        .unwrap()
}

#[test]
fn random_option_and_request_sequences_end_cleanly() {
    let budget = std::env::var("TESSERA_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15u64);
    let first: u64 = std::env::var("TESSERA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mem = Arc::new(Mem {
        data: Mutex::new(vec![0; SIZE as usize]),
        outside: AtomicBool::new(false),
    });
    let start = Instant::now();
    let mut runs = 0u64;
    let mut seed = first;
    while start.elapsed() < Duration::from_secs(budget) && runs < 200_000 {
        // A few connections at once, as real clients come.
        let batch: Vec<u64> = (seed..seed + 8).collect();
        seed += 8;
        let answers = rt.block_on(async {
            let hs: Vec<_> = batch
                .iter()
                .map(|s| tokio::spawn(one(*s, mem.clone())))
                .collect();
            let mut out = Vec::new();
            for h in hs {
                out.push(h.await.unwrap());
            }
            out
        });
        for (s, got) in batch.iter().zip(answers) {
            assert!(
                got.len() >= 8 && got[..8] == NBDMAGIC.to_be_bytes(),
                "seed {s}: no greeting: {got:02x?}"
            );
        }
        assert!(
            !mem.outside.load(Ordering::SeqCst),
            "seeds {batch:?}: the device was asked for bytes outside it"
        );
        runs += 8;
    }
    assert!(runs >= 64, "only {runs} connections in {budget} s");
    eprintln!(
        "NBD state-machine fuzz: {runs} connections from seed {first} in {:?}",
        start.elapsed()
    );
}
