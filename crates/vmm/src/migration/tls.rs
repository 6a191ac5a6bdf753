//! The migration stream's transport: TCP with mutual TLS 1.3 under the cluster's CA, the
//! same credentials every node-to-node link uses (`tessera-pki`). The target presents its
//! node certificate and accepts only a client certificate of the cluster CA; the source
//! checks the target's certificate names the node it meant (`<id>.node.tessera`).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use serde::{Deserialize, Serialize};

/// A node's TLS files: the cluster CA, its certificate and its key (PEM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Why the TLS transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credential file.
    #[error("reading {}: {error}", .path.display())]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The credentials do not make a TLS configuration.
    #[error("TLS credentials: {0}")]
    Config(String),
    /// The name to check the target's certificate against is not a DNS name.
    #[error("bad server name {0:?}")]
    ServerName(String),
    /// The connection or the handshake failed (a peer without a certificate of the
    /// cluster CA ends here).
    #[error("TLS handshake with {peer}: {error}")]
    Handshake {
        /// The peer.
        peer: String,
        /// Why.
        error: std::io::Error,
    },
}

impl TlsFiles {
    fn credentials(&self) -> Result<(tessera_pki::NodeCredentials, String), TlsError> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|error| TlsError::Read {
                path: p.clone(),
                error,
            })
        };
        Ok((
            tessera_pki::NodeCredentials {
                key_pem: read(&self.key)?,
                cert_pem: read(&self.cert)?,
            },
            read(&self.ca)?,
        ))
    }

    /// The target's configuration: its certificate, client certificates required.
    pub fn server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (creds, ca) = self.credentials()?;
        tessera_pki::server_config(&creds, &ca)
            .map(Arc::new)
            .map_err(|e| TlsError::Config(e.to_string()))
    }

    /// The source's configuration: the cluster CA trusted, its certificate presented.
    pub fn client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let (creds, ca) = self.credentials()?;
        tessera_pki::client_config(&creds, &ca)
            .map(Arc::new)
            .map_err(|e| TlsError::Config(e.to_string()))
    }
}

/// The target's end of a stream.
pub type ServerStream = StreamOwned<ServerConnection, TcpStream>;
/// The source's end of a stream.
pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;

fn handshake_err(peer: String) -> impl FnOnce(std::io::Error) -> TlsError {
    move |error| TlsError::Handshake { peer, error }
}

/// Completes the target's handshake on an accepted connection within `limit`.
pub fn accept(
    config: Arc<rustls::ServerConfig>,
    sock: TcpStream,
    limit: Duration,
) -> Result<ServerStream, TlsError> {
    let peer = sock
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let err = || handshake_err(peer.clone());
    sock.set_read_timeout(Some(limit)).map_err(err())?;
    sock.set_write_timeout(Some(limit)).map_err(err())?;
    let conn = ServerConnection::new(config).map_err(|e| err()(std::io::Error::other(e)))?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(err())?;
    }
    Ok(s)
}

/// Connects to the target at `addr` and completes the handshake within `limit`, checking
/// its certificate holds `server_name`.
pub fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
    limit: Duration,
) -> Result<ClientStream, TlsError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let err = || handshake_err(addr.to_string());
    let sock = TcpStream::connect_timeout(&addr, limit).map_err(err())?;
    sock.set_nodelay(true).map_err(err())?;
    sock.set_read_timeout(Some(limit)).map_err(err())?;
    sock.set_write_timeout(Some(limit)).map_err(err())?;
    let conn = ClientConnection::new(config, name).map_err(|e| err()(std::io::Error::other(e)))?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(err())?;
    }
    Ok(s)
}
