//! The transmission phase: reads requests, checks them against the session
//! ([`proto::check`]), runs them on the device and sends the replies.
//!
//! Reads and plain writes run inline on the connection's task (they hit the page cache),
//! except on a device whose reads or writes complete elsewhere (`Device::remote_reads`,
//! `Device::remote_writes`): those are awaited on tasks of their own; anything that syncs to disk or may touch a large range runs on the blocking pool so a
//! FLUSH never stalls other connections. Replies share one buffered writer, flushed when
//! no further request is already waiting in the read buffer (batching at high queue depth).
//! Each request is admitted into the connection's [`Budget`] before its payload is read,
//! and holds its share until its reply is in the socket. With nothing buffered, the next
//! request is polled for briefly before the thread sleeps ([`poll_for_request`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::runtime::Handle;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use super::budget::{self, Budget, Buffers};
use super::negotiation::Negotiated;
use super::{drain, ServerConfig, ALLOCATION_CONTEXT_ID};
use crate::device::{Device, DeviceError, Extent};
use crate::proto::{
    self, BlockDescriptor, BlockStatus, ChunkHeader, Command, Errno, ErrorChunk, Request, Session,
    SimpleReply,
};

/// Requests at least this large run on their own task when others are queued behind them.
const PARALLEL_MIN: u32 = 64 * 1024;
/// Writes at least this large may wait for a sync (a block store writing large requests
/// in place first makes their record durable when they overwrite data), so they run on
/// the blocking pool like FLUSH, not on an async worker.
const PLACED_WRITE_MIN: u32 = 64 * 1024;

/// The connection's write half, shared by the replies of concurrent requests.
pub(super) type Writer<S> = Arc<Mutex<BufWriter<tokio::io::WriteHalf<S>>>>;

