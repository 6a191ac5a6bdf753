//! The NBD client behind a VM's disk: many requests in flight on one connection, a
//! deadline per request, reconnection when the server goes away, and optional TLS.
//!
//! Requests are written as they come and their simple replies matched by cookie, so a
//! guest's overlapping reads and writes overlap on the wire too. When the connection
//! breaks (the local `tessera-store` restarts, say), requests are not failed: they wait,
//! the client reconnects with backoff, and sends them again. Every request still fails,
//! with [`ClientError::Timeout`], once its deadline passes, whether the server is gone or
//! connected but silent; a request that times out on a live connection also drops that
//! connection, since a server that does not answer is not trusted with the next one.
//!
//! The connection runs on its own thread (a single-threaded tokio runtime); callers block
//! on their own request only, from any number of threads.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::client::ClientError;
use crate::client_negotiation::{client_flags, reply_body_len, GoReplies, Opened};
use crate::proto::{
    self, GoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply, GREETING_LEN,
    OPTION_REPLY_LEN, SIMPLE_REPLY_LEN,
};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket.
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

/// TLS for the connection: `NBD_OPT_STARTTLS`, then rustls with this configuration,
/// checking the server's certificate against `server_name`.
#[derive(Clone)]
pub struct Tls {
    /// The rustls client configuration (trusted CA, client certificate).
    pub config: Arc<ClientConfig>,
    /// The name the server's certificate must hold (a DNS name or an IP address).
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// x509 credentials from PEM files: the CA that signed the server's certificate, and
    /// this client's certificate and private key (libnbd's `ca-cert.pem`,
    /// `client-cert.pem`, `client-key.pem`). TLS 1.3 only.
    pub fn from_pem_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        server_name: &str,
    ) -> Result<Tls, ClientError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| ClientError::Tls(format!("reading {}: {e}", p.display())))
        };
        let bad =
            |p: &Path, e: &dyn std::fmt::Display| ClientError::Tls(format!("{}: {e}", p.display()));
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read(ca)?) {
            roots
                .add(c.map_err(|e| bad(ca, &e))?)
                .map_err(|e| bad(ca, &e))?;
        }
        if roots.is_empty() {
            return Err(bad(ca, &"no CA certificate"));
        }
        let chain: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&read(cert)?).collect();
        let chain = chain.map_err(|e| bad(cert, &e))?;
        if chain.is_empty() {
            return Err(bad(cert, &"no certificate"));
        }
        let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| bad(key, &e))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Tls(format!("server name {server_name:?}: {e}")))?;
        Ok(Tls {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// What to connect to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The server.
    pub endpoint: Endpoint,
    /// The export's name, possibly with a credential (`crate::export_name`), which logs
    /// never show.
    pub export: String,
    /// TLS, required when set (the connection fails rather than continue in plain text).
    pub tls: Option<Tls>,
}

/// How long things may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From a request's submission to its reply, reconnections included.
    pub request: Duration,
    /// One connection attempt (connect, TLS, handshake).
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            request: Duration::from_secs(30),
            connect: Duration::from_secs(5),
        }
    }
}

/// First wait between reconnection attempts; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// A request as the connection task keeps it until its reply.
struct Job {
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
    deadline: Instant,
    /// Whether it was written on the connection now live.
    sent: bool,
    /// For a flush: the writes acknowledged when it was sent (it covers those).
    covers: u64,
    reply: oneshot::Sender<Result<Vec<u8>, ClientError>>,
}

/// What the reply reader tells the connection task.
enum Event {
    Reply {
        epoch: u64,
        cookie: u64,
        result: Result<Vec<u8>, ClientError>,
    },
    Broken {
        epoch: u64,
        why: String,
    },
}

trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

type Stream = Box<dyn AsyncStream>;

