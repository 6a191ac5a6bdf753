//! The client side of the network: TLS (or plain TCP) connections to peers, kept in a
//! pool and reused one request at a time, the typed calls this node makes (forwarded
//! writes, read indexes, joins, removals) and enrollment.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use tessera_pki::NodeCredentials;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::TcpStream;

use super::auth::{now_ms, EnrollReply, EnrollRequest, JoinRequest};
use super::rpc::{RemovedAnswer, Reply, Rpc, MAX_RPC};
use super::{cert_name, NodeId};
use crate::types::{Applied, Command};

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No whole answer within the time allowed.
    #[error("{addr} did not answer in time")]
    Timeout {
        /// The peer's address.
        addr: String,
    },
    /// The peer took the connection and then closed it without a whole answer: how a
    /// server turns away a caller it does not serve (no cluster certificate, or the
    /// certificate of a removed member), or a peer stopping mid-request.
    #[error("{addr}: the peer closed the connection without a whole answer")]
    Hangup {
        /// The peer's address.
        addr: String,
    },
    /// A forwarded write was sent whole on a kept connection, which then broke before
    /// the answer: the peer may have applied it. It is not sent again (see
    /// [`Rpc::resendable`]); the caller learns that the outcome is unknown.
    #[error("{addr}: the connection broke after the write was sent; it may have been applied (not sent again, so it cannot apply twice): {source}")]
    Unanswered {
        /// The peer's address.
        addr: String,
        /// How the connection broke.
        #[source]
        source: std::io::Error,
    },
    /// Connecting, the TLS handshake or the exchange failed.
    #[error("{addr}: {source}")]
    Io {
        /// The peer's address.
        addr: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not one this RPC gives.
    #[error("{addr}: bad answer: {source}")]
    BadAnswer {
        /// The peer's address.
        addr: String,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },
    /// The peer refused the request and said why (its message, as it sent it).
    #[error("{message}")]
    Refused {
        /// The peer's address.
        addr: String,
        /// The peer's reason.
        message: String,
    },
    /// An enrollment answer not made with our join key.
    #[error("{addr}: the enrollment answer failed authentication (not a member of our cluster)")]
    ForgedAnswer {
        /// The peer's address.
        addr: String,
    },
    /// The request could not be encoded.
    #[error("encoding the request: {0}")]
    Encode(#[source] serde_json::Error),
    /// This node's key, certificate request or TLS configuration could not be made.
    #[error(transparent)]
    Pki(#[from] tessera_pki::PkiError),
}

/// Marks the end of a connection before a whole answer, inside an `io::Error`.
#[derive(Debug, thiserror::Error)]
#[error("the peer closed the connection without a whole answer")]
struct NoAnswer;

impl TransportError {
    fn io(addr: &str, e: std::io::Error) -> TransportError {
        let addr = addr.to_string();
        if e.get_ref().is_some_and(|inner| inner.is::<NoAnswer>()) {
            TransportError::Hangup { addr }
        } else {
            TransportError::Io { addr, source: e }
        }
    }
}

/// TLS for node-to-node traffic.
#[derive(Clone)]
pub struct Tls {
    /// Server side (accepts enrollment without a client certificate).
    pub server: Arc<rustls::ServerConfig>,
    /// Client side (presents this node's certificate, trusts only the cluster CA).
    pub client: Arc<rustls::ClientConfig>,
}

impl Tls {
    /// The configurations for a node holding `creds` issued by the CA `ca_pem`.
    pub fn new(creds: &NodeCredentials, ca_pem: &str) -> Result<Tls, tessera_pki::PkiError> {
        Ok(Tls {
            server: Arc::new(tessera_pki::server_config_allowing_enrollment(
                creds, ca_pem,
            )?),
            client: Arc::new(tessera_pki::client_config(creds, ca_pem)?),
        })
    }
}

/// How this node reaches others: plain TCP, or mutual TLS. Connections are kept and
/// reused (one request at a time each): a TLS handshake per heartbeat would cost more
/// than the heartbeat.
#[derive(Clone, Default)]
pub struct Transport {
    tls: Option<Tls>,
    idle: Arc<Mutex<IdlePool>>,
    /// Why a peer said this node was removed from the cluster, once one did.
    removed: Arc<Mutex<Option<String>>>,
}

/// Kept connections by (node, address).
type IdlePool = std::collections::HashMap<(NodeId, String), Vec<Conn>>;

/// Any connection the transport speaks over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection with its read buffer, and when it was last used.
struct Conn {
    io: BufReader<Box<dyn Io>>,
    used: Instant,
}

impl Conn {
    fn new(io: Box<dyn Io>) -> Conn {
        Conn {
            io: BufReader::new(io),
            used: Instant::now(),
        }
    }
}

/// Idle connections older than this are not reused (the server drops them after
/// a minute).
const CLIENT_IDLE: Duration = Duration::from_secs(20);
/// Idle connections kept per peer.
const POOL: usize = 32;

/// A request as sent: its JSON line.
fn encode(rpc: &Rpc) -> Result<Vec<u8>, TransportError> {
    let mut body = serde_json::to_vec(rpc).map_err(TransportError::Encode)?;
    body.push(b'\n');
    Ok(body)
}

/// How an exchange failed, and whether the whole request had reached the peer's side of
/// the connection by then (if not, the peer cannot have read it whole, let alone acted).
struct Broke {
    sent: bool,
    error: std::io::Error,
}

async fn exchange(conn: &mut Conn, body: &[u8]) -> Result<String, Broke> {
    let send = async {
        conn.io.write_all(body).await?;
        conn.io.flush().await
    };
    send.await.map_err(|error| Broke { sent: false, error })?;
    receive(conn)
        .await
        .map_err(|error| Broke { sent: true, error })
}

/// Whether a kept connection is still open, looked at once without waiting: a peer
/// that closed it while idle (or sent something unasked, which no peer does) has left
/// it readable.
async fn still_open(conn: &mut Conn) -> bool {
    std::future::poll_fn(|cx| {
        let idle = std::pin::Pin::new(&mut conn.io)
            .poll_fill_buf(cx)
            .is_pending();
        std::task::Poll::Ready(idle)
    })
    .await
}

async fn receive(conn: &mut Conn) -> std::io::Result<String> {
    let mut line = String::new();
    // Over TLS, a peer hanging up without close_notify is an UnexpectedEof error rather
    // than a short read: either way there is no answer.
    match (&mut conn.io).take(MAX_RPC).read_line(&mut line).await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => line.clear(),
        r => {
            r?;
        }
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            NoAnswer,
        ));
    }
    conn.used = Instant::now();
    Ok(line)
}

