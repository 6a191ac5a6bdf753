//! NBD over TCP with TLS: waits for the node's credentials (written by `tesserad` once it
//! has its certificate), then serves with client certificates from the cluster CA
//! required, and follows the credentials when they change.
//!
//! The store starts before `tesserad` (and keeps serving while it restarts), and a node
//! gets its certificate only when it forms or joins a cluster, so the credentials are not
//! a start-up argument: they are files in a directory the store watches (`tesserad`'s
//! `<data_dir>/tls`: `ca.crt`, `node.crt`, `node.key`, each replaced whole by a rename).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_nbd::{ServerConfig, TlsRequired};
use tessera_pki::NodeCredentials;
use tokio::net::TcpListener;

use crate::exports::StoreExports;

/// How often the credentials directory is looked at (for the first credentials and for
/// renewed ones).
const POLL: Duration = Duration::from_secs(1);

/// The credential files' text, to notice a change.
#[derive(Clone, PartialEq, Eq)]
pub struct Creds {
    /// The cluster CA certificate.
    pub ca: String,
    /// This node's certificate.
    pub cert: String,
    /// This node's key.
    pub key: String,
}

/// Why the credentials in the directory cannot be used (logged, and polled again).
#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    /// A file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The files do not make a TLS configuration.
    #[error("the credentials in {dir} are unusable: {source}")]
    Unusable {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: tessera_pki::PkiError,
    },
}

/// The three files, or `None` while any is missing.
pub fn read_creds(dir: &Path) -> Result<Option<Creds>, TlsFilesError> {
    let read = |name: &str| {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TlsFilesError::Read { path, source }),
        }
    };
    match (read("ca.crt")?, read("node.crt")?, read("node.key")?) {
        (Some(ca), Some(cert), Some(key)) => Ok(Some(Creds { ca, cert, key })),
        _ => Ok(None),
    }
}

/// The server side of NBD with TLS from `dir`'s credentials: TLS 1.3, this node's
/// certificate, a client certificate from the cluster CA required (a node's, for a VMM
/// on another node, or a user's from `tessera volume export-creds`).
pub fn load(dir: &Path) -> Result<Option<TlsRequired>, TlsFilesError> {
    Ok(match read_creds(dir)? {
        Some(c) => Some(required(dir, &c)?),
        None => None,
    })
}

fn required(dir: &Path, c: &Creds) -> Result<TlsRequired, TlsFilesError> {
    let node = NodeCredentials {
        key_pem: c.key.clone(),
        cert_pem: c.cert.clone(),
    };
    let cfg =
        tessera_pki::server_config(&node, &c.ca).map_err(|source| TlsFilesError::Unusable {
            dir: dir.to_path_buf(),
            source,
        })?;
    Ok(TlsRequired::new(Arc::new(cfg)))
}

/// Serves NBD with TLS on `addr` once `dir` holds usable credentials, restarting the
/// listener's accept loop with the new ones when they change (connections already open
/// keep theirs). Runs until the task is dropped; errors are logged and retried, never
/// returned: the Unix socket and the admin socket must keep working regardless.
pub async fn serve(addr: SocketAddr, dir: PathBuf, exports: Arc<StoreExports>, nbd: ServerConfig) {
    let mut current: Option<Creds> = None;
    let mut listener: Option<std::net::TcpListener> = None;
    let mut accepting: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_problem = String::new();
    let mut told_waiting = false;
    loop {
        let problem = match read_creds(&dir) {
            Ok(None) => {
                if current.is_none() && !told_waiting {
                    tracing::info!(dir = %dir.display(), %addr,
                        "NBD over TCP waits for this node's certificate (it gets one when it forms or joins a cluster)");
                    told_waiting = true;
                }
                None
            }
            Ok(Some(c)) if current.as_ref() == Some(&c) => None,
            Ok(Some(c)) => match required(&dir, &c) {
                Err(e) => Some(e.to_string()),
                Ok(tls) => match ensure_bound(&mut listener, addr) {
                    Err(e) => Some(format!("binding NBD TCP listener on {addr}: {e}")),
                    Ok(l) => {
                        if let Some(old) = accepting.take() {
                            old.abort();
                        }
                        let renewed = current.is_some();
                        let cfg = ServerConfig {
                            tls: Some(tls),
                            ..nbd.clone()
                        };
                        let ex = exports.clone();
                        accepting = Some(tokio::spawn(async move {
                            if let Err(e) = tessera_nbd::serve_tcp(l, ex, cfg).await {
                                tracing::error!(error = %e, "NBD TCP listener failed");
                            }
                        }));
                        current = Some(c);
                        tracing::info!(%addr, dir = %dir.display(), renewed,
                            "serving NBD over TCP, TLS with a client certificate of the cluster CA required");
                        None
                    }
                },
            },
            Err(e) => Some(e.to_string()),
        };
        match problem {
            Some(p) if p != last_problem => {
                tracing::warn!(problem = %p, serving = current.is_some(),
                    "NBD over TCP cannot use the node's credentials; retrying");
                last_problem = p;
            }
            Some(_) => {}
            None => last_problem.clear(),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A tokio listener on `addr`, bound once and cloned for each accept loop (so a renewal
/// does not let go of the port).
fn ensure_bound(
    listener: &mut Option<std::net::TcpListener>,
    addr: SocketAddr,
) -> std::io::Result<TcpListener> {
    if listener.is_none() {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        *listener = Some(l);
    }
    match listener {
        Some(l) => TcpListener::from_std(l.try_clone()?),
        None => Err(std::io::Error::other("no listener")),
    }
}