/// A live connection: its write half, and the read lengths its reader expects by cookie.
struct Live {
    epoch: u64,
    writer: WriteHalf<Stream>,
    expect: Arc<Mutex<HashMap<u64, u32>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A pipelined, reconnecting NBD client. Cheap to share: every method takes `&self`.
pub struct PipelinedClient {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    size: u64,
    flags: u16,
    timeouts: Timeouts,
    thread: Option<JoinHandle<()>>,
}

impl PipelinedClient {
    /// Connects (the first connection must succeed within `timeouts.connect`) and starts
    /// the connection thread.
    pub fn connect(target: Target, timeouts: Timeouts) -> Result<PipelinedClient, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let first = rt.block_on(async {
            tokio::time::timeout(timeouts.connect, connect(&target))
                .await
                .map_err(|_| ClientError::Timeout)?
        })?;
        let (size, flags) = (first.size, first.flags);
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || rt.block_on(run(target, timeouts, first, rx)))?;
        Ok(PipelinedClient {
            jobs: Some(tx),
            size,
            flags,
            timeouts,
            thread: Some(thread),
        })
    }

    /// Export size in bytes (of the first connection; a reconnection to an export of
    /// another size fails).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags of the first connection.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn call(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            kind,
            flags,
            offset,
            length,
            payload,
            deadline: Instant::now() + self.timeouts.request,
            sent: false,
            covers: 0,
            reply: tx,
        };
        let jobs = self.jobs.as_ref().ok_or(ClientError::Closed)?;
        jobs.send(job).map_err(|_| ClientError::Closed)?;
        rx.blocking_recv().map_err(|_| ClientError::Closed)?
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.call(proto::CMD_READ, 0, offset, len, Vec::new())
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("request longer than 4 GiB".into()))?;
        self.call(proto::CMD_WRITE, flags, offset, len, data)
            .map(drop)
    }

    /// Flushes.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.call(proto::CMD_FLUSH, 0, 0, 0, Vec::new()).map(drop)
    }

    /// Discards a range.
    pub fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(proto::CMD_TRIM, 0, offset, len, Vec::new())
            .map(drop)
    }

    /// Zeroes a range.
    pub fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<(), ClientError> {
        let flags = if no_hole { proto::CMD_FLAG_NO_HOLE } else { 0 };
        self.call(proto::CMD_WRITE_ZEROES, flags, offset, len, Vec::new())
            .map(drop)
    }
}

