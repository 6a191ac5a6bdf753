//! The server's limits against clients that do not play along: one that pipelines reads
//! without reading replies gets no more than the connection's budget served ahead of it,
//! and one that stalls in negotiation is disconnected.
// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_nbd::proto::*;
use tessera_nbd::{serve_unix, Device, DeviceError, ExportEntry, Exports, Extent, ServerConfig};

const MIB: u32 = 1 << 20;

/// A 64 MiB device whose every byte is its offset's low byte; it counts reads.
#[derive(Default)]
struct Counting {
    reads: AtomicU64,
}

impl Device for Counting {
    fn size(&self) -> u64 {
        64 << 20
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (offset + i as u64) as u8;
        }
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), DeviceError> {
        Err(DeviceError::new(Errno::Perm, "read-only"))
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
        Err(DeviceError::new(Errno::Perm, "read-only"))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), DeviceError> {
        Err(DeviceError::new(Errno::Perm, "read-only"))
    }
    fn extents(&self, _: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
}

struct One(Arc<Counting>);

impl Exports for One {
    type Device = Counting;
    fn list(&self) -> Vec<ExportEntry> {
        vec![ExportEntry {
            name: "vol".into(),
            description: String::new(),
        }]
    }
    fn open(&self, name: &str) -> Result<Option<Arc<Counting>>, DeviceError> {
        Ok((name == "vol").then(|| self.0.clone()))
    }
}

/// A server's socket file, removed when the test ends.
pub(crate) struct Socket(PathBuf);

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts a server with `cfg` on a fresh Unix socket, on its own runtime thread.
fn serve(cfg: ServerConfig) -> (Socket, Arc<Counting>) {
    let device = Arc::new(Counting::default());
    let path = serve_exports(Arc::new(One(device.clone())), cfg);
    (path, device)
}

/// Serves `exports` with `cfg` on a fresh Unix socket, on its own runtime thread.
pub(crate) fn serve_exports<E: Exports>(exports: Arc<E>, cfg: ServerConfig) -> Socket {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "tessera-nbd-limits-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    let at = path.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tessera_nbd::bind_unix(&at).unwrap();
            tx.send(()).unwrap();
            serve_unix(listener, exports, cfg).await
        })
    });
    rx.recv().unwrap();
    Socket(path)
}

/// Connects and negotiates `vol` with `NBD_OPT_EXPORT_NAME` (simple replies).
pub(crate) fn connect(path: &Socket) -> UnixStream {
    let mut s = UnixStream::connect(&path.0).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let flags = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
    s.write_all(&flags.to_be_bytes()).unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(b"vol");
    s.write_all(&opt).unwrap();
    let mut answer = [0u8; 10];
    s.read_exact(&mut answer).unwrap();
    s
}

/// Sends `n` READs of `len` bytes at offset 0, cookies 0..n, without reading anything.
pub(crate) fn send_reads(s: &mut UnixStream, n: u64, len: u32) {
    let mut bytes = Vec::new();
    for cookie in 0..n {
        let r = Request {
            flags: 0,
            kind: CMD_READ,
            cookie,
            offset: 0,
            length: len,
        };
        bytes.extend_from_slice(&r.encode());
    }
    s.write_all(&bytes).unwrap();
}

/// Reads `n` simple replies of `len` bytes each and checks every one.
fn read_replies(s: &mut UnixStream, n: u64, len: u32) {
    let mut data = vec![0u8; len as usize];
    for _ in 0..n {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            0,
            "read failed"
        );
        s.read_exact(&mut data).unwrap();
        assert!(data.iter().enumerate().all(|(i, b)| *b == i as u8));
    }
}

/// Waits until the device's read count stops moving and returns it.
fn settled_reads(d: &Counting) -> u64 {
    let mut last = d.reads.load(Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = d.reads.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn a_client_not_reading_replies_gets_only_the_byte_budget_read_ahead() {
    let (path, device) = serve(ServerConfig {
        max_bytes_in_flight: 4 * MIB,
        ..ServerConfig::default()
    });
    let mut s = connect(&path);
    send_reads(&mut s, 200, MIB);
    let ahead = settled_reads(&device);
    // Four 1 MiB replies fit the budget; one more may have left for the socket.
    assert!(
        ahead <= 5,
        "{ahead} reads of 1 MiB served to a client reading nothing"
    );
    read_replies(&mut s, 200, MIB);
    assert_eq!(device.reads.load(Ordering::SeqCst), 200);
}

#[test]
fn a_client_not_reading_replies_gets_only_the_request_budget_read_ahead() {
    let (path, device) = serve(ServerConfig {
        max_requests_in_flight: 3,
        max_bytes_in_flight: u32::MAX,
        ..ServerConfig::default()
    });
    let mut s = connect(&path);
    send_reads(&mut s, 100, MIB);
    let ahead = settled_reads(&device);
    assert!(
        ahead <= 4,
        "{ahead} reads served to a client reading nothing"
    );
    read_replies(&mut s, 100, MIB);
    assert_eq!(device.reads.load(Ordering::SeqCst), 100);
}

#[test]
fn requests_left_behind_by_a_client_that_hung_up_are_not_served() {
    let (path, device) = serve(ServerConfig {
        max_bytes_in_flight: 4 * MIB,
        ..ServerConfig::default()
    });
    let mut s = connect(&path);
    send_reads(&mut s, 200, MIB);
    read_replies(&mut s, 2, MIB);
    drop(s);
    // The headers are already in the server's buffer; once a reply cannot be written it
    // must stop instead of reading the device for each of them.
    let served = settled_reads(&device);
    assert!(served < 20, "{served} reads served after the client left");
}

#[test]
fn a_read_larger_than_the_byte_budget_is_still_served() {
    let (path, _device) = serve(ServerConfig {
        max_bytes_in_flight: MIB,
        ..ServerConfig::default()
    });
    let mut s = connect(&path);
    send_reads(&mut s, 3, 8 * MIB);
    read_replies(&mut s, 3, 8 * MIB);
}

#[test]
fn a_client_silent_in_negotiation_is_disconnected() {
    let (path, _device) = serve(ServerConfig {
        negotiation_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    // One client reads the greeting and says nothing; one stops in the middle of an option.
    let mut silent = UnixStream::connect(&path.0).unwrap();
    let mut halfway = UnixStream::connect(&path.0).unwrap();
    let mut greeting = [0u8; 18];
    halfway.read_exact(&mut greeting).unwrap();
    halfway
        .write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    halfway.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    let start = Instant::now();
    for s in [&mut silent, &mut halfway] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "closed only after {waited:?}"
    );
    // A client that negotiates promptly is unaffected.
    let mut s = connect(&path);
    send_reads(&mut s, 1, 4096);
    read_replies(&mut s, 1, 4096);
}
