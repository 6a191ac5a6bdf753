//! The RPC server: accepts connections (mutual TLS, or plain TCP in tests), decides who
//! may ask what, and answers: Raft's RPCs, forwarded writes, read indexes, joins,
//! removals, and enrollment (issuing certificates with the cluster CA).

use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Raft;
use rustls_pki_types::{CertificateDer, ServerName};
use tessera_pki::{ClusterCa, PkiError};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::barrier::ReadIndex;
use crate::ca_record::{self, CaRecordError};
use crate::membership::{self, leader, Leader};
use crate::network::admission::{self, AnonymousSlots, Handshakes, HANDSHAKE_TIMEOUT};
use crate::network::rpc::{RemovedAnswer, Reply, Rpc, MAX_ANONYMOUS_RPC, MAX_RPC};
use crate::network::{cert_name, now_ms, AuthError, EnrollReply, EnrollRequest, Transport};
use crate::state_machine::StateReader;
use crate::types::TypeConfig;

type NodeId = u64;

/// The server closes a connection idle this long (clients stop reusing theirs sooner).
const SERVER_IDLE: Duration = Duration::from_secs(60);

/// Where this node finds the cluster CA to enroll others: set directly by the node that
/// minted it, else read from the replicated state (`pki/ca`).
pub(crate) type CaSlot = Arc<Mutex<Option<ClusterCa>>>;

/// Why this node does not issue a certificate.
#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error("this node does not enroll nodes")]
    NoJoinKey,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("this node does not hold the cluster CA yet")]
    NoCa,
    #[error("cannot issue the certificate: {0}")]
    Issue(#[source] PkiError),
    #[error("{0}")]
    Identity(String),
}

/// What the RPC server needs.
pub(crate) struct ServeCtx {
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
    pub sm: StateReader,
    /// Batched read barriers (answers followers' read-index requests).
    pub read_index: ReadIndex,
}

/// The CA in `slot`, else opened from its record in the state (and kept in `slot`).
pub(crate) fn ca_from(
    slot: &CaSlot,
    sm: &StateReader,
    join_key: Option<&[u8; 32]>,
) -> Result<Option<ClusterCa>, CaRecordError> {
    if let Some(ca) = slot.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Ok(Some(ca));
    }
    let rec = sm.read(|t| {
        t.get(ca_record::TABLE)
            .and_then(|p| p.get(ca_record::KEY))
            .cloned()
    });
    let Some(rec) = rec else {
        return Ok(None);
    };
    // Outside the lock: opening derives a key with argon2id (a fraction of a second).
    let ca = ca_record::from_record(&rec, join_key)?;
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca.clone());
    Ok(Some(ca))
}

impl ServeCtx {
    /// Why node `id` may not enroll (`enrolling`) or join, if so (see
    /// [`admission::refused_identity`]; a member asking to join again is harmless).
    fn refused_identity(&self, id: NodeId, enrolling: bool) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let member = enrolling && m.membership_config.membership().get_node(&id).is_some();
        self.sm.read(|t| admission::refused_identity(t, id, member))
    }

    fn ca(&self) -> Option<ClusterCa> {
        match ca_from(&self.ca, &self.sm, self.join_key.as_ref()) {
            Ok(ca) => ca,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the cluster CA to enroll a node");
                None
            }
        }
    }

    fn enroll(&self, req: EnrollRequest) -> Result<EnrollReply, EnrollError> {
        let key = self.join_key.ok_or(EnrollError::NoJoinKey)?;
        req.verify(&key, now_ms())?;
        if let Some(why) = self.refused_identity(req.id, true) {
            tracing::warn!(id = req.id, "refused an enrollment: {why}");
            return Err(EnrollError::Identity(why));
        }
        let ca = self.ca().ok_or(EnrollError::NoCa)?;
        let cert_pem = ca
            .issue_with_ips(&req.csr_pem, &cert_name(req.id), &req.ips)
            .map_err(EnrollError::Issue)?;
        tracing::info!(id = req.id, "issued a node certificate");
        Ok(EnrollReply::new(&key, &req.mac, cert_pem, ca.cert_pem))
    }
}

