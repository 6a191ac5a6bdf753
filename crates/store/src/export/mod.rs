//! The QUIC volume export (issue #8, "Exports from any node"): remote clients
//! (`tessera-volume-client`, `tessera volume cp`) read, write, flush, trim and ask the
//! block status of a volume or snapshot over QUIC, with the wire format of
//! `tessera_volume_client::proto` (`docs/volume-export.md`).
//!
//! It is the NBD export's twin, not a fork of it: a volume opens through the same
//! [`tessera_nbd::Exports`] (the store's [`crate::exports::StoreExports`]), so a write
//! takes the same route as an NBD write — through the volume's replication when this
//! store is its primary, refused with the same words when the copy here is a replica (a
//! volume a running VM uses on another node is written only there). The endpoint is the
//! replication endpoint's code (`crate::repl::quic`) on a socket of its own with its own
//! ALPN: the same credentials, the same rule for who may connect as NBD over TLS (any
//! certificate of the cluster CA: a node's, or a user's from `tessera volume
//! export-creds`).

mod request;

use std::sync::Arc;
use std::time::Duration;

use tessera_nbd::Exports;
use tessera_volume_client::proto::{self, ErrorCode, Kind, REQUEST_LEN};
use tokio::sync::Semaphore;

use crate::repl::quic::ReplEndpoint;
use request::{read_name, refuse, reply};

/// Connections served at once; more are refused at the handshake.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take from its handshake to opening a volume.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection whose service ended waits for the client to hang up.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Accepts connections on `ep` (bound with [`proto::ALPN`]) and serves `exports` to them.
/// Runs until dropped.
pub async fn serve<E: Exports>(ep: Arc<ReplEndpoint>, exports: Arc<E>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some(incoming) = ep.quinn().accept().await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(addr = %incoming.remote_address(), max = MAX_CONNECTIONS,
                "volume export: too many connections, one refused");
            incoming.refuse();
            continue;
        };
        let exports = exports.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let addr = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(%addr, error = %e, "volume export: handshake refused");
                    return;
                }
            };
            if let Err(e) = connection(&conn, exports).await {
                tracing::info!(%addr, error = %e, "volume export: connection ended");
            }
            // Dropping the connection would close it before a refusal's reply is
            // delivered: the client hangs up once it has read it.
            let _ = tokio::time::timeout(CLOSE_WAIT, conn.closed()).await;
        });
    }
}

/// One connection: its first stream opens a volume, every later stream is a request on
/// it, at most [`proto::MAX_IN_FLIGHT`] served at once (the others wait, their data held
/// back by QUIC's flow control).
async fn connection<E: Exports>(conn: &quinn::Connection, exports: Arc<E>) -> Result<(), String> {
    let addr = conn.remote_address();
    let (mut send, mut recv) = tokio::time::timeout(OPEN_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| format!("no volume opened within {OPEN_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut header = [0u8; REQUEST_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    let (name, forwarded) = match proto::decode_request(&header) {
        Err(bad) => return refuse(send, &mut recv, bad.code(), &bad.to_string()).await,
        Ok(r) if r.kind != Kind::Open => {
            let why = "the first request of a connection must open a volume";
            return refuse(send, &mut recv, ErrorCode::Invalid, why).await;
        }
        Ok(r) => match read_name(&mut recv, r.length).await {
            Ok(n) => (n, r.forwarded),
            Err(why) => return refuse(send, &mut recv, ErrorCode::Invalid, &why).await,
        },
    };
    let (ex, n) = (exports.clone(), name.clone());
    // Never a VM's VMM (those use NBD): asked about like any other writer. A store
    // forwarding its own client is served from a copy here, never forwarded on.
    let peer = tessera_nbd::Peer::Other {
        name: format!("quic {addr}"),
        relayed: forwarded,
    };
    let opened = tokio::task::spawn_blocking(move || ex.open_for(&n, &peer))
        .await
        .map_err(|e| e.to_string())?;
    let device = match opened {
        Ok(Some(d)) => d,
        Ok(None) => {
            let why = format!("no volume or snapshot named {name:?} on this store");
            return refuse(send, &mut recv, ErrorCode::NotFound, &why).await;
        }
        Err(e) => {
            let code = request::code_of(e.errno);
            return refuse(send, &mut recv, code, &e.message).await;
        }
    };
    use tessera_nbd::Device;
    let payload = proto::encode_open_reply(device.size(), device.read_only());
    reply(&mut send, None, &payload).await?;
    tracing::info!(%addr, volume = %name, "volume export: volume opened over QUIC");
    let slots = Arc::new(Semaphore::new(proto::MAX_IN_FLIGHT as usize));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(quinn::ConnectionError::ApplicationClosed(_)) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (device, name) = (device.clone(), name.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = request::serve(send, recv, device).await {
                tracing::debug!(volume = %name, error = %e, "volume export: a request's stream failed");
            }
        });
    }
}
