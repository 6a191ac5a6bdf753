//! The async NBD server: handshake, then the transmission loop of one connection.
//!
//! Reads and plain writes run inline on the connection's task (they hit the page cache);
//! anything that syncs to disk or may touch a large range runs on the blocking pool so a
//! FLUSH never stalls other connections. Replies share one buffered writer, flushed when
//! no further request is already waiting in the read buffer (batching at high queue depth).

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::device::{Device, DeviceError, Exports};
use crate::proto::{self, Command, Errno, Request, Session};

/// Server limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 << 20,
            max_connections: 1024,
        }
    }
}

/// Minimum and preferred block size we advertise. Any alignment works (the store merges
/// partial blocks); 4 KiB is preferred because that is the store's block.
const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;
/// Requests at least this large run on their own task when others are queued behind them.
const PARALLEL_MIN: u32 = 64 * 1024;
/// Option payloads up to this are drained when refused as too big; larger, we hang up.
const MAX_DRAIN: u32 = 16 << 20;

/// Serves `exports` on a TCP listener until the task is dropped.
pub async fn serve_tcp<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    cfg: ServerConfig,
) -> io::Result<()> {
    accept_loop(exports, cfg, || async {
        let (sock, peer) = listener.accept().await?;
        sock.set_nodelay(true)?;
        Ok((sock, peer.to_string()))
    })
    .await
}

/// Serves `exports` on a Unix socket listener until the task is dropped.
pub async fn serve_unix<E: Exports>(
    listener: UnixListener,
    exports: Arc<E>,
    cfg: ServerConfig,
) -> io::Result<()> {
    accept_loop(exports, cfg, || async {
        let (sock, _) = listener.accept().await?;
        Ok((sock, "unix".to_string()))
    })
    .await
}

