//! The Raft transport between nodes: one JSON request and one JSON reply per connection,
//! inside mutual TLS with the cluster CA once the node holds a certificate.
//!
//! A node without a certificate may connect without one only to *enroll*: it sends a
//! certificate request authenticated with the join key and gets back its certificate and
//! the CA certificate, authenticated with the same key (it cannot check the server's
//! certificate yet, having no CA). Every other RPC on a TLS listener needs a client
//! certificate from the cluster CA. Without TLS configured (tests of this crate), the
//! transport is plain TCP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tessera_pki::{ClusterCa, NodeCredentials};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::types::{Applied, Command, TypeConfig};

type NodeId = u64;
/// Largest RPC accepted (snapshots are sent in chunks well below this).
const MAX_RPC: u64 = 64 << 20;
/// Join and enrollment requests older (or newer) than this are refused.
const FRESH_MS: u64 = 30_000;

#[derive(Serialize, Deserialize)]
#[serde(tag = "rpc", content = "body", rename_all = "snake_case")]
enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write forwarded by a follower to the leader.
    Write(Command),
    /// A new node asking to become a voter, authenticated with the join key.
    Join(JoinRequest),
    /// A follower's read barrier: the leader confirms its leadership and answers the log
    /// index a read must see.
    ReadIndex,
    /// A node without a certificate asking for one (the only RPC allowed without one).
    Enroll(EnrollRequest),
    /// Remove a member (forwarded by a follower to the leader).
    Remove(NodeId),
}

/// The name a node's certificate is issued for: its Raft id in hex.
pub fn cert_name(id: NodeId) -> String {
    format!("{id:016x}")
}

fn keyed(key: &[u8; 32], parts: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().to_hex().to_string()
}

fn same_mac(a: &str, b: &str) -> bool {
    // Compared as blake3 hashes: constant time.
    matches!((blake3::Hash::from_hex(a), blake3::Hash::from_hex(b)), (Ok(x), Ok(y)) if x == y)
}

/// A node's request for a certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Its Raft id (the certificate's name).
    pub id: NodeId,
    /// PKCS#10 request, PEM.
    pub csr_pem: String,
    /// IP addresses the certificate must also be valid for (its API's address).
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// Its clock, ms since the epoch.
    pub sent_ms: u64,
    /// Keyed hash of the above under the join key, hex.
    pub mac: String,
}

impl EnrollRequest {
    fn tag(
        key: &[u8; 32],
        id: NodeId,
        csr: &str,
        ips: &[std::net::IpAddr],
        sent_ms: u64,
    ) -> String {
        let ips: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
        keyed(
            key,
            &[
                b"tessera enroll v1",
                &id.to_le_bytes(),
                csr.as_bytes(),
                ips.join(",").as_bytes(),
                &sent_ms.to_le_bytes(),
            ],
        )
    }

    fn verify(&self, key: &[u8; 32], now_ms: u64) -> Result<(), String> {
        if !same_mac(
            &Self::tag(key, self.id, &self.csr_pem, &self.ips, self.sent_ms),
            &self.mac,
        ) {
            return Err("enrollment request failed authentication (different join secret?)".into());
        }
        if now_ms.abs_diff(self.sent_ms) > FRESH_MS {
            return Err("enrollment request is stale (clocks more than 30 s apart?)".into());
        }
        Ok(())
    }
}

/// The answer to an enrollment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollReply {
    /// The node's certificate, PEM.
    pub cert_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// Keyed hash under the join key of the request's MAC and both certificates: binds
    /// the answer to this request and to a holder of the secret.
    pub mac: String,
}

impl EnrollReply {
    fn tag(key: &[u8; 32], request_mac: &str, cert: &str, ca: &str) -> String {
        keyed(
            key,
            &[
                b"tessera enrolled v1",
                request_mac.as_bytes(),
                cert.as_bytes(),
                ca.as_bytes(),
            ],
        )
    }
}

/// A node's request to join the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Its Raft id.
    pub id: NodeId,
    /// Its Raft address.
    pub addr: String,
    /// Its clock, ms since the epoch (requests older than 30 s are refused).
    pub sent_ms: u64,
    /// blake3 keyed hash of id, address and time under the join key, hex.
    pub mac: String,
}