/// Decodes an answer line.
fn decode<T: DeserializeOwned>(addr: &str, line: &str) -> Result<T, TransportError> {
    serde_json::from_str(line).map_err(|source| TransportError::BadAnswer {
        addr: addr.to_string(),
        source,
    })
}

/// Turns a refusal on the wire into [`TransportError::Refused`].
fn refused<T>(addr: &str, reply: Reply<T>) -> Result<T, TransportError> {
    reply.map_err(|message| TransportError::Refused {
        addr: addr.to_string(),
        message,
    })
}

impl Transport {
    /// A transport using `tls` (or plain TCP with `None`).
    pub fn new(tls: Option<Tls>) -> Transport {
        Transport {
            tls,
            idle: Arc::default(),
            removed: Arc::default(),
        }
    }

    /// Why a member said this node was removed from the cluster, if one did (it answers
    /// every RPC of a removed node with that instead of serving it).
    pub fn removed(&self) -> Option<String> {
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One request's answer line, or the peer's word that this node was removed (kept,
    /// see [`Transport::removed`]) as [`TransportError::Refused`].
    pub(crate) async fn line(
        &self,
        target: NodeId,
        addr: &str,
        rpc: &Rpc,
    ) -> Result<String, TransportError> {
        let line = self.exchange_line(target, addr, rpc).await?;
        if !line.starts_with(RemovedAnswer::PREFIX) {
            return Ok(line);
        }
        let why: RemovedAnswer = decode(addr, &line)?;
        *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.removed.clone());
        Err(TransportError::Refused {
            addr: addr.to_string(),
            message: why.removed,
        })
    }

    async fn dial(&self, target: NodeId, addr: &str) -> std::io::Result<Conn> {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(sock),
            Some(tls) => {
                let name = ServerName::try_from(
                    tessera_pki::node_dns_name(&cert_name(target))
                        .map_err(std::io::Error::other)?,
                )
                .map_err(std::io::Error::other)?;
                Box::new(
                    tokio_rustls::TlsConnector::from(tls.client.clone())
                        .connect(name, sock)
                        .await?,
                )
            }
        };
        Ok(Conn::new(io))
    }

