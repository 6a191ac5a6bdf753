//! The API's HTTPS listener and its limits: TLS handshakes in their own tasks with a
//! deadline, at most [`Limits::handshaking`] of them (a new one evicts the oldest, so a
//! flood of silent TCP connections cannot keep a real client out), at most
//! [`Limits::connections`] established connections, and HTTP/1.1 served by hyper with a
//! deadline for a request's header and a bound on its size (a slow-loris client is cut
//! off). Request bodies are capped by the router (`DefaultBodyLimit`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::extract::PeerAddr;

/// The listener's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// TLS handshakes in progress at most; one more evicts the oldest.
    pub handshaking: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Established connections at most; beyond it new ones wait for one to end.
    pub connections: usize,
    /// How long a request's header may take to arrive, from the moment the connection
    /// waits for a request (idle keep-alive connections included).
    pub header_timeout: Duration,
    /// The most bytes hyper buffers for a request's header.
    pub header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshaking: 128,
            handshake_timeout: Duration::from_secs(10),
            connections: 512,
            header_timeout: Duration::from_secs(10),
            header_bytes: 64 * 1024,
        }
    }
}

/// An established connection holding its place among [`Limits::connections`].
struct Conn {
    io: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `app` over HTTPS on `tcp` until the task is dropped.
pub async fn serve(
    tcp: tokio::net::TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let places = Arc::new(Semaphore::new(limits.connections));
    let mut handshakes: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    loop {
        let (sock, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: the listener goes on once descriptors are free.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        handshakes.retain(|h| !h.is_finished());
        while handshakes.len() >= limits.handshaking {
            if let Some(oldest) = handshakes.pop_front() {
                oldest.abort();
            }
        }
        let (acceptor, places, app) = (acceptor.clone(), places.clone(), app.clone());
        let task = tokio::spawn(async move {
            let hs = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(sock)).await;
            let io = match hs {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // Waiting here for a place, the connection can still be evicted as a
            // handshake; once it has one, it is served by a task of its own.
            let Ok(place) = places.acquire_owned().await else {
                return;
            };
            tokio::spawn(serve_connection(
                Conn { io, _place: place },
                peer,
                app,
                limits,
            ));
        });
        handshakes.push_back(task.abort_handle());
    }
}

async fn serve_connection(conn: Conn, peer: SocketAddr, app: Router, limits: Limits) {
    let app = app.layer(axum::Extension(ConnectInfo(PeerAddr(peer))));
    let service = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.header_bytes.max(8192));
    // Upgrades (the VM console's WebSocket) take the connection over after the 101.
    if let Err(e) = http
        .serve_connection(TokioIo::new(conn), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}
