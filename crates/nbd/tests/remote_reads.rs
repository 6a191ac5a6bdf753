//! Reads that complete elsewhere (`Device::remote_reads`, a store forwarding its client
//! to another node's): the server keeps a client's reads in flight together instead of
//! answering them one after the other, and a device's failure or a wrong-sized answer
//! reaches the client as an error without breaking the connection.
// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_nbd::device::{RemoteExtents, RemoteRead};
use tessera_nbd::proto::*;
use tessera_nbd::{Device, DeviceError, ExportEntry, Exports, Extent, ServerConfig};
use tokio::sync::Notify;

use crate::limits::{connect, send_reads, serve_exports};

/// Reads in flight at once the first test waits for, as a QD8 client sends.
const DEPTH: u32 = 8;

/// A device whose reads each wait, like a round trip to another node, until [`DEPTH`]
/// of them are waiting together (or 10 s passed: then the read fails and says how many
/// there were). Every byte is its offset's low byte; a read at [`SHORT_AT`] answers one
/// byte short, one at [`FAILING_AT`] fails.
#[derive(Default)]
struct RoundTrips {
    waiting: AtomicU32,
    most: AtomicU32,
    all_there: Notify,
}

const SHORT_AT: u64 = 1 << 20;
const FAILING_AT: u64 = 2 << 20;

impl RoundTrips {
    async fn round_trip(self: Arc<Self>, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        // Registered before counting itself, so the last one's wake-up cannot be missed.
        let there = self.all_there.notified();
        let now = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let waits = offset < SHORT_AT;
        if now >= DEPTH {
            self.all_there.notify_waiters();
        } else if waits
            && tokio::time::timeout(Duration::from_secs(10), there)
                .await
                .is_err()
        {
            let most = self.most.load(Ordering::SeqCst);
            return Err(DeviceError::new(
                Errno::Io,
                format!("only {most} reads were ever in flight together"),
            ));
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        match offset {
            FAILING_AT => Err(DeviceError::new(Errno::Io, "the other store failed")),
            SHORT_AT => Ok(vec![0; len - 1]),
            _ => Ok((0..len).map(|i| (offset + i as u64) as u8).collect()),
        }
    }
}

/// The device as the server sees it; the shared state lives in the `Arc`.
struct Remote(Arc<RoundTrips>);

impl Device for Remote {
    fn size(&self) -> u64 {
        64 << 20
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
        Err(DeviceError::new(Errno::Io, "a remote device read inline"))
    }
    fn remote_reads(&self) -> bool {
        true
    }
    fn read_remote(&self, offset: u64, len: usize) -> RemoteRead {
        Box::pin(self.0.clone().round_trip(offset, len))
    }
    fn extents_remote(&self, _: u64, len: u64) -> RemoteExtents {
        Box::pin(std::future::ready(Ok(vec![Extent {
            length: len,
            flags: 0,
        }])))
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
    fn extents(&self, _: u64, _: u64) -> Result<Vec<Extent>, DeviceError> {
        Err(DeviceError::new(
            Errno::Io,
            "a remote device's extents asked inline",
        ))
    }
}

struct One(Arc<RoundTrips>);

impl Exports for One {
    type Device = Remote;
    fn list(&self) -> Vec<ExportEntry> {
        vec![ExportEntry {
            name: "vol".into(),
            description: String::new(),
        }]
    }
    fn open(&self, name: &str) -> Result<Option<Arc<Remote>>, DeviceError> {
        Ok((name == "vol").then(|| Arc::new(Remote(self.0.clone()))))
    }
}

/// Reads one simple reply: its cookie and error, and `len` bytes of data when it
/// succeeded.
fn reply(s: &mut UnixStream, len: u32) -> (u64, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let mut data = vec![0u8; if error == 0 { len as usize } else { 0 }];
    s.read_exact(&mut data).unwrap();
    (cookie, error, data)
}

/// Sends one READ of `len` bytes at `offset` with `cookie`.
fn send_read(s: &mut UnixStream, cookie: u64, offset: u64, len: u32) {
    use std::io::Write;
    let r = Request {
        flags: 0,
        kind: CMD_READ,
        cookie,
        offset,
        length: len,
    };
    s.write_all(&r.encode()).unwrap();
}

#[test]
fn a_clients_reads_that_complete_elsewhere_are_in_flight_together() {
    let state = Arc::new(RoundTrips::default());
    let path = serve_exports(Arc::new(One(state.clone())), ServerConfig::default());
    let mut s = connect(&path);
    // All on one connection: served one after the other, the first would wait for the
    // other seven forever (and fail after 10 s saying how many there were).
    send_reads(&mut s, u64::from(DEPTH), 4096);
    let mut cookies: Vec<u64> = (0..DEPTH)
        .map(|_| {
            let (cookie, error, data) = reply(&mut s, 4096);
            assert_eq!(error, 0, "read {cookie} failed");
            assert!(data.iter().enumerate().all(|(i, b)| *b == i as u8));
            cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..u64::from(DEPTH)).collect::<Vec<_>>());
    assert_eq!(state.most.load(Ordering::SeqCst), DEPTH);
}

#[test]
fn a_failed_or_wrong_sized_remote_read_is_an_error_and_the_connection_goes_on() {
    let path = serve_exports(
        Arc::new(One(Arc::new(RoundTrips::default()))),
        ServerConfig::default(),
    );
    let mut s = connect(&path);
    send_read(&mut s, 1, FAILING_AT, 4096);
    assert_eq!(reply(&mut s, 4096).1, Errno::Io as u32);
    send_read(&mut s, 2, SHORT_AT, 4096);
    assert_eq!(
        reply(&mut s, 4096).1,
        Errno::Io as u32,
        "a short answer sent as data"
    );
    // Still in sync: a read after them is answered with its data.
    send_read(&mut s, 3, 8 << 20, 4096);
    let (cookie, error, data) = reply(&mut s, 4096);
    assert_eq!((cookie, error), (3, 0));
    assert!(data.iter().enumerate().all(|(i, b)| *b == i as u8));
}