/// Serves requests until the client disconnects, leaves or falls out of sync; waits for
/// the replies still running before it returns.
pub(super) async fn transmit<R, S, D>(
    mut r: BufReader<R>,
    w: Writer<S>,
    n: Negotiated<D>,
    cfg: &ServerConfig,
    pool: &Handle,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    S: AsyncWrite + Send + 'static,
    D: Device,
{
    let device = n.device;
    let session = Session {
        size: device.size(),
        read_only: device.read_only(),
        structured: n.structured,
        allocation_context: n.allocation_context,
        max_payload: cfg.max_payload,
    };
    let budget = Budget::new(cfg.max_requests_in_flight, cfg.max_bytes_in_flight);
    let buffers = Arc::new(Buffers::new(cfg.max_bytes_in_flight));
    let mut background: JoinSet<io::Result<()>> = JoinSet::new();
    let mut poll_next = true;
    let result = loop {
        let mut head = [0u8; proto::REQUEST_LEN];
        let idle = r.buffer().is_empty().then(Instant::now);
        let polled = idle.is_some() && poll_next && !cfg.poll_for_next.is_zero();
        if polled {
            poll_for_request(&mut r, cfg.poll_for_next).await;
        }
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        if let Some(idle) = idle {
            poll_next = poll_again(polled, idle.elapsed(), cfg.poll_for_next);
        }
        let req = match Request::decode(&head) {
            Ok(req) => req,
            Err(e) => {
                tracing::info!(error = %e, "NBD client out of sync; closing its connection");
                break Ok(());
            }
        };
        // The size can grow under us (volume resize); checks use the current one.
        let session = Session {
            size: device.size(),
            ..session
        };
        let cmd = proto::check(&req, &session);
        // Admitted before its payload is read: at the budget we stop reading the socket
        // until replies drain, so the client's own sends block (TCP backpressure).
        let admitted = budget
            .admit(cmd.as_ref().map_or(0, budget::held_bytes))
            .await;
        let payload = req.payload_len();
        let mut data = Vec::new();
        if payload > 0 {
            if cmd.is_ok() {
                data.reserve_exact(payload as usize);
                let got = (&mut r)
                    .take(u64::from(payload))
                    .read_to_end(&mut data)
                    .await?;
                if got < payload as usize {
                    break Ok(()); // the client left mid-payload: nothing to apply
                }
            } else {
                // Refused: consume the payload without holding it in memory.
                drain(&mut r, u64::from(payload)).await?;
            }
        }
        let cmd = match cmd {
            Ok(c) => c,
            Err(errno) => {
                let msg = format!("request refused: {errno:?}");
                send_error(&w, &session, req.cookie, errno, &msg).await?;
                if r.buffer().is_empty() {
                    w.lock().await.flush().await?;
                }
                continue;
            }
        };
        match cmd {
            Command::Disconnect => break Ok(()),
            // Completed by peers (a replicated volume): awaited on its own task, no thread
            // held, and the next requests are read meanwhile.
            Command::Write { offset, fua, .. } if device.remote_writes() => {
                let done = device.write_remote(offset, data, fua);
                let w = w.clone();
                let cookie = req.cookie;
                background.spawn(async move {
                    let res = done.await;
                    send_done(&w, &session, cookie, res).await?;
                    let flushed = w.lock().await.flush().await;
                    drop(admitted);
                    flushed
                });
            }
            // Completed elsewhere (a store forwarding to another node's): awaited on its
            // own task, so the client's reads are in flight together.
            Command::Read { offset, len } if device.remote_reads() => {
                let done = device.read_remote(offset, len as usize);
                let w = w.clone();
                let cookie = req.cookie;
                background.spawn(async move {
                    let res = done.await;
                    send_read(&w, &session, cookie, offset, len, res).await?;
                    let flushed = w.lock().await.flush().await;
                    drop(admitted);
                    flushed
                });
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } if device.remote_reads() => {
                let done = device.extents_remote(offset, u64::from(len));
                let w = w.clone();
                let cookie = req.cookie;
                background.spawn(async move {
                    match done.await {
                        Ok(ext) => send_extents(&w, cookie, &ext, req_one).await?,
                        Err(e) => send_device_error(&w, &session, cookie, e).await?,
                    }
                    let flushed = w.lock().await.flush().await;
                    drop(admitted);
                    flushed
                });
            }
            Command::Read { .. }
            | Command::Write {
                fua: false,
                len: 0..PLACED_WRITE_MIN,
                ..
            }
            | Command::BlockStatus { .. } => {
                let big = matches!(cmd, Command::Read { len, .. } | Command::Write { len, .. } if len >= PARALLEL_MIN);
                if !big || r.buffer().is_empty() {
                    // Small requests are answered right here; replies are flushed once no
                    // further request is already buffered, so a burst shares one send.
                    fast(&*device, &w, &buffers, &session, req.cookie, cmd, data).await?;
                    if r.buffer().is_empty() {
                        w.lock().await.flush().await?;
                    }
                    drop(admitted);
                } else {
                    // Large pipelined requests (checksumming a MiB takes a while): let them
                    // run on all cores, the store's runtime's workers.
                    let (device, w, buffers) = (device.clone(), w.clone(), buffers.clone());
                    let cookie = req.cookie;
                    let run = async move {
                        fast(&*device, &w, &buffers, &session, cookie, cmd, data).await?;
                        let flushed = w.lock().await.flush().await;
                        drop(admitted);
                        flushed
                    };
                    background.spawn_on(run, pool);
                }
            }
            slow => {
                // Anything that syncs or may cover a huge range goes to the blocking pool.
                let (device, w, pool) = (device.clone(), w.clone(), pool.clone());
                let cookie = req.cookie;
                background.spawn(async move {
                    let dev = device.clone();
                    let res = pool
                        .spawn_blocking(move || run_slow(&*dev, slow, data))
                        .await
                        .unwrap_or_else(|e| {
                            Err(DeviceError::new(Errno::Io, format!("I/O task failed: {e}")))
                        });
                    send_done(&w, &session, cookie, res).await?;
                    let flushed = w.lock().await.flush().await;
                    drop(admitted);
                    flushed
                });
            }
        }
        // Reap finished background tasks so memory is freed. Their only errors are
        // replies that could not be written: the stream is broken, so stop reading
        // requests rather than run the ones still buffered for no one.
        let mut broken = None;
        while let Some(done) = background.try_join_next() {
            if let Ok(Err(e)) = done {
                broken.get_or_insert(e);
            }
        }
        if let Some(e) = broken {
            break Err(e);
        }
    };
    while let Some(done) = background.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::debug!(error = %e, "reply failed");
        }
    }
    w.lock().await.flush().await?;
    result
}