/// Accepts connections and serves each on its own task, at most `max_connections` at once.
async fn accept_loop<E, S, F, Fut>(
    exports: Arc<E>,
    cfg: ServerConfig,
    mut accept: F,
) -> io::Result<()>
where
    E: Exports,
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<(S, String)>>,
{
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (sock, peer) = accept().await?;
        let (exports, cfg) = (exports.clone(), cfg.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_connection(sock, exports, cfg, &peer).await {
                tracing::debug!(%peer, error = %e, "NBD connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Binds a Unix socket, replacing a stale socket file.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

type Writer<S> = Arc<Mutex<BufWriter<tokio::io::WriteHalf<S>>>>;

/// What negotiation ended with.
struct Negotiated<D> {
    device: Arc<D>,
    structured: bool,
    allocation_context: bool,
}

/// Serves one connection from handshake to disconnect.
pub async fn serve_connection<S, E>(
    stream: S,
    exports: Arc<E>,
    cfg: ServerConfig,
    peer: &str,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    E: Exports,
{
    let (r, w) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(256 * 1024, r);
    let mut writer = BufWriter::with_capacity(256 * 1024, w);
    let Some(n) = negotiate(&mut reader, &mut writer, &*exports, &cfg).await? else {
        return Ok(());
    };
    tracing::debug!(%peer, structured = n.structured, "NBD client entered transmission");
    transmit(reader, Arc::new(Mutex::new(writer)), n, &cfg).await
}

async fn negotiate<R, W, E>(
    r: &mut R,
    w: &mut W,
    exports: &E,
    cfg: &ServerConfig,
) -> io::Result<Option<Negotiated<E::Device>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Exports,
{
    w.write_all(&proto::NBD_MAGIC.to_be_bytes()).await?;
    w.write_all(&proto::IHAVEOPT.to_be_bytes()).await?;
    w.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        tracing::info!(
            client_flags,
            "NBD client sent unknown handshake flags; closing"
        );
        return Ok(None);
    }
    let no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut context: Option<String> = None; // export the allocation context was set for

    loop {
        let magic = r.read_u64().await?;
        if magic != proto::IHAVEOPT {
            tracing::info!(magic, "bad option magic from NBD client; closing");
            return Ok(None);
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > proto::MAX_OPTION_LEN {
            if len > MAX_DRAIN {
                tracing::info!(len, "oversized NBD option; closing");
                return Ok(None);
            }
            drain(r, u64::from(len)).await?;
            reply_err(w, opt, proto::REP_ERR_TOO_BIG, "option payload too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            proto::OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else {
                    return Ok(None);
                };
                let Some(device) = open(exports, &name)? else {
                    tracing::info!(export = %name, "NBD client asked for an unknown export; closing");
                    return Ok(None);
                };
                w.write_all(&device.size().to_be_bytes()).await?;
                w.write_all(&transmission_flags(&*device).to_be_bytes())
                    .await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                let allocation_context = context.as_deref() == Some(name.as_str());
                return Ok(Some(Negotiated {
                    device,
                    structured,
                    allocation_context,
                }));
            }
            proto::OPT_ABORT => {
                reply(w, opt, proto::REP_ACK, &[]).await?;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    reply_err(w, opt, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for e in exports.list() {
                    let mut p = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(e.name.as_bytes());
                    p.extend_from_slice(e.description.as_bytes());
                    reply(w, opt, proto::REP_SERVER, &p).await?;
                }
                reply(w, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_STARTTLS => {
                reply_err(
                    w,
                    opt,
                    proto::REP_ERR_POLICY,
                    "TLS is not configured on this server",
                )
                .await?;
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                reply(w, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let req = match proto::parse_go(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        reply_err(w, opt, proto::REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let Some(device) = open(exports, &req.name)? else {
                    let msg = format!("no export named {:?}", req.name);
                    reply_err(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&device.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(&*device).to_be_bytes());
                reply(w, opt, proto::REP_INFO, &info).await?;
                // Our constraints are permissive, so sending them unasked binds no one.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs.extend_from_slice(&cfg.max_payload.to_be_bytes());
                reply(w, opt, proto::REP_INFO, &bs).await?;
                if req.info.contains(&proto::INFO_NAME) {
                    let mut p = proto::INFO_NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(req.name.as_bytes());
                    reply(w, opt, proto::REP_INFO, &p).await?;
                }
                if req.info.contains(&proto::INFO_DESCRIPTION) {
                    if let Some(d) = exports.describe(&req.name) {
                        let mut p = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
                        p.extend_from_slice(d.as_bytes());
                        reply(w, opt, proto::REP_INFO, &p).await?;
                    }
                }
                reply(w, opt, proto::REP_ACK, &[]).await?;
                if opt == proto::OPT_GO {
                    let allocation_context = context.as_deref() == Some(req.name.as_str());
                    return Ok(Some(Negotiated {
                        device,
                        structured,
                        allocation_context,
                    }));
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                if set && !structured {
                    reply_err(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "structured replies must be negotiated first",
                    )
                    .await?;
                    continue;
                }
                let req = match proto::parse_meta(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        reply_err(w, opt, proto::REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                if open(exports, &req.export)?.is_none() {
                    let msg = format!("no export named {:?}", req.export);
                    reply_err(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                }
                let selected = if req.queries.is_empty() {
                    !set
                } else {
                    req.queries.iter().any(|q| proto::query_matches(q, !set))
                };
                if set {
                    context = selected.then(|| req.export.clone());
                }
                if selected {
                    let mut p = 1u32.to_be_bytes().to_vec();
                    p.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    reply(w, opt, proto::REP_META_CONTEXT, &p).await?;
                }
                reply(w, opt, proto::REP_ACK, &[]).await?;
            }
            _ => {
                reply_err(w, opt, proto::REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

fn open<E: Exports>(exports: &E, name: &str) -> io::Result<Option<Arc<E::Device>>> {
    exports
        .open(name)
        .map_err(|e| io::Error::other(format!("opening export {name}: {}", e.message)))
}

fn transmission_flags<D: Device>(d: &D) -> u16 {
    let mut f = proto::TF_HAS_FLAGS
        | proto::TF_SEND_FLUSH
        | proto::TF_SEND_FUA
        | proto::TF_SEND_DF
        | proto::TF_CAN_MULTI_CONN;
    if d.read_only() {
        f |= proto::TF_READ_ONLY;
    } else {
        f |= proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES | proto::TF_SEND_FAST_ZERO;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    w.write_all(&proto::option_reply(opt, kind, data.len() as u32))
        .await?;
    w.write_all(data).await?;
    w.flush().await
}

async fn reply_err<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> io::Result<()> {
    reply(w, opt, kind, msg.as_bytes()).await
}

async fn drain<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn transmit<R, S, D>(
    mut r: BufReader<R>,
    w: Writer<S>,
    n: Negotiated<D>,
    cfg: &ServerConfig,
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
    let mut background: JoinSet<io::Result<()>> = JoinSet::new();
    let result = loop {
        let mut head = [0u8; proto::REQUEST_LEN];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
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
            Command::Read { .. }
            | Command::Write { fua: false, .. }
            | Command::BlockStatus { .. } => {
                let big = matches!(cmd, Command::Read { len, .. } | Command::Write { len, .. } if len >= PARALLEL_MIN);
                if !big || r.buffer().is_empty() {
                    // Small requests are answered right here; replies are flushed once no
                    // further request is already buffered, so a burst shares one send.
                    fast(&*device, &w, &session, req.cookie, cmd, data).await?;
                    if r.buffer().is_empty() {
                        w.lock().await.flush().await?;
                    }
                } else {
                    // Large pipelined requests (checksumming a MiB takes a while): let them
                    // run on all cores.
                    let (device, w) = (device.clone(), w.clone());
                    let cookie = req.cookie;
                    background.spawn(async move {
                        fast(&*device, &w, &session, cookie, cmd, data).await?;
                        w.lock().await.flush().await
                    });
                }
            }
            slow => {
                // Anything that syncs or may cover a huge range goes to the blocking pool.
                let (device, w) = (device.clone(), w.clone());
                let cookie = req.cookie;
                background.spawn(async move {
                    let dev = device.clone();
                    let res = tokio::task::spawn_blocking(move || run_slow(&*dev, slow, data))
                        .await
                        .unwrap_or_else(|e| {
                            Err(DeviceError::new(Errno::Io, format!("I/O task failed: {e}")))
                        });
                    send_done(&w, &session, cookie, res).await?;
                    w.lock().await.flush().await
                });
            }
        }
        // Reap finished background tasks so their errors surface and memory is freed.
        while let Some(done) = background.try_join_next() {
            if let Ok(Err(e)) = done {
                tracing::debug!(error = %e, "reply failed");
            }
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

/// Reads, plain writes and block status: quick page-cache work, run on the async worker.
async fn fast<D: Device, S: AsyncWrite>(
    device: &D,
    w: &Writer<S>,
    session: &Session,
    cookie: u64,
    cmd: Command,
    data: Vec<u8>,
) -> io::Result<()> {
    match cmd {
        Command::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            match device.read(offset, &mut buf) {
                Ok(()) => send_read(w, session, cookie, offset, &buf).await,
                Err(e) => send_device_error(w, session, cookie, e).await,
            }
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

async fn send_read<S: AsyncWrite>(
    w: &Writer<S>,
    s: &Session,
    cookie: u64,
    offset: u64,
    buf: &[u8],
) -> io::Result<()> {
    let mut w = w.lock().await;
    if s.structured {
        w.write_all(&proto::chunk_header(
            cookie,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            8 + buf.len() as u32,
        ))
        .await?;
        w.write_all(&offset.to_be_bytes()).await?;
    } else {
        w.write_all(&proto::simple_reply(cookie, 0)).await?;
    }
    w.write_all(buf).await
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
                w.write_all(&proto::chunk_header(
                    cookie,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_NONE,
                    0,
                ))
                .await
            } else {
                w.write_all(&proto::simple_reply(cookie, 0)).await
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
        w.write_all(&proto::structured_error(cookie, errno as u32, msg))
            .await
    } else {
        w.write_all(&proto::simple_reply(cookie, errno as u32))
            .await
    }
}

async fn send_extents<S: AsyncWrite>(
    w: &Writer<S>,
    cookie: u64,
    ext: &[crate::device::Extent],
    req_one: bool,
) -> io::Result<()> {
    let mut body = Vec::with_capacity(4 + ext.len() * 8);
    body.extend_from_slice(&1u32.to_be_bytes());
    for e in ext.iter().filter(|e| e.length > 0) {
        // Requests are at most 4 GiB - 1, so each run fits; clamp defensively anyway.
        let len = u32::try_from(e.length).unwrap_or(!4095);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&e.flags.to_be_bytes());
        if req_one {
            break;
        }
    }
    let mut w = w.lock().await;
    w.write_all(&proto::chunk_header(
        cookie,
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_BLOCK_STATUS,
        body.len() as u32,
    ))
    .await?;
    w.write_all(&body).await
}