impl Drop for PipelinedClient {
    fn drop(&mut self) {
        // Closing the queue ends the connection task once it has seen every request.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection in the transmission phase.
struct Connected {
    stream: Stream,
    size: u64,
    flags: u16,
}

async fn open(endpoint: &Endpoint) -> io::Result<Stream> {
    Ok(match endpoint {
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
        Endpoint::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    })
}

async fn option_reply(s: &mut Stream) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut rh = [0u8; OPTION_REPLY_LEN];
    s.read_exact(&mut rh).await?;
    let reply = OptionReplyHeader::decode(&rh)?;
    let mut body = vec![0u8; reply_body_len(&reply)?];
    s.read_exact(&mut body).await?;
    Ok((reply, body))
}

/// Connects and negotiates: fixed newstyle, `NBD_OPT_STARTTLS` when TLS is wanted, then
/// `NBD_OPT_GO` for the export.
async fn connect(target: &Target) -> Result<Connected, ClientError> {
    let mut s = open(&target.endpoint).await?;
    let mut head = [0u8; GREETING_LEN];
    s.read_exact(&mut head).await?;
    s.write_all(&client_flags(&head)?.to_be_bytes()).await?;
    if let Some(tls) = &target.tls {
        s.write_all(&OptionHeader::with_payload(proto::OPT_STARTTLS, &[]))
            .await?;
        let (reply, body) = option_reply(&mut s).await?;
        if reply.is_error() || reply.kind != proto::REP_ACK {
            return Err(ClientError::Refused {
                option: proto::OPT_STARTTLS,
                reply: reply.kind,
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let t = connector
            .connect(tls.server_name.clone(), s)
            .await
            .map_err(|e| ClientError::Tls(format!("handshake: {e}")))?;
        s = Box::new(t);
    }
    let go = GoRequest {
        name: target.export.clone(),
        info: Vec::new(),
    };
    s.write_all(&OptionHeader::with_payload(proto::OPT_GO, &go.encode()))
        .await?;
    let mut replies = GoReplies::default();
    let Opened { size, flags } = loop {
        let (reply, body) = option_reply(&mut s).await?;
        if let Some(opened) = replies.on_reply(&reply, &body)? {
            break opened;
        }
    };
    Ok(Connected {
        stream: s,
        size,
        flags,
    })
}

/// Reads simple replies until the connection ends or breaks the protocol.
async fn read_replies(
    mut r: ReadHalf<Stream>,
    epoch: u64,
    expect: Arc<Mutex<HashMap<u64, u32>>>,
    events: mpsc::UnboundedSender<Event>,
) {
    let why = loop {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        if let Err(e) = r.read_exact(&mut h).await {
            break format!("reading a reply: {e}");
        }
        let reply = match SimpleReply::decode(&h) {
            Ok(r) => r,
            Err(e) => break format!("bad reply: {e}"),
        };
        let len = match expect.lock() {
            Ok(mut m) => m.remove(&reply.cookie),
            Err(_) => break "reply table poisoned".into(),
        };
        let Some(len) = len else {
            break format!("reply for unknown cookie {}", reply.cookie);
        };
        let result = if reply.error != 0 {
            Err(ClientError::Errno(reply.error))
        } else {
            let mut data = vec![0u8; len as usize];
            if let Err(e) = r.read_exact(&mut data).await {
                break format!("reading reply data: {e}");
            }
            Ok(data)
        };
        let cookie = reply.cookie;
        if events
            .send(Event::Reply {
                epoch,
                cookie,
                result,
            })
            .is_err()
        {
            return;
        }
    };
    let _ = events.send(Event::Broken { epoch, why });
}

/// The connection task: owns every request until its reply or deadline.
async fn run(
    target: Target,
    timeouts: Timeouts,
    first: Connected,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut pending: HashMap<u64, Job> = HashMap::new();
    let mut next_cookie: u64 = 1;
    let mut epoch: u64 = 0;
    let size = first.size;
    let mut live = Some(go_live(first, epoch, &events_tx));
    let mut backoff = MIN_BACKOFF;
    let mut next_attempt = Instant::now();
    let mut open_queue = true;
    let mut durability = Durability::default();
    loop {
        if !open_queue && pending.is_empty() {
            return;
        }
        if live.is_none() && !pending.is_empty() && Instant::now() >= next_attempt {
            let earliest = pending.values().map(|j| j.deadline).min();
            let limit = earliest.map_or(timeouts.connect, |d| {
                timeouts
                    .connect
                    .min(d.saturating_duration_since(Instant::now()))
            });
            match tokio::time::timeout(limit, connect(&target)).await {
                Ok(Ok(c)) if c.size == size => {
                    epoch += 1;
                    tracing::info!(
                        export = crate::export_name::shown(&target.export),
                        "NBD connection re-established; re-sending {} requests",
                        pending.len()
                    );
                    let mut l = go_live(c, epoch, &events_tx);
                    backoff = MIN_BACKOFF;
                    let mut ok = true;
                    for (cookie, job) in pending.iter_mut() {
                        job.sent = false;
                        if send(&mut l, *cookie, job).await.is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        live = Some(l);
                    }
                }
                Ok(Ok(c)) => {
                    tracing::warn!(
                        export = crate::export_name::shown(&target.export),
                        was = size,
                        now = c.size,
                        "NBD export changed size; not reconnecting to it"
                    );
                }
                Ok(Err(e)) => {
                    tracing::debug!(export = crate::export_name::shown(&target.export), error = %e, "NBD reconnection failed")
                }
                Err(_) => tracing::debug!(
                    export = crate::export_name::shown(&target.export),
                    "NBD reconnection timed out"
                ),
            }
            if live.is_none() {
                next_attempt = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            continue;
        }
        let earliest = pending.values().map(|j| j.deadline).min();
        let expiry = async {
            match earliest {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let retry_at = (live.is_none() && !pending.is_empty()).then_some(next_attempt);
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            job = jobs.recv(), if open_queue => {
                let Some(mut job) = job else {
                    open_queue = false;
                    continue;
                };
                job.covers = durability.acked_writes;
                let cookie = next_cookie;
                next_cookie += 1;
                if let Some(l) = live.as_mut() {
                    if let Err(why) = send(l, cookie, &mut job).await {
                        tracing::warn!(export = crate::export_name::shown(&target.export), %why, "NBD connection lost; requests wait for a reconnection");
                        live = None;
                        durability.connection_lost();
                    }
                }
                pending.insert(cookie, job);
            }
            ev = events.recv() => match ev {
                Some(Event::Reply { epoch: e, cookie, result }) if e == epoch => {
                    if let Some(job) = pending.remove(&cookie) {
                        let result = durability.answered(&job, result);
                        let _ = job.reply.send(result);
                    }
                }
                Some(Event::Broken { epoch: e, why }) if e == epoch && live.is_some() => {
                    tracing::warn!(export = crate::export_name::shown(&target.export), %why, "NBD connection lost; requests wait for a reconnection");
                    live = None;
                    durability.connection_lost();
                    next_attempt = Instant::now();
                }
                _ => {}
            },
            () = expiry => {
                let now = Instant::now();
                let expired: Vec<u64> = pending
                    .iter()
                    .filter(|(_, j)| j.deadline <= now)
                    .map(|(c, _)| *c)
                    .collect();
                let jobs: Vec<_> = expired.iter().filter_map(|c| pending.remove(c)).collect();
                // Logged before any caller hears of the timeout: a caller may act on it at
                // once (a guest that sees EIO and resets ends the VMM), and the log must
                // still say why.
                if live.is_some() && jobs.iter().any(|j| j.sent) {
                    tracing::warn!(export = crate::export_name::shown(&target.export), "NBD server did not answer a request in time; reconnecting");
                    live = None;
                    durability.connection_lost();
                }
                for job in jobs {
                    let _ = job.reply.send(Err(ClientError::Timeout));
                }
            }
            () = retry => {}
        }
    }
}

/// What a flush may promise after the connection was lost. A server that crashed may have
/// lost writes it acknowledged but had not made durable; they are not re-sent (they were
/// answered), so the next flush fails with `EIO` instead of vouching for them.
#[derive(Default)]
struct Durability {
    /// Writes (and trims, zeroings) acknowledged so far.
    acked_writes: u64,
    /// Acknowledged writes the last successful flush did not cover.
    unflushed: bool,
    /// A connection was lost while `unflushed`: the next flush must fail.
    lost: bool,
}

impl Durability {
    fn answered(
        &mut self,
        job: &Job,
        result: Result<Vec<u8>, ClientError>,
    ) -> Result<Vec<u8>, ClientError> {
        match job.kind {
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES if result.is_ok() => {
                self.acked_writes += 1;
                if job.flags & proto::CMD_FLAG_FUA == 0 {
                    self.unflushed = true;
                }
                result
            }
            proto::CMD_FLUSH if result.is_ok() => {
                if self.lost {
                    self.lost = false;
                    tracing::warn!("NBD flush failed: the server was lost with acknowledged writes not yet flushed");
                    return Err(ClientError::Errno(5));
                }
                if job.covers == self.acked_writes {
                    self.unflushed = false;
                }
                result
            }
            _ => result,
        }
    }

    fn connection_lost(&mut self) {
        if self.unflushed {
            self.lost = true;
            self.unflushed = false;
        }
    }
}

fn go_live(c: Connected, epoch: u64, events: &mpsc::UnboundedSender<Event>) -> Live {
    let (r, w) = tokio::io::split(c.stream);
    let expect = Arc::new(Mutex::new(HashMap::new()));
    let reader = tokio::spawn(read_replies(r, epoch, expect.clone(), events.clone()));
    Live {
        epoch,
        writer: w,
        expect,
        reader,
    }
}

/// Writes one request; an error means the connection is unusable.
async fn send(l: &mut Live, cookie: u64, job: &mut Job) -> Result<(), String> {
    let read_len = if job.kind == proto::CMD_READ {
        job.length
    } else {
        0
    };
    l.expect
        .lock()
        .map_err(|_| "reply table poisoned".to_string())?
        .insert(cookie, read_len);
    let req = Request {
        flags: job.flags,
        kind: job.kind,
        cookie,
        offset: job.offset,
        length: job.length,
    };
    let write = async {
        l.writer.write_all(&req.encode()).await?;
        l.writer.write_all(&job.payload).await?;
        l.writer.flush().await
    };
    match tokio::time::timeout_at(job.deadline, write).await {
        Ok(Ok(())) => {
            job.sent = true;
            Ok(())
        }
        Ok(Err(e)) => Err(format!("epoch {}: writing a request: {e}", l.epoch)),
        Err(_) => Err(format!("epoch {}: writing a request timed out", l.epoch)),
    }
}
