//! The async NBD server: accepts connections and serves each through its two phases,
//! `negotiation` (greeting and options, until the client picks an export) and
//! `transmission` (requests and replies until it disconnects). Every byte layout comes
//! from [`crate::proto`]; these modules move bytes and call the device.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};

use crate::device::{Exports, Peer};

mod budget;
mod negotiation;
mod transmission;

/// The id we give `base:allocation`, our one metadata context, in `NBD_REP_META_CONTEXT`
/// and in block status replies.
const ALLOCATION_CONTEXT_ID: u32 = 1;

/// Server limits. The defaults and why they are what they are: `docs/nbd.md`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Requests one connection may have in flight (header read, reply not yet handed to
    /// the socket); at this many the server stops reading that connection.
    pub max_requests_in_flight: u32,
    /// Bytes of WRITE payload and READ reply data one connection may hold in memory; at
    /// this many the server stops reading that connection. A single request larger than
    /// this still runs, alone.
    pub max_bytes_in_flight: u32,
    /// How long a client may take from connecting to choosing an export (TLS handshake
    /// included); then it is disconnected.
    pub negotiation_timeout: Duration,
    /// TLS every client must start (`NBD_OPT_STARTTLS`) before it may do anything else;
    /// `None` serves plain NBD.
    pub tls: Option<TlsRequired>,
    /// How long a connection keeps polling for the next request after its replies went
    /// out before its thread sleeps (zero: never polls); only while requests follow
    /// their replies within about this time.
    pub poll_for_next: Duration,
}

/// TLS that a server requires of every client before anything else (the NBD spec's
/// "forced TLS"): until the client's `NBD_OPT_STARTTLS`, every option but `NBD_OPT_ABORT`
/// is refused with `NBD_REP_ERR_TLS_REQD` and `NBD_OPT_EXPORT_NAME` ends the connection,
/// so a client without TLS learns nothing, not even the export names. Whom the handshake
/// admits (client certificates, and from which CA) is the rustls configuration's policy.
#[derive(Clone)]
pub struct TlsRequired {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsRequired {
    /// TLS with this server configuration.
    pub fn new(config: Arc<tokio_rustls::rustls::ServerConfig>) -> TlsRequired {
        TlsRequired {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        }
    }
}

impl std::fmt::Debug for TlsRequired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsRequired")
    }
}

/// A connection's byte stream, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 << 20,
            max_connections: 1024,
            max_requests_in_flight: 128,
            max_bytes_in_flight: 64 << 20,
            negotiation_timeout: Duration::from_secs(10),
            tls: None,
            poll_for_next: Duration::from_micros(50),
        }
    }
}

/// The first pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`] while
/// accepts keep failing. A listener with a connection waiting stays readable, so without
/// a pause an `EMFILE` would spin the loop.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `exports` on a TCP listener until the task is dropped. Failed accepts (such
/// as `EMFILE`) are logged and retried, never returned.
pub async fn serve_tcp<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    cfg: ServerConfig,
) -> io::Result<()> {
    accept_loop(exports, cfg, || async {
        let (sock, peer) = listener.accept().await?;
        if let Err(e) = sock.set_nodelay(true) {
            // Only latency suffers; the connection itself may be fine (or already gone).
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        // Taken off this runtime: the connection is served on a runtime of its own.
        Ok((
            sock.into_std()?,
            Peer::Tcp {
                addr: peer.to_string(),
            },
        ))
    })
    .await
}

/// Serves `exports` on a Unix socket listener until the task is dropped. Failed accepts
/// are logged and retried, never returned.
pub async fn serve_unix<E: Exports>(
    listener: UnixListener,
    exports: Arc<E>,
    cfg: ServerConfig,
) -> io::Result<()> {
    accept_loop(exports, cfg, || async {
        let (sock, _) = listener.accept().await?;
        // Taken at connect time by the kernel: who connected, not who holds the socket
        // later. Unknown only on a platform without SO_PEERCRED.
        let pid = sock
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        Ok((sock.into_std()?, Peer::Unix { pid }))
    })
    .await
}

/// Accepts connections and serves each on a runtime of its own (docs/nbd.md, "Threads"), at
/// most `max_connections` at once. A failed accept is logged and retried after a pause
/// that grows while failures last: most (`EMFILE`, `ENFILE`, `ENOBUFS`, `ECONNABORTED`)
/// pass once connections close.
async fn accept_loop<E, S, F, Fut>(
    exports: Arc<E>,
    cfg: ServerConfig,
    mut accept: F,
) -> io::Result<()>
where
    E: Exports,
    S: Movable,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<(S, Peer)>>,
{
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (sock, peer) = match accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "NBD accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let (exports, cfg) = (exports.clone(), cfg.clone());
        tokio::spawn(async move {
            serve_on_own_runtime(sock, exports, cfg, peer).await;
            drop(permit);
        });
    }
}