impl JoinRequest {
    fn tag(key: &[u8; 32], id: NodeId, addr: &str, sent_ms: u64) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(b"tessera join v1\0");
        h.update(&id.to_le_bytes());
        h.update(addr.as_bytes());
        h.update(b"\0");
        h.update(&sent_ms.to_le_bytes());
        h.finalize().to_hex().to_string()
    }

    /// A signed request.
    pub fn new(key: &[u8; 32], id: NodeId, addr: &str, sent_ms: u64) -> JoinRequest {
        JoinRequest {
            id,
            addr: addr.to_string(),
            sent_ms,
            mac: Self::tag(key, id, addr, sent_ms),
        }
    }

    /// Checks the signature and freshness.
    pub fn verify(&self, key: &[u8; 32], now_ms: u64) -> Result<(), String> {
        let want = blake3::Hash::from_hex(Self::tag(key, self.id, &self.addr, self.sent_ms))
            .map_err(|e| e.to_string())?;
        let got = blake3::Hash::from_hex(&self.mac)
            .map_err(|_| "malformed join signature".to_string())?;
        if want != got {
            return Err("join request failed authentication (different join secret?)".into());
        }
        if now_ms.abs_diff(self.sent_ms) > 30_000 {
            return Err("join request is stale".into());
        }
        Ok(())
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
}

/// Kept connections by (node, address).
type IdlePool = std::collections::HashMap<(NodeId, String), Vec<Conn>>;

/// Any connection the transport speaks over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection with its read buffer, and when it was last used.
struct Conn {
    io: BufReader<Box<dyn Io>>,
    used: std::time::Instant,
}

/// Idle connections older than this are not reused (the server drops them after
/// [`SERVER_IDLE`]).
const CLIENT_IDLE: Duration = Duration::from_secs(20);
/// The server closes a connection idle this long.
const SERVER_IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per peer.
const POOL: usize = 32;

async fn exchange(conn: &mut Conn, body: &[u8]) -> std::io::Result<String> {
    conn.io.write_all(body).await?;
    conn.io.flush().await?;
    let mut line = String::new();
    (&mut conn.io).take(MAX_RPC).read_line(&mut line).await?;
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the peer closed the connection without a whole answer",
        ));
    }
    conn.used = std::time::Instant::now();
    Ok(line)
}

