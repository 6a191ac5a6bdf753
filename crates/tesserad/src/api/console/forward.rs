//! A console asked of a node that does not run the VM: the request is made again, as a
//! WebSocket over node-to-node HTTPS (this node's cluster certificate, the peer verified
//! by the cluster CA and its node name), to the node that runs it, with the caller's own
//! credentials (the peer authorizes the caller itself), and the two WebSockets are piped.
//! A forwarded request is marked so it is never forwarded again.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as PeerMsg};
use tokio_tungstenite::WebSocketStream;

use super::super::ApiError;

/// The header that marks a forwarded console request.
pub const FORWARDED: &str = "x-tessera-forwarded";

/// How long connecting to the peer (TCP, TLS, the WebSocket handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A console WebSocket on the node that runs the VM.
pub type Peer = WebSocketStream<TlsStream<TcpStream>>;

fn bad_gateway(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, msg)
}

/// Opens VM `vm`'s console on node `node` (its API at `addr`) with the caller's
/// credentials from `headers`. The peer's refusal comes back with its status.
pub async fn connect(
    data_dir: &Path,
    node: &str,
    addr: SocketAddr,
    vm: &str,
    headers: &HeaderMap,
) -> Result<Peer, ApiError> {
    let unreachable = |e: String| {
        bad_gateway(format!(
            "node {node} ({addr}) runs VM {vm} but its console cannot be reached: {e}"
        ))
    };
    let tls = crate::peer_https::client_config(data_dir).map_err(unreachable)?;
    // Node certificates name the node's Raft id, as the Raft transport verifies them.
    let raft_id = crate::replicated::raft_id(&tessera_cluster::identity::NodeId(node.into()))
        .map_err(|e| unreachable(e.to_string()))?;
    let dns = tessera_pki::node_dns_name(&tessera_state::network::cert_name(raft_id))
        .map_err(|e| unreachable(e.to_string()))?;
    let server = rustls::pki_types::ServerName::try_from(dns.clone())
        .map_err(|e| unreachable(e.to_string()))?;
    let mut req = format!("wss://{dns}/api/v1/vms/{vm}/console")
        .into_client_request()
        .map_err(|e| unreachable(e.to_string()))?;
    for h in [header::AUTHORIZATION, header::COOKIE] {
        if let Some(v) = headers.get(&h) {
            req.headers_mut().insert(h, v.clone());
        }
    }
    req.headers_mut()
        .insert(FORWARDED, HeaderValue::from_static("1"));
    let handshake = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        match tokio_tungstenite::client_async(req, stream).await {
            Ok((ws, _)) => Ok(ws),
            // The peer answered the request itself (no such VM there any more, the caller
            // may not): its answer, as it gave it.
            Err(WsError::Http(resp)) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or_else(|| body.into_owned());
                let code =
                    StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                Err(ApiError::new(code, format!("node {node}: {msg}")))
            }
            Err(e) => Err(unreachable(e.to_string())),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .unwrap_or_else(|_| {
            Err(unreachable(format!(
                "no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )))
        })
}

/// Pipes the caller's WebSocket and the peer's until either ends.
pub async fn pipe(mut client: WebSocket, peer: Peer) {
    let (mut to_peer, mut from_peer) = peer.split();
    loop {
        tokio::select! {
            m = client.recv() => {
                let out = match m {
                    Some(Ok(Message::Text(t))) => PeerMsg::Text(t.as_str().into()),
                    Some(Ok(Message::Binary(b))) => PeerMsg::Binary(b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => break,
                };
                if to_peer.send(out).await.is_err() {
                    break;
                }
            }
            m = from_peer.next() => {
                let out = match m {
                    Some(Ok(PeerMsg::Text(t))) => Message::Text(t.as_str().into()),
                    Some(Ok(PeerMsg::Binary(b))) => Message::Binary(b),
                    Some(Ok(PeerMsg::Ping(_) | PeerMsg::Pong(_) | PeerMsg::Frame(_))) => continue,
                    _ => break,
                };
                if client.send(out).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to_peer.send(PeerMsg::Close(None)).await;
    let _ = client.send(Message::Close(None)).await;
}