/// A connection accepted on the listener's runtime that can be moved to another one: its
/// socket is registered with the reactor of the runtime that serves it.
trait Movable: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// The stream, registered with the current runtime.
    fn attach(self) -> io::Result<Self::Stream>;
}

impl Movable for std::net::TcpStream {
    type Stream = tokio::net::TcpStream;
    fn attach(self) -> io::Result<tokio::net::TcpStream> {
        tokio::net::TcpStream::from_std(self)
    }
}

impl Movable for std::os::unix::net::UnixStream {
    type Stream = tokio::net::UnixStream;
    fn attach(self) -> io::Result<tokio::net::UnixStream> {
        tokio::net::UnixStream::from_std(self)
    }
}

/// In-memory streams (tests) belong to no reactor.
impl Movable for tokio::io::DuplexStream {
    type Stream = tokio::io::DuplexStream;
    fn attach(self) -> io::Result<tokio::io::DuplexStream> {
        Ok(self)
    }
}

/// A connection's own runtime: one worker thread, which waits for the connection's
/// socket itself and keeps reading its requests while the store's workers hash its large
/// reads (1M reads at QD8 measured 1.15-1.46x faster than on the shared runtime,
/// BENCHMARKS.md, "Issue #9, session 16"). Still a multi-thread
/// runtime, so a device call may `block_in_place` as on the shared one. Shut down, never
/// waited for, when dropped: also when the listener's runtime drops the task that owns
/// it.
struct ConnectionRuntime {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl ConnectionRuntime {
    fn new() -> io::Result<ConnectionRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nbd-conn")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        Ok(ConnectionRuntime {
            rt: Some(rt),
            handle,
        })
    }
}

impl Drop for ConnectionRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // A runtime may not block while dropped from async code; nothing here needs
            // waiting for: the connection's tasks are done or must stop anyway.
            rt.shutdown_background();
        }
    }
}

/// Serves one accepted connection on a [`ConnectionRuntime`]; work that must not run on
/// the connection's single worker (opening exports, large pipelined requests, syncs) goes
/// to the listener's runtime. Without a runtime of its own (no thread to be had) the
/// connection is served on the listener's runtime instead.
async fn serve_on_own_runtime<E: Exports, S: Movable>(
    sock: S,
    exports: Arc<E>,
    cfg: ServerConfig,
    peer: Peer,
) {
    let pool = tokio::runtime::Handle::current();
    let who = peer.to_string();
    let served = match ConnectionRuntime::new() {
        Ok(rt) => {
            let task = rt.handle.spawn(async move {
                let stream = sock.attach()?;
                serve_connection_on(stream, exports, cfg, &peer, pool).await
            });
            let served = task.await;
            drop(rt);
            served
        }
        Err(e) => {
            tracing::warn!(error = %e, "no runtime of its own for an NBD connection; serving it on the shared one");
            let task = async move {
                let stream = sock.attach()?;
                serve_connection_on(stream, exports, cfg, &peer, pool).await
            };
            Ok(task.await)
        }
    };
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(peer = %who, error = %e, "NBD connection ended with an error")
        }
        Err(e) => tracing::warn!(peer = %who, error = %e, "NBD connection task failed"),
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