    fn take_idle(&self, key: &(NodeId, String)) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.used.elapsed() < CLIENT_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, key: (NodeId, String), conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < POOL {
            list.push(conn);
        }
    }

    /// One request to node `target` at `addr`; the answer line. A kept connection that
    /// turns out closed is replaced once by a new one (the server closes only idle
    /// connections, between requests, so the request was not seen).
    async fn exchange_line(
        &self,
        target: NodeId,
        addr: &str,
        rpc: &Rpc,
    ) -> Result<String, TransportError> {
        let body = encode(rpc)?;
        let key = (target, addr.to_string());
        // A kept connection the peer closed while it was idle (it restarted) is left
        // before sending: a write then goes on a new one. One that breaks after the
        // request went out sends it again on a new one, unless it may have been acted on.
        if let Some(mut c) = self.take_idle(&key) {
            if !still_open(&mut c).await {
                return self.fresh_line(target, addr, key, &body).await;
            }
            match exchange(&mut c, &body).await {
                Ok(line) => {
                    self.put_idle(key, c);
                    return Ok(line);
                }
                Err(Broke { sent: true, error }) if !rpc.resendable() => {
                    return Err(TransportError::Unanswered {
                        addr: addr.to_string(),
                        source: error,
                    });
                }
                Err(_) => {}
            }
        }
        self.fresh_line(target, addr, key, &body).await
    }

    /// One exchange on a new connection, kept afterwards.
    async fn fresh_line(
        &self,
        target: NodeId,
        addr: &str,
        key: (NodeId, String),
        body: &[u8],
    ) -> Result<String, TransportError> {
        let fresh = async {
            let mut c = self.dial(target, addr).await?;
            let line = exchange(&mut c, body).await.map_err(|b| b.error)?;
            Ok::<_, std::io::Error>((c, line))
        };
        let (c, line) = fresh.await.map_err(|e| TransportError::io(addr, e))?;
        self.put_idle(key, c);
        Ok(line)
    }

    /// One of our RPCs: its answer, or the peer's refusal as [`TransportError::Refused`].
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        target: NodeId,
        addr: &str,
        rpc: &Rpc,
        ttl: Duration,
    ) -> Result<T, TransportError> {
        let line = tokio::time::timeout(ttl, self.line(target, addr, rpc))
            .await
            .map_err(|_| TransportError::Timeout {
                addr: addr.to_string(),
            })??;
        refused(addr, decode::<Reply<T>>(addr, &line)?)
    }

    /// Sends a write to the leader `leader` at `addr` (a follower forwarding a write).
    pub async fn forward_write(
        &self,
        leader: NodeId,
        addr: &str,
        cmd: Command,
        ttl: Duration,
    ) -> Result<Applied, TransportError> {
        self.call(leader, addr, &Rpc::Write(cmd), ttl).await
    }

    /// Asks the leader for the log index a linearizable read must see.
    pub async fn read_index(
        &self,
        leader: NodeId,
        addr: &str,
        ttl: Duration,
    ) -> Result<u64, TransportError> {
        self.call(leader, addr, &Rpc::ReadIndex, ttl).await
    }

    /// Asks the leader `leader` at `addr` to remove member `id`.
    pub async fn request_remove(
        &self,
        leader: NodeId,
        addr: &str,
        id: NodeId,
    ) -> Result<(), TransportError> {
        self.call(leader, addr, &Rpc::Remove(id), Duration::from_secs(20))
            .await
    }

    /// Asks member `target` at `addr` to add this node (Raft id `id`, address `my_addr`).
    pub async fn request_join(
        &self,
        target: NodeId,
        addr: &str,
        key: &[u8; 32],
        id: NodeId,
        my_addr: &str,
    ) -> Result<(), TransportError> {
        let req = JoinRequest::new(key, id, my_addr, now_ms());
        self.forward_join(target, addr, req, Duration::from_secs(30))
            .await
    }

    /// Passes a join request on (a follower to the leader).
    pub(crate) async fn forward_join(
        &self,
        target: NodeId,
        addr: &str,
        req: JoinRequest,
        ttl: Duration,
    ) -> Result<(), TransportError> {
        self.call(target, addr, &Rpc::Join(req), ttl).await
    }
}

