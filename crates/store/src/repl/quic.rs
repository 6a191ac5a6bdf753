//! The QUIC endpoint stores replicate over: one UDP socket, mutual TLS with the node
//! certificates of the cluster CA (both ends present theirs, both verify the other's
//! chain), ALPN `tessera-repl/<version>` (every version of the wire codec this store
//! speaks, newest first: TLS settles each connection on the newest both ends know, see
//! [`negotiated_version`]), and only *node* certificates accepted as peers (a user's
//! client certificate from the same CA may read exports over NBD, never replicate).
//!
//! The credentials are the files `tesserad` keeps in its TLS directory (see `crate::tls`);
//! the endpoint is bound at start and takes connections once they are there, following
//! them when they are renewed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use tessera_pki::NodeCredentials;
use tessera_replication::wire;

use crate::tls::{read_creds, Creds};

/// A connection that shows no sign of life this long is closed (both ends send
/// keep-alives at a third of it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the credentials directory is looked at.
const POLL: Duration = Duration::from_secs(1);
/// Flow-control windows: a stream must hold a few full write frames (4 MiB each) in
/// flight, or pipelining stalls on the receiver's window.
const STREAM_WINDOW: u32 = 32 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

/// Why the endpoint cannot be set up or a peer cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The credential files are unusable.
    #[error("the credentials in {dir} are unusable: {reason}")]
    Credentials {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The node's credentials have not appeared yet.
    #[error("this node has no certificate yet (waiting for {0})")]
    NoCredentials(PathBuf),
    /// Binding the UDP socket failed.
    #[error("binding the replication endpoint on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A peer's node id is not a valid certificate name.
    #[error("bad peer node id {0:?}")]
    BadNode(String),
    /// Connecting to a peer failed (handshake refused, unreachable, timed out).
    #[error("connecting to {node} at {addr}: {reason}")]
    Connect {
        /// The peer's node id.
        node: String,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer is not a node of this cluster.
    #[error("peer at {addr} is not a node: {reason}")]
    NotANode {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(CONNECTION_WINDOW.into())
        .keep_alive_interval(Some(IDLE_TIMEOUT / 3));
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

fn node_creds(c: &Creds) -> NodeCredentials {
    NodeCredentials {
        key_pem: c.key.clone(),
        cert_pem: c.cert.clone(),
    }
}

/// The server side: this node's certificate, a client certificate of the cluster CA
/// required (checked by rustls before any stream opens), every replication protocol
/// version this store speaks.
pub fn server_config(dir: &Path, c: &Creds) -> Result<quinn::ServerConfig, QuicError> {
    server_config_for(dir, c, &wire::alpns_up_to(wire::VERSION))
}

/// Like [`server_config`] for other protocol names on the same TLS rules (replication
/// held at an older version, or the volume export, `crate::export`): only `alpns`
/// (preferred first) are accepted.
pub fn server_config_for(
    dir: &Path,
    c: &Creds,
    alpns: &[Vec<u8>],
) -> Result<quinn::ServerConfig, QuicError> {
    let bad = |reason: String| QuicError::Credentials {
        dir: dir.to_path_buf(),
        reason,
    };
    let mut tls =
        tessera_pki::server_config(&node_creds(c), &c.ca).map_err(|e| bad(e.to_string()))?;
    tls.alpn_protocols = alpns.to_vec();
    let quic = QuicServerConfig::try_from(tls).map_err(|e| bad(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The client side of replication: trusts only the cluster CA, presents this node's
/// certificate, offers protocol names `alpns` (preferred first).
pub fn client_config(
    dir: &Path,
    c: &Creds,
    alpns: &[Vec<u8>],
) -> Result<quinn::ClientConfig, QuicError> {
    let bad = |reason: String| QuicError::Credentials {
        dir: dir.to_path_buf(),
        reason,
    };
    let mut tls =
        tessera_pki::client_config(&node_creds(c), &c.ca).map_err(|e| bad(e.to_string()))?;
    tls.alpn_protocols = alpns.to_vec();
    let quic = QuicClientConfig::try_from(tls).map_err(|e| bad(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The replication protocol version `conn` settled on: the one its ALPN name stands for.
/// A connection that settled on none (impossible with our configurations: rustls refuses
/// a handshake without a common name) counts as the oldest.
pub fn negotiated_version(conn: &quinn::Connection) -> u8 {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .and_then(|p| wire::alpn_version(&p))
        .unwrap_or(wire::OLDEST_VERSION)
}

/// The node id a peer's verified certificate names (`<id>.node.tessera`), or why it is
/// not a node's. The chain was verified by rustls already; this tells a node's
/// certificate from a user's client certificate of the same CA.
pub fn peer_node(conn: &quinn::Connection) -> Result<String, QuicError> {
    let addr = conn.remote_address();
    let not = |reason: &str| QuicError::NotANode {
        addr,
        reason: reason.to_string(),
    };
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| not("no certificate"))?;
    let leaf = certs.first().ok_or_else(|| not("no certificate"))?;
    node_of_certificate(leaf).ok_or_else(|| not("its certificate names no node"))
}

/// The node id in a certificate's DNS names, if it is a node certificate.
fn node_of_certificate(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => d
            .strip_suffix(".node.tessera")
            .filter(|id| tessera_pki::node_dns_name(id).is_ok())
            .map(str::to_string),
        _ => None,
    })
}

/// This store's replication endpoint: serves once the credentials exist, connects to
/// peers with the same credentials.
pub struct ReplEndpoint {
    endpoint: quinn::Endpoint,
    client: RwLock<Option<quinn::ClientConfig>>,
    tls_dir: PathBuf,
    /// The protocol names served, preferred first: replication's, or the volume
    /// export's (`crate::export`).
    alpns: Vec<Vec<u8>>,
    /// The protocol names offered when connecting to a peer store (replication's).
    repl_alpns: Vec<Vec<u8>>,
}

impl ReplEndpoint {
    /// Binds `addr` (UDP). Nothing is accepted until [`ReplEndpoint::load_credentials`]
    /// found usable credentials. `reset_key` must be the one of this address's earlier
    /// starts (see `reset_key`): peers of a previous process then drop their connections
    /// at its first answer. Replication protocol versions up to `max_version` are served
    /// and offered (below [`wire::VERSION`] only to hold a store at an older release's
    /// wire format: `tessera-store serve --repl-max-version`). Must run inside the tokio
    /// runtime.
    pub fn bind(
        addr: SocketAddr,
        tls_dir: PathBuf,
        reset_key: super::reset_key::ResetKey,
        max_version: u8,
    ) -> Result<Arc<ReplEndpoint>, QuicError> {
        let alpns = wire::alpns_up_to(max_version);
        Self::bind_with(addr, tls_dir, reset_key, alpns.clone(), alpns)
    }

    /// Like [`ReplEndpoint::bind`], serving protocol `alpn` instead of replication (the
    /// volume export: same socket setup, same credentials, same TLS rules).
    pub fn bind_for(
        addr: SocketAddr,
        tls_dir: PathBuf,
        reset_key: super::reset_key::ResetKey,
        alpn: &'static [u8],
    ) -> Result<Arc<ReplEndpoint>, QuicError> {
        let repl = wire::alpns_up_to(wire::VERSION);
        Self::bind_with(addr, tls_dir, reset_key, vec![alpn.to_vec()], repl)
    }

    fn bind_with(
        addr: SocketAddr,
        tls_dir: PathBuf,
        reset_key: super::reset_key::ResetKey,
        alpns: Vec<Vec<u8>>,
        repl_alpns: Vec<Vec<u8>>,
    ) -> Result<Arc<ReplEndpoint>, QuicError> {
        let bind = |source| QuicError::Bind { addr, source };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind(std::io::Error::other("no async runtime")))?;
        let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
        config.cid_generator(|| Box::new(super::reset_key::ConnectionIds::new()));
        let endpoint = quinn::Endpoint::new(config, None, socket, runtime).map_err(bind)?;
        Ok(Arc::new(ReplEndpoint {
            endpoint,
            client: RwLock::new(None),
            tls_dir,
            alpns,
            repl_alpns,
        }))
    }

    /// The protocol names served, for logs (`tessera-repl/2,tessera-repl/1`).
    fn served(&self) -> String {
        let names: Vec<_> = self
            .alpns
            .iter()
            .map(|a| String::from_utf8_lossy(a))
            .collect();
        names.join(",")
    }

    /// The bound address (the real port when 0 was asked).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The endpoint, for accepting connections.
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Installs credentials for serving and connecting (connections already open keep
    /// theirs).
    pub fn set_credentials(&self, c: &Creds) -> Result<(), QuicError> {
        let server = server_config_for(&self.tls_dir, c, &self.alpns)?;
        let client = client_config(&self.tls_dir, c, &self.repl_alpns)?;
        self.endpoint.set_server_config(Some(server));
        *self.client.write() = Some(client);
        Ok(())
    }

    /// Reads the credentials directory now and installs what it holds. `Ok(false)`:
    /// nothing there yet.
    pub fn load_credentials(&self) -> Result<bool, QuicError> {
        match read_creds(&self.tls_dir) {
            Ok(Some(c)) => self.set_credentials(&c).map(|()| true),
            Ok(None) => Ok(false),
            Err(e) => Err(QuicError::Credentials {
                dir: self.tls_dir.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Connects to node `node` at `addr`, verifying that it presents `node`'s certificate.
    pub async fn connect(
        &self,
        node: &str,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, QuicError> {
        let name = tessera_pki::node_dns_name(node).map_err(|_| QuicError::BadNode(node.into()))?;
        let cfg = self
            .client
            .read()
            .clone()
            .ok_or_else(|| QuicError::NoCredentials(self.tls_dir.clone()))?;
        let failed = |reason: String| QuicError::Connect {
            node: node.to_string(),
            addr,
            reason,
        };
        let connecting = self
            .endpoint
            .connect_with(cfg, addr, &name)
            .map_err(|e| failed(e.to_string()))?;
        connecting.await.map_err(|e| failed(e.to_string()))
    }
}

/// Follows the credentials directory: installs them when they appear or change, logs
/// (once per distinct problem) when they are unusable. Runs until dropped.
pub async fn follow_credentials(ep: Arc<ReplEndpoint>) {
    let mut current: Option<Creds> = None;
    let mut last_problem = String::new();
    loop {
        let problem = match read_creds(&ep.tls_dir) {
            Ok(None) => None,
            Ok(Some(c)) if current.as_ref() == Some(&c) => None,
            Ok(Some(c)) => match ep.set_credentials(&c) {
                Ok(()) => {
                    tracing::info!(addr = ?ep.local_addr().ok(), renewed = current.is_some(),
                        alpn = %ep.served(),
                        "QUIC endpoint: serving with this node's certificate");
                    current = Some(c);
                    None
                }
                Err(e) => Some(e.to_string()),
            },
            Err(e) => Some(e.to_string()),
        };
        match problem {
            Some(p) if p != last_problem => {
                tracing::warn!(problem = %p, alpn = %ep.served(),
                    "QUIC endpoint cannot use the node's credentials; retrying");
                last_problem = p;
            }
            Some(_) => {}
            None => last_problem.clear(),
        }
        tokio::time::sleep(POLL).await;
    }
}