/// Polls the connection for the next request for at most `window` instead of sleeping
/// on it at once, handing the thread back to the runtime's I/O driver between polls.
/// On virtual CPUs waking a halted one costs tens of microseconds (an interrupt through
/// the host), about half a 4K read's round trip on one host: a client that sends
/// its next request within microseconds of a reply finds the thread awake.
async fn poll_for_request<R: AsyncRead + Unpin>(r: &mut BufReader<R>, window: Duration) {
    let until = Instant::now() + window;
    loop {
        let ready = std::future::poll_fn(|cx| match Pin::new(&mut *r).poll_fill_buf(cx) {
            Poll::Ready(_) => Poll::Ready(true),
            Poll::Pending => Poll::Ready(false),
        })
        .await;
        if ready || Instant::now() >= until {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Whether to poll for the request after the next reply, given whether the thread
/// polled for this one and how long after the last reply it came (`gap`). Polling goes
/// on while requests come within the window, stops after one that did not (the thread
/// slept anyway: the poll was spent for nothing), and starts again when one comes nearly
/// within it: a request that found the thread asleep also waited for its wake-up, so up
/// to twice the window. A client just outside the window thus costs at most one wasted
/// window every other request; an idle one, one window.
fn poll_again(polled: bool, gap: Duration, window: Duration) -> bool {
    if polled {
        gap <= window
    } else {
        gap <= 2 * window
    }
}

/// Reads, plain writes and block status: quick page-cache work, run on the async worker.
async fn fast<D: Device, S: AsyncWrite>(
    device: &D,
    w: &Writer<S>,
    buffers: &Buffers,
    session: &Session,
    cookie: u64,
    cmd: Command,
    data: Vec<u8>,
) -> io::Result<()> {
    match cmd {
        Command::Read { offset, len } => {
            // The reply's header and data in one buffer, the device reading straight into
            // it: one copy in (from the page cache), one send (a large reply bypasses the
            // writer's buffer), instead of a header send and a data send. The buffer is
            // one the connection used before (`Buffers`): no allocation, no zeroing.
            let head = read_reply_head(session, cookie, offset, len);
            let total = head.len() + len as usize;
            let mut buf = buffers.take(total);
            let reply = &mut buf[..total];
            reply[..head.len()].copy_from_slice(&head);
            let sent = match device.read(offset, &mut reply[head.len()..]) {
                Ok(()) => w.lock().await.write_all(reply).await,
                Err(e) => send_device_error(w, session, cookie, e).await,
            };
            buffers.give(buf);
            sent
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match device.extents(offset, u64::from(len)) {
            Ok(ext) => send_extents(w, cookie, &ext, req_one).await,
            Err(e) => send_device_error(w, session, cookie, e).await,
        },
        Command::Write { offset, fua, .. } => {
            let res = device.write_owned(offset, data, fua);
            send_done(w, session, cookie, res).await
        }
        _ => send_error(w, session, cookie, Errno::Inval, "not a fast command").await,
    }
}

fn run_slow<D: Device>(d: &D, cmd: Command, data: Vec<u8>) -> Result<(), DeviceError> {
    match cmd {
        Command::Write { offset, fua, .. } => d.write_owned(offset, data, fua),
        Command::Flush => d.flush(),
        Command::Trim { offset, len, fua } => d.trim(offset, u64::from(len), fua),
        Command::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        } => d.write_zeroes(offset, u64::from(len), no_hole, fua),
        Command::Read { .. } | Command::BlockStatus { .. } | Command::Disconnect => {
            Err(DeviceError::new(Errno::Inval, "not a slow command"))
        }
    }
}

/// Sends the reply of a read that completed elsewhere ([`Device::read_remote`]): header
/// and data under one hold of the writer, so no other reply comes between them.
async fn send_read<S: AsyncWrite>(
    w: &Writer<S>,
    session: &Session,
    cookie: u64,
    offset: u64,
    len: u32,
    res: Result<Vec<u8>, DeviceError>,
) -> io::Result<()> {
    match res {
        Ok(data) if data.len() == len as usize => {
            let head = read_reply_head(session, cookie, offset, len);
            let mut w = w.lock().await;
            w.write_all(&head).await?;
            w.write_all(&data).await
        }
        // Never a short or long reply: the client would fall out of sync.
        Ok(data) => {
            let why = format!(
                "the device answered a read of {len} bytes with {} bytes",
                data.len()
            );
            send_device_error(w, session, cookie, DeviceError::new(Errno::Io, why)).await
        }
        Err(e) => send_device_error(w, session, cookie, e).await,
    }
}

/// The header of a successful read's reply: a simple reply, or the one structured chunk
/// (`NBD_REPLY_TYPE_OFFSET_DATA`, flagged done) that carries all the data.
fn read_reply_head(s: &Session, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    if s.structured {
        proto::offset_data_head(cookie, offset, len).to_vec()
    } else {
        SimpleReply { cookie, error: 0 }.encode().to_vec()
    }
}

async fn send_done<S: AsyncWrite>(
    w: &Writer<S>,
    s: &Session,
    cookie: u64,
    res: Result<(), DeviceError>,
) -> io::Result<()> {
    match res {
        Ok(()) => {
            let mut w = w.lock().await;
            if s.structured {
                let done = ChunkHeader {
                    flags: proto::REPLY_FLAG_DONE,
                    kind: proto::REPLY_TYPE_NONE,
                    cookie,
                    length: 0,
                };
                w.write_all(&done.encode()).await
            } else {
                w.write_all(&SimpleReply { cookie, error: 0 }.encode())
                    .await
            }
        }
        Err(e) => send_device_error(w, s, cookie, e).await,
    }
}

async fn send_device_error<S: AsyncWrite>(
    w: &Writer<S>,
    s: &Session,
    cookie: u64,
    e: DeviceError,
) -> io::Result<()> {
    tracing::debug!(errno = ?e.errno, message = %e.message, "NBD request failed");
    send_error(w, s, cookie, e.errno, &e.message).await
}

async fn send_error<S: AsyncWrite>(
    w: &Writer<S>,
    s: &Session,
    cookie: u64,
    errno: Errno,
    msg: &str,
) -> io::Result<()> {
    let mut w = w.lock().await;
    if s.structured {
        let e = ErrorChunk {
            errno: errno as u32,
            message: msg.to_string(),
        };
        w.write_all(&proto::done_chunk(
            cookie,
            proto::REPLY_TYPE_ERROR,
            &e.encode(),
        ))
        .await
    } else {
        let e = SimpleReply {
            cookie,
            error: errno as u32,
        };
        w.write_all(&e.encode()).await
    }
}

async fn send_extents<S: AsyncWrite>(
    w: &Writer<S>,
    cookie: u64,
    ext: &[Extent],
    req_one: bool,
) -> io::Result<()> {
    let runs = ext
        .iter()
        .filter(|e| e.length > 0)
        .map(|e| BlockDescriptor {
            // Requests are at most 4 GiB - 1, so each run fits; clamp defensively anyway.
            length: u32::try_from(e.length).unwrap_or(!4095),
            flags: e.flags,
        });
    let status = BlockStatus {
        context: ALLOCATION_CONTEXT_ID,
        extents: runs.take(if req_one { 1 } else { usize::MAX }).collect(),
    };
    let chunk = proto::done_chunk(cookie, proto::REPLY_TYPE_BLOCK_STATUS, &status.encode());
    w.lock().await.write_all(&chunk).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_micros(50);

    #[test]
    fn polling_goes_on_only_while_it_pays() {
        // Came within the window: poll again.
        assert!(poll_again(true, Duration::from_micros(30), W));
        // Polled in vain: the next request finds the thread asleep.
        assert!(!poll_again(true, Duration::from_micros(51), W));
        // Asleep, but the request came nearly within the window (its wake-up included).
        assert!(poll_again(false, Duration::from_micros(90), W));
        // An idle or slow client: no polling.
        assert!(!poll_again(false, Duration::from_micros(101), W));
        assert!(!poll_again(false, Duration::from_secs(5), W));
    }

    #[tokio::test]
    async fn a_poll_ends_when_a_request_comes_or_the_window_passes() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut r = BufReader::new(server);
        // Nothing sent: the poll gives up after its window, having read nothing.
        let began = Instant::now();
        poll_for_request(&mut r, Duration::from_millis(20)).await;
        assert!(began.elapsed() >= Duration::from_millis(20));
        assert!(r.buffer().is_empty());
        // Bytes waiting: the poll ends with them buffered, long before its window.
        client.write_all(b"request").await.unwrap();
        let began = Instant::now();
        poll_for_request(&mut r, Duration::from_secs(30)).await;
        assert!(began.elapsed() < Duration::from_secs(5));
        assert_eq!(r.buffer(), b"request");
        // The client gone: the poll ends at once; the read that follows sees the end.
        drop(client);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        let began = Instant::now();
        poll_for_request(&mut r, Duration::from_secs(30)).await;
        assert!(began.elapsed() < Duration::from_secs(5));
    }
}