impl Transport {
    /// A transport using `tls` (or plain TCP with `None`).
    pub fn new(tls: Option<Tls>) -> Transport {
        Transport {
            tls,
            idle: Arc::default(),
        }
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
        Ok(Conn {
            io: BufReader::new(io),
            used: std::time::Instant::now(),
        })
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

    /// One request to node `target` at `addr`; the reply line. A kept connection that
    /// turns out closed is replaced once by a new one (the server closes only idle
    /// connections, between requests, so the request was not seen).
    async fn line(&self, target: NodeId, addr: &str, rpc: &Rpc) -> std::io::Result<String> {
        let mut body = serde_json::to_vec(rpc).map_err(std::io::Error::other)?;
        body.push(b'\n');
        let key = (target, addr.to_string());
        if let Some(mut c) = self.take_idle(&key) {
            if let Ok(line) = exchange(&mut c, &body).await {
                self.put_idle(key, c);
                return Ok(line);
            }
        }
        let mut c = self.dial(target, addr).await?;
        let line = exchange(&mut c, &body).await?;
        self.put_idle(key, c);
        Ok(line)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        target: NodeId,
        addr: &str,
        rpc: &Rpc,
        ttl: Duration,
    ) -> Result<T, String> {
        let line = tokio::time::timeout(ttl, self.line(target, addr, rpc))
            .await
            .map_err(|_| format!("{addr} did not answer in time"))?
            .map_err(|e| format!("{addr}: {e}"))?;
        serde_json::from_str::<T>(&line).map_err(|e| format!("{addr}: bad answer: {e}"))
    }

    /// Sends a write to the leader `leader` at `addr` (a follower forwarding a write).
    pub async fn forward_write(
        &self,
        leader: NodeId,
        addr: &str,
        cmd: Command,
        ttl: Duration,
    ) -> Result<Applied, String> {
        self.send::<Result<Applied, String>>(leader, addr, &Rpc::Write(cmd), ttl)
            .await?
    }

    /// Asks the leader for the log index a linearizable read must see.
    pub async fn read_index(
        &self,
        leader: NodeId,
        addr: &str,
        ttl: Duration,
    ) -> Result<u64, String> {
        self.send::<Result<u64, String>>(leader, addr, &Rpc::ReadIndex, ttl)
            .await?
    }

    /// Asks the leader `leader` at `addr` to remove member `id`.
    pub async fn request_remove(
        &self,
        leader: NodeId,
        addr: &str,
        id: NodeId,
    ) -> Result<(), String> {
        self.send::<Result<(), String>>(leader, addr, &Rpc::Remove(id), Duration::from_secs(20))
            .await?
    }

    /// Asks member `target` at `addr` to add this node (Raft id `id`, address `my_addr`).
    pub async fn request_join(
        &self,
        target: NodeId,
        addr: &str,
        key: &[u8; 32],
        id: NodeId,
        my_addr: &str,
    ) -> Result<(), String> {
        let req = JoinRequest::new(key, id, my_addr, now_ms());
        self.send::<Result<(), String>>(target, addr, &Rpc::Join(req), Duration::from_secs(30))
            .await?
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
) -> Result<(NodeCredentials, String), String> {
    let (key_pem, csr_pem) =
        tessera_pki::node_key_and_request(&cert_name(id)).map_err(|e| e.to_string())?;
    let sent_ms = now_ms();
    let req = EnrollRequest {
        id,
        mac: EnrollRequest::tag(key, id, &csr_pem, ips, sent_ms),
        csr_pem,
        ips: ips.to_vec(),
        sent_ms,
    };
    let config = Arc::new(tessera_pki::enrollment_client_config().map_err(|e| e.to_string())?);
    let mut body = serde_json::to_vec(&Rpc::Enroll(req.clone())).map_err(|e| e.to_string())?;
    body.push(b'\n');
    let go = async {
        let sock = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("enroll.tessera").map_err(std::io::Error::other)?;
        let s = tokio_rustls::TlsConnector::from(config)
            .connect(name, sock)
            .await?;
        let io: Box<dyn Io> = Box::new(s);
        let mut c = Conn {
            io: BufReader::new(io),
            used: std::time::Instant::now(),
        };
        exchange(&mut c, &body).await
    };
    let line = tokio::time::timeout(Duration::from_secs(10), go)
        .await
        .map_err(|_| format!("{addr} did not answer in time"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let reply: EnrollReply = serde_json::from_str::<Result<EnrollReply, String>>(&line)
        .map_err(|e| format!("{addr}: bad answer: {e}"))??;
    let want = EnrollReply::tag(key, &req.mac, &reply.cert_pem, &reply.ca_pem);
    if !same_mac(&want, &reply.mac) {
        return Err(format!(
            "{addr}: the enrollment answer failed authentication (not a member of our cluster)"
        ));
    }
    Ok((
        NodeCredentials {
            key_pem,
            cert_pem: reply.cert_pem,
        },
        reply.ca_pem,
    ))
}

/// Where this node finds the cluster CA to enroll others: set directly by the node that
/// minted it, else read from the replicated state (`pki/ca`).
pub type CaSlot = Arc<Mutex<Option<ClusterCa>>>;

/// What the RPC server needs.
pub struct ServeCtx {
    /// This node's Raft.
    pub raft: Raft<TypeConfig>,
    /// Join and enrollment requests must be signed with this key.
    pub join_key: Option<[u8; 32]>,
    /// Server TLS (None: plain TCP).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// To forward joins to the leader.
    pub transport: Transport,
    /// The cluster CA, once known.
    pub ca: CaSlot,
    /// The state (the CA record).
    pub sm: crate::state_machine::StateReader,
    /// Batched read barriers (answers followers' read-index requests).
    pub read_index: crate::barrier::ReadIndex,
}

impl ServeCtx {
    fn ca(&self) -> Option<ClusterCa> {
        let mut slot = self.ca.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = self.sm.read(|t| {
                let rec = t.get("pki")?.get("ca")?;
                Some(ClusterCa {
                    cert_pem: rec["cert_pem"].as_str()?.to_string(),
                    key_pem: rec["key_pem"].as_str()?.to_string(),
                })
            });
        }
        slot.clone()
    }

    fn enroll(&self, req: EnrollRequest) -> Result<EnrollReply, String> {
        let key = self.join_key.ok_or("this node does not enroll nodes")?;
        req.verify(&key, now_ms())?;
        let ca = self
            .ca()
            .ok_or("this node does not hold the cluster CA yet")?;
        let cert_pem = ca
            .issue_with_ips(&req.csr_pem, &cert_name(req.id), &req.ips)
            .map_err(|e| format!("cannot issue the certificate: {e}"))?;
        tracing::info!(id = req.id, "issued a node certificate");
        Ok(EnrollReply {
            mac: EnrollReply::tag(&key, &req.mac, &cert_pem, &ca.cert_pem),
            cert_pem,
            ca_pem: ca.cert_pem,
        })
    }
}

/// Serves Raft RPCs until the listener fails.
pub async fn serve(listener: TcpListener, ctx: Arc<ServeCtx>) {
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            return;
        };
        let _ = sock.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let res = match ctx.tls.clone() {
                None => handle(sock, &ctx, Caller::Plain).await,
                Some(cfg) => {
                    let accepted = tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio_rustls::TlsAcceptor::from(cfg).accept(sock),
                    )
                    .await;
                    match accepted {
                        Ok(Ok(s)) => {
                            let cert = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.clone().into_owned());
                            handle(
                                s,
                                &ctx,
                                cert.map(Caller::Certified).unwrap_or(Caller::Anonymous),
                            )
                            .await
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(std::io::Error::other("TLS handshake timed out")),
                    }
                }
            };
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "Raft RPC failed");
            }
        });
    }
}

