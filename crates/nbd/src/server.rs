//! The async NBD server: accepts connections and serves each through its two phases,
//! `negotiation` (greeting and options, until the client picks an export) and
//! `transmission` (requests and replies until it disconnects). Every byte layout comes
//! from [`crate::proto`]; these modules move bytes and call the device.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};

use crate::device::Exports;

mod negotiation;
mod transmission;

/// The id we give `base:allocation`, our one metadata context, in `NBD_REP_META_CONTEXT`
/// and in block status replies.
const ALLOCATION_CONTEXT_ID: u32 = 1;

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
    let Some(n) = negotiation::negotiate(&mut reader, &mut writer, &*exports, &cfg).await? else {
        return Ok(());
    };
    tracing::debug!(%peer, structured = n.structured, "NBD client entered transmission");
    transmission::transmit(reader, Arc::new(Mutex::new(writer)), n, &cfg).await
}

/// Reads and discards `n` bytes: payloads we refuse must still leave the stream in sync.
async fn drain<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