/// Asks the member at `addr` (Raft address) for a certificate for node `id`: makes a key
/// (which never leaves this node) and a request, and checks that the answer comes from a
/// holder of the join key. Returns the credentials and the CA certificate.
pub async fn enroll(
    addr: &str,
    key: &[u8; 32],
    id: NodeId,
    ips: &[std::net::IpAddr],
) -> Result<(NodeCredentials, String), TransportError> {
    let (key_pem, csr_pem) = tessera_pki::node_key_and_request(&cert_name(id))?;
    let req = EnrollRequest::new(key, id, csr_pem, ips, now_ms());
    let config = Arc::new(tessera_pki::enrollment_client_config()?);
    let body = encode(&Rpc::Enroll(req.clone()))?;
    let go = async {
        let sock = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("enroll.tessera").map_err(std::io::Error::other)?;
        let s = tokio_rustls::TlsConnector::from(config)
            .connect(name, sock)
            .await?;
        exchange(&mut Conn::new(Box::new(s)), &body)
            .await
            .map_err(|b| b.error)
    };
    let line = tokio::time::timeout(Duration::from_secs(10), go)
        .await
        .map_err(|_| TransportError::Timeout {
            addr: addr.to_string(),
        })?
        .map_err(|e| TransportError::io(addr, e))?;
    let reply: EnrollReply = refused(addr, decode::<Reply<EnrollReply>>(addr, &line)?)?;
    if !reply.is_authentic(key, &req.mac) {
        return Err(TransportError::ForgedAnswer {
            addr: addr.to_string(),
        });
    }
    Ok((
        NodeCredentials {
            key_pem,
            cert_pem: reply.cert_pem,
        },
        reply.ca_pem,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A peer that answers its connection's first request, then reads the second and
    /// hangs up without answering; every later connection is answered normally. Counts
    /// the requests it read.
    async fn flaky_peer() -> (String, Arc<AtomicUsize>) {
        peer(false).await.0
    }

    /// With `close_first`, the first connection is closed after its first answer instead
    /// (the peer restarted while it was idle); the `Notify` says when it is closed. The
    /// count also has the connections accepted (second value).
    async fn peer(
        close_first: bool,
    ) -> (
        (String, Arc<AtomicUsize>),
        Arc<AtomicUsize>,
        Arc<tokio::sync::Notify>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (count, conns, said) = (seen.clone(), accepted.clone(), closed.clone());
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((sock, _)) = l.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (count, said) = (count.clone(), said.clone());
                let is_first = std::mem::take(&mut first);
                tokio::spawn(async move {
                    let mut io = BufReader::new(sock);
                    for n in 0.. {
                        let mut line = String::new();
                        if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        if is_first && !close_first && n == 1 {
                            return;
                        }
                        let answer = b"{\"Ok\":7}\n";
                        if io.get_mut().write_all(answer).await.is_err() {
                            return;
                        }
                        if is_first && close_first {
                            drop(io);
                            said.notify_one();
                            return;
                        }
                    }
                });
            }
        });
        ((addr, seen), accepted, closed)
    }

    fn write() -> Rpc {
        Rpc::Write(Command::Put {
            table: "t".into(),
            key: "k".into(),
            value: serde_json::json!(1),
        })
    }

    #[tokio::test]
    async fn a_write_whose_kept_connection_broke_after_sending_is_not_sent_again() {
        let (addr, seen) = flaky_peer().await;
        let t = Transport::default();
        // The first request leaves the connection kept; the write goes on it.
        assert_eq!(
            t.line(1, &addr, &Rpc::ReadIndex).await.unwrap(),
            "{\"Ok\":7}\n"
        );
        let e = t.line(1, &addr, &write()).await.unwrap_err();
        assert!(matches!(e, TransportError::Unanswered { .. }), "{e:?}");
        assert!(e.to_string().contains("may have been applied"), "{e}");
        assert_eq!(seen.load(Ordering::SeqCst), 2, "the write was sent once");
    }

    #[tokio::test]
    async fn a_read_index_whose_kept_connection_broke_goes_again_on_a_new_one() {
        let (addr, seen) = flaky_peer().await;
        let t = Transport::default();
        t.line(1, &addr, &Rpc::ReadIndex).await.unwrap();
        let line = t.line(1, &addr, &Rpc::ReadIndex).await.unwrap();
        assert_eq!(line, "{\"Ok\":7}\n");
        assert_eq!(seen.load(Ordering::SeqCst), 3, "sent again once");
        // A write on a fresh connection after that is answered as usual.
        assert_eq!(t.line(1, &addr, &write()).await.unwrap(), "{\"Ok\":7}\n");
    }

    #[tokio::test]
    async fn a_write_goes_on_a_new_connection_when_the_kept_one_was_closed_while_idle() {
        let ((addr, seen), accepted, closed) = peer(true).await;
        let t = Transport::default();
        t.line(1, &addr, &Rpc::ReadIndex).await.unwrap();
        closed.notified().await;
        // The peer's close reaches this side's socket before the write is sent: loopback
        // delivers it at once, and the peer closed before notifying.
        tokio::task::yield_now().await;
        let line = t.line(1, &addr, &write()).await.unwrap();
        assert_eq!(line, "{\"Ok\":7}\n");
        assert_eq!(seen.load(Ordering::SeqCst), 2, "the write was sent once");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "on a new connection");
    }
}