/// Who is calling.
enum Caller {
    /// Plain TCP (no TLS configured): trusted, as in tests of this crate.
    Plain,
    /// TLS without a client certificate: may only enroll.
    Anonymous,
    /// TLS with a certificate from the cluster CA (DER).
    Certified(rustls_pki_types::CertificateDer<'static>),
}

/// Whether `cert` was issued to a current member. A node that has no membership yet (a
/// founder before the first entries arrive, a joining learner) cannot tell, and accepts
/// any certified caller; from then on, a removed node's certificate no longer works.
fn is_member(raft: &Raft<TypeConfig>, cert: &rustls_pki_types::CertificateDer<'_>) -> bool {
    let m = raft.metrics().borrow().clone();
    let members: Vec<NodeId> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect();
    if members.is_empty() {
        return true;
    }
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    members.iter().any(|id| {
        tessera_pki::node_dns_name(&cert_name(*id))
            .ok()
            .and_then(|n| ServerName::try_from(n).ok())
            .is_some_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
    })
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    ctx: &ServeCtx,
    caller: Caller,
) -> std::io::Result<()> {
    let (r, mut w) = tokio::io::split(s);
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(SERVER_IDLE, (&mut r).take(MAX_RPC).read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::other("idle connection closed"))??;
        if n == 0 {
            return Ok(());
        }
        let reply = answer(&line, ctx, &caller).await?;
        w.write_all(&reply).await?;
        w.write_all(b"\n").await?;
        w.flush().await?;
    }
}

/// The reply to one request line.
async fn answer(line: &str, ctx: &ServeCtx, caller: &Caller) -> std::io::Result<Vec<u8>> {
    let rpc: Rpc = serde_json::from_str(line).map_err(std::io::Error::other)?;
    let allowed = match (caller, &rpc) {
        (Caller::Plain, _) | (_, Rpc::Enroll(_)) => true,
        (Caller::Anonymous, _) => false,
        // A joining node has a certificate but is not a member yet.
        (Caller::Certified(_), Rpc::Join(_)) => true,
        (Caller::Certified(cert), _) => is_member(&ctx.raft, cert),
    };
    if !allowed {
        tracing::warn!(
            anonymous = matches!(caller, Caller::Anonymous),
            "refused an RPC from a peer that is not a member (no cluster certificate, or removed)"
        );
        return Err(std::io::Error::other("caller not allowed"));
    }
    let raft = &ctx.raft;
    match rpc {
        Rpc::Append(req) => serde_json::to_vec(&raft.append_entries(req).await),
        Rpc::Vote(req) => serde_json::to_vec(&raft.vote(req).await),
        Rpc::Snapshot(req) => serde_json::to_vec(&raft.install_snapshot(req).await),
        Rpc::Join(req) => serde_json::to_vec(&join(ctx, req).await),
        Rpc::Enroll(req) => serde_json::to_vec(&ctx.enroll(req)),
        Rpc::Remove(id) => serde_json::to_vec(&remove(raft, &ctx.transport, id).await),
        Rpc::ReadIndex => {
            // Only the leader answers: a follower relaying would need its own barrier.
            let res: Result<u64, String> = if matches!(leader(raft), Ok(Leader::Me)) {
                ctx.read_index.get().await
            } else {
                Err("not the leader".into())
            };
            serde_json::to_vec(&res)
        }
        Rpc::Write(cmd) => {
            let res: Result<Applied, String> = raft
                .client_write(cmd)
                .await
                .map(|r| r.data)
                .map_err(|e| e.to_string());
            serde_json::to_vec(&res)
        }
    }
    .map_err(std::io::Error::other)
}