/// The first pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`] while
/// accepts keep failing (a listener with a connection waiting stays readable, so without
/// a pause an `EMFILE` would spin).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves Raft RPCs until the task is dropped. A failed accept (`EMFILE`, `ENFILE`,
/// `ECONNABORTED`, ...) is logged and retried after a growing pause, never the end of the
/// listener: a node that stopped accepting would drop out of its cluster for good.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<ServeCtx>) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let slots = AnonymousSlots::default();
    let handshakes = Handshakes::default();
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // At most one line per pause (the pause reaches 1 s within 7 failures).
                tracing::warn!(error = %e, retry_in = ?backoff, "Raft RPC accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let _ = sock.set_nodelay(true);
        let ctx = ctx.clone();
        let Some(cfg) = ctx.tls.clone() else {
            tokio::spawn(async move {
                if let Err(e) = handle(sock, &ctx, Caller::Plain).await {
                    tracing::debug!(%peer, error = %e, "Raft RPC failed");
                }
            });
            continue;
        };
        let slots = slots.clone();
        // The handshake runs in a task of its own, counted among the handshakes in
        // progress (and evicted when too many newer ones arrive); the connection is
        // served by another task, which no eviction touches.
        let handshake = tokio::spawn(async move {
            let accepted = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsAcceptor::from(cfg).accept(sock),
            )
            .await;
            let s = match accepted {
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
            tokio::spawn(async move {
                let cert = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned());
                let res = match cert {
                    Some(cert) => handle(s, &ctx, Caller::Certified(cert)).await,
                    None => match slots.take() {
                        // Held until the connection ends.
                        Some(_slot) => handle(s, &ctx, Caller::Anonymous).await,
                        None => Err(std::io::Error::other(
                            "too many connections without a cluster certificate: closed",
                        )),
                    },
                };
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "Raft RPC failed");
                }
            });
        });
        handshakes.admit(handshake.abort_handle());
    }
}

/// Who is calling.
enum Caller {
    /// Plain TCP (no TLS configured): trusted, as in tests of this crate.
    Plain,
    /// TLS without a client certificate: may only enroll.
    Anonymous,
    /// TLS with a certificate from the cluster CA (DER).
    Certified(CertificateDer<'static>),
}

/// Whether `cert` was issued to a current member. A node that has no membership yet (a
/// founder before the first entries arrive, a joining learner) cannot tell, and accepts
/// any certified caller; from then on, a removed node's certificate no longer works.
fn is_member(raft: &Raft<TypeConfig>, cert: &CertificateDer<'_>) -> bool {
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
    // Until a caller shows a cluster certificate it may only enroll: a small frame.
    let cap = match caller {
        Caller::Anonymous => MAX_ANONYMOUS_RPC,
        Caller::Plain | Caller::Certified(_) => MAX_RPC,
    };
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(SERVER_IDLE, (&mut r).take(cap).read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::other("idle connection closed"))??;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= cap {
            tracing::warn!(
                anonymous = matches!(caller, Caller::Anonymous),
                limit = cap,
                "refused an RPC frame over the size limit"
            );
            return Err(std::io::Error::other("RPC frame over the size limit"));
        }
        let reply = answer(&line, ctx, &caller).await?;
        w.write_all(&reply).await?;
        w.write_all(b"\n").await?;
        w.flush().await?;
    }
}

/// The wire form of the outcome of one of our RPCs.
fn wire<T, E: Display>(r: Result<T, E>) -> Reply<T> {
    r.map_err(|e| e.to_string())
}

/// The reply to one request line. A caller that may not ask gets no answer: the
/// connection is closed.
async fn answer(line: &str, ctx: &ServeCtx, caller: &Caller) -> std::io::Result<Vec<u8>> {
    let rpc: Rpc = serde_json::from_str(line).map_err(std::io::Error::other)?;
    let allowed = match (caller, &rpc) {
        (Caller::Plain, _) | (_, Rpc::Enroll(_)) => true,
        (Caller::Anonymous, _) => false,
        // A joining node has a certificate but is not a member yet: it may ask for its
        // own id only; a member may forward anyone's request to the leader.
        (Caller::Certified(cert), Rpc::Join(req)) => {
            admission::cert_is_for(cert, req.id) || is_member(&ctx.raft, cert)
        }
        (Caller::Certified(cert), _) => is_member(&ctx.raft, cert),
    };
    if !allowed {
        // A removed node is told so (and nothing else), so it stops and tells its
        // operator to wipe it instead of retrying for ever.
        if let Caller::Certified(cert) = caller {
            if let Some(why) = ctx.sm.read(|t| admission::removed_caller(t, cert)) {
                tracing::debug!("told a removed node that it was removed");
                return serde_json::to_vec(&RemovedAnswer { removed: why })
                    .map_err(std::io::Error::other);
            }
        }
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
        Rpc::Join(req) => match ctx.refused_identity(req.id, false) {
            Some(why) => {
                tracing::warn!(id = req.id, "refused a join: {why}");
                serde_json::to_vec(&Reply::<()>::Err(why))
            }
            None => serde_json::to_vec(&wire(
                membership::join(raft, &ctx.transport, ctx.join_key, req).await,
            )),
        },
        Rpc::Enroll(req) => serde_json::to_vec(&wire(ctx.enroll(req))),
        Rpc::Remove(id) => {
            serde_json::to_vec(&wire(membership::remove(raft, &ctx.transport, id).await))
        }
        Rpc::ReadIndex => {
            // Only the leader answers: a follower relaying would need its own barrier.
            let res: Reply<u64> = if matches!(leader(raft), Ok(Leader::Me)) {
                wire(ctx.read_index.get().await)
            } else {
                Err("not the leader".into())
            };
            serde_json::to_vec(&res)
        }
        Rpc::Write(cmd) => serde_json::to_vec(&wire(raft.client_write(cmd).await.map(|r| r.data))),
    }
    .map_err(std::io::Error::other)
}