/// Serves one connection from handshake to disconnect; a client still negotiating after
/// `cfg.negotiation_timeout` is disconnected. `peer` names it in logs
/// ([`Peer::Other`]).
pub async fn serve_connection<S, E>(
    stream: S,
    exports: Arc<E>,
    cfg: ServerConfig,
    peer: &str,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    E: Exports,
{
    let peer = Peer::Other {
        name: peer.to_string(),
        relayed: false,
    };
    serve_connection_from(stream, exports, cfg, &peer).await
}

/// Serves one connection of client `peer`, which the exports are told when it opens one
/// ([`Exports::open_for`]).
pub async fn serve_connection_from<S, E>(
    stream: S,
    exports: Arc<E>,
    cfg: ServerConfig,
    peer: &Peer,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    E: Exports,
{
    let pool = tokio::runtime::Handle::current();
    serve_connection_on(stream, exports, cfg, peer, pool).await
}

/// [`serve_connection_from`], with `pool` the runtime that opens exports and runs what
/// may take a core or block (the store's; the connection may run on one of its own).
async fn serve_connection_on<S, E>(
    stream: S,
    exports: Arc<E>,
    cfg: ServerConfig,
    peer: &Peer,
    pool: tokio::runtime::Handle,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    E: Exports,
{
    let deadline = tokio::time::Instant::now() + cfg.negotiation_timeout;
    let late = || {
        tracing::info!(%peer, timeout = ?cfg.negotiation_timeout, "NBD client did not finish negotiating in time; closing");
    };
    let (stream, greeted): (Box<dyn Stream>, Option<bool>) = match &cfg.tls {
        None => (Box::new(stream), None),
        Some(tls) => match tokio::time::timeout_at(deadline, start_tls(stream, tls, peer)).await {
            Err(_) => {
                late();
                return Ok(());
            }
            Ok(Ok(Some((stream, no_zeroes)))) => (Box::new(stream), Some(no_zeroes)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        },
    };
    let (r, w) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(256 * 1024, r);
    let mut writer = BufWriter::with_capacity(256 * 1024, w);
    let negotiated = tokio::time::timeout_at(
        deadline,
        negotiation::negotiate(
            &mut reader,
            &mut writer,
            &exports,
            &pool,
            &cfg,
            greeted,
            peer,
        ),
    )
    .await;
    let Ok(negotiated) = negotiated else {
        late();
        return Ok(());
    };
    let Some(n) = negotiated? else {
        return Ok(());
    };
    tracing::debug!(%peer, structured = n.structured, tls = greeted.is_some(), "NBD client entered transmission");
    transmission::transmit(reader, Arc::new(Mutex::new(writer)), n, &cfg, &pool).await
}

/// The plain part of a connection that must start TLS: greeting and options up to the
/// client's `NBD_OPT_STARTTLS`, then the handshake. Returns the TLS stream and whether the
/// client asked for no zeroes in the greeting, or `None` when the client left, was
/// refused or failed the handshake (logged).
async fn start_tls<S>(
    stream: S,
    tls: &TlsRequired,
    peer: &Peer,
) -> io::Result<Option<(tokio_rustls::server::TlsStream<S>, bool)>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    // Unbuffered: nothing of the client's TLS handshake may be read before it starts.
    let (mut r, mut w) = tokio::io::split(stream);
    let Some(no_zeroes) = negotiation::before_tls(&mut r, &mut w, &peer.to_string()).await? else {
        return Ok(None);
    };
    match tls.acceptor.accept(r.unsplit(w)).await {
        Ok(s) => Ok(Some((s, no_zeroes))),
        Err(e) => {
            tracing::info!(%peer, error = %e, "NBD client failed the TLS handshake (no client certificate, or not one of ours?); closing");
            Ok(None)
        }
    }
}

/// Reads and discards `n` bytes: payloads we refuse must still leave the stream in sync.
async fn drain<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::device::{Device, DeviceError, ExportEntry, Extent};

    /// No exports at all: enough to greet a client.
    struct Nothing;

    impl Device for Nothing {
        fn size(&self) -> u64 {
            0
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn extents(&self, _: u64, _: u64) -> Result<Vec<Extent>, DeviceError> {
            Ok(Vec::new())
        }
    }

    impl Exports for Nothing {
        type Device = Nothing;
        fn list(&self) -> Vec<ExportEntry> {
            Vec::new()
        }
        fn open(&self, _: &str) -> Result<Option<Arc<Nothing>>, DeviceError> {
            Ok(None)
        }
    }

    #[tokio::test]
    async fn the_listener_keeps_accepting_after_accept_errors() {
        let (client, server) = tokio::io::duplex(4096);
        let mut server = Some(server);
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let accept = move || {
            let call = seen.fetch_add(1, Ordering::SeqCst);
            let next = server.take_if(|_| call >= 3);
            async move {
                match next {
                    Some(s) => Ok((
                        s,
                        Peer::Other {
                            name: "test".to_string(),
                            relayed: false,
                        },
                    )),
                    // The first three accepts fail as with too many open files.
                    None if call < 3 => Err(io::Error::from_raw_os_error(24)),
                    None => std::future::pending::<io::Result<(DuplexStream, Peer)>>().await,
                }
            }
        };
        let listener = tokio::spawn(accept_loop(
            Arc::new(Nothing),
            ServerConfig::default(),
            accept,
        ));
        let mut client = client;
        let mut greeting = [0u8; 18];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut greeting))
            .await
            .expect("greeted after the failed accepts")
            .expect("read the greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert!(
            calls.load(Ordering::SeqCst) >= 4,
            "three failed accepts, then the one that served"
        );
        assert!(!listener.is_finished(), "the accept loop is still running");
        listener.abort();
    }
}