/// Makes clients for peers by their advertised address.
#[derive(Clone, Default)]
pub struct Network {
    /// How to reach them.
    pub transport: Transport,
}

/// A client for one peer.
pub struct Peer {
    target: NodeId,
    addr: String,
    transport: Transport,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
        }
    }
}

impl Peer {
    async fn call<T, E>(&self, rpc: Rpc, ttl: Duration) -> Result<T, RPCError<NodeId, BasicNode, E>>
    where
        T: serde::de::DeserializeOwned,
        E: serde::de::DeserializeOwned + std::error::Error,
    {
        let go = async {
            let _: SocketAddr = self
                .addr
                .parse()
                .map_err(|e: std::net::AddrParseError| RPCError::Network(NetworkError::new(&e)))?;
            let line = self
                .transport
                .line(self.target, &self.addr, &rpc)
                .await
                .map_err(|e| unreachable(&e))?;
            let res: Result<T, E> = serde_json::from_str(&line)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
        };
        match tokio::time::timeout(ttl, go).await {
            Ok(r) => r,
            Err(e) => Err(unreachable(&e)),
        }
    }
}

fn unreachable<X: std::error::Error, E: std::error::Error + 'static>(
    e: &E,
) -> RPCError<NodeId, BasicNode, X> {
    RPCError::Unreachable(Unreachable::new(e))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Append(rpc), option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot(rpc), option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote(rpc), option.hard_ttl()).await
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Adds an authenticated node as a learner, then as a voter; a follower forwards the
/// request to the leader.
async fn join(ctx: &ServeCtx, req: JoinRequest) -> Result<(), String> {
    let raft = &ctx.raft;
    let key = ctx
        .join_key
        .ok_or("this node does not accept join requests")?;
    req.verify(&key, now_ms())?;
    if let Leader::Other(leader_id, addr) = leader(raft)? {
        return ctx
            .transport
            .send(leader_id, &addr, &Rpc::Join(req), Duration::from_secs(20))
            .await?;
    }
    let m = raft.metrics().borrow().clone();
    raft.add_learner(
        req.id,
        BasicNode {
            addr: req.addr.clone(),
        },
        true,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut voters: std::collections::BTreeSet<NodeId> =
        m.membership_config.membership().voter_ids().collect();
    voters.insert(req.id);
    raft.change_membership(voters, false)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(id = req.id, addr = %req.addr, "added a voter");
    Ok(())
}

/// Who leads, as this node knows.
pub(crate) enum Leader {
    /// This node.
    Me,
    /// Another node: its id and address.
    Other(NodeId, String),
}

/// The current leader, or an error when none is known.
pub(crate) fn leader(raft: &Raft<TypeConfig>) -> Result<Leader, String> {
    let m = raft.metrics().borrow().clone();
    let id = m.current_leader.ok_or("no leader elected (no quorum?)")?;
    if id == m.id {
        return Ok(Leader::Me);
    }
    let node = m
        .membership_config
        .membership()
        .get_node(&id)
        .cloned()
        .ok_or("the leader is not a member?")?;
    Ok(Leader::Other(id, node.addr))
}

/// Removes a member from the voters and the cluster: on the leader, or asked of it.
pub(crate) async fn remove(
    raft: &Raft<TypeConfig>,
    transport: &Transport,
    id: NodeId,
) -> Result<(), String> {
    match leader(raft)? {
        Leader::Me => remove_on_leader(raft, id).await,
        Leader::Other(leader_id, addr) => transport.request_remove(leader_id, &addr, id).await,
    }
}

/// The leader's part of [`remove`].
async fn remove_on_leader(raft: &Raft<TypeConfig>, id: NodeId) -> Result<(), String> {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    if membership.get_node(&id).is_none() {
        return Err(format!("{id} is not a member"));
    }
    if id == m.id {
        return Err("the leader cannot remove itself; ask again once another node leads".into());
    }
    let voters: std::collections::BTreeSet<NodeId> =
        membership.voter_ids().filter(|v| *v != id).collect();
    if voters.is_empty() {
        return Err("cannot remove the last voter".into());
    }
    raft.change_membership(voters, false)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(id, "removed a member");
    Ok(())
}
