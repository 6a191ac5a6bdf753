//! An open volume of a store's QUIC export: one QUIC connection with mutual TLS (the
//! cluster CA's certificates on both sides), one stream per request. `&self` methods may
//! run concurrently; the server's stream limit makes the excess wait.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use thiserror::Error;

use crate::proto::{
    self, ErrorCode, Extent, Kind, Request, MAX_DATA, MAX_EXTENTS, MAX_MESSAGE, REPLY_LEN,
    REQUEST_LEN,
};

/// A client certificate of the cluster CA, its key, and the CA that must have issued the
/// server's certificate.
#[derive(Clone)]
pub struct Credentials {
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// The client's certificate (PEM): a user's from `tessera volume export-creds`, or a
    /// node's.
    pub cert_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
}

impl Credentials {
    /// Reads a directory written by `tessera volume export-creds` (`ca-cert.pem`,
    /// `client-cert.pem`, `client-key.pem`) or a node's (`ca.crt`, `node.crt`,
    /// `node.key`).
    pub fn from_dir(dir: &Path) -> Result<Credentials, ClientError> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let user = (
            read("ca-cert.pem"),
            read("client-cert.pem"),
            read("client-key.pem"),
        );
        if let (Ok(ca_pem), Ok(cert_pem), Ok(key_pem)) = user {
            return Ok(Credentials {
                ca_pem,
                cert_pem,
                key_pem,
            });
        }
        match (read("ca.crt"), read("node.crt"), read("node.key")) {
            (Ok(ca_pem), Ok(cert_pem), Ok(key_pem)) => Ok(Credentials {
                ca_pem,
                cert_pem,
                key_pem,
            }),
            _ => Err(ClientError::Credentials(format!(
                "{} holds neither ca-cert.pem, client-cert.pem and client-key.pem \
                 (tessera volume export-creds --dir) nor a node's ca.crt, node.crt and node.key",
                dir.display()
            ))),
        }
    }
}

/// Why a request failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The credentials cannot be read or used.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The connection could not be made (unreachable, handshake refused, e.g. a
    /// certificate of another cluster).
    #[error("connecting to {addr}: {reason}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{message} ({code:?})")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The server broke the protocol.
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    /// The connection failed during a request.
    #[error("the connection failed: {0}")]
    Connection(String),
}

impl ClientError {
    /// The server's error code, when it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Idle connections are closed after this; keep-alives at a third of it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection that hears nothing from the server (keep-alives included) for `idle`
/// fails: the bound on how long a vanished server holds up a request.
fn transport(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Room for several 4 MiB read replies in flight, or reads stall on the window.
    t.stream_receive_window((8u32 << 20).into())
        .receive_window((64u32 << 20).into())
        .send_window(64 << 20)
        .keep_alive_interval(Some(idle / 3));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// An open volume.
pub struct Volume {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    size: u64,
    read_only: bool,
}

impl Volume {
    /// Connects to the export at `addr`, checking that its certificate names
    /// `server_name` (the node's address or `<id>.node.tessera`) and chains to the CA of
    /// `creds`, and opens volume `name`. Must run inside a tokio runtime.
    pub async fn open(
        addr: SocketAddr,
        server_name: &str,
        creds: &Credentials,
        name: &str,
    ) -> Result<Volume, ClientError> {
        Volume::open_with_idle_timeout(addr, server_name, creds, name, IDLE_TIMEOUT).await
    }

    /// [`Volume::open`], the connection failing once the server was silent for `idle`
    /// (a store forwarding to another node's uses a short one, so a dead peer fails its
    /// client's requests within seconds).
    pub async fn open_with_idle_timeout(
        addr: SocketAddr,
        server_name: &str,
        creds: &Credentials,
        name: &str,
        idle: Duration,
    ) -> Result<Volume, ClientError> {
        Volume::connect_and_open(addr, server_name, creds, name, idle, false).await
    }

    /// [`Volume::open_with_idle_timeout`] for a store forwarding its own client, which
    /// holds no copy of the volume: the other store serves it from its own copy or
    /// refuses, never forwards it on ([`proto::FLAG_FORWARDED`]), so a stale idea of
    /// where the copies are cannot make a loop.
    pub async fn open_forwarding(
        addr: SocketAddr,
        server_name: &str,
        creds: &Credentials,
        name: &str,
        idle: Duration,
    ) -> Result<Volume, ClientError> {
        Volume::connect_and_open(addr, server_name, creds, name, idle, true).await
    }

    async fn connect_and_open(
        addr: SocketAddr,
        server_name: &str,
        creds: &Credentials,
        name: &str,
        idle: Duration,
        forwarded: bool,
    ) -> Result<Volume, ClientError> {
        let bad = |e: &dyn std::fmt::Display| ClientError::Credentials(e.to_string());
        let node = tessera_pki::NodeCredentials {
            key_pem: creds.key_pem.clone(),
            cert_pem: creds.cert_pem.clone(),
        };
        let mut tls = tessera_pki::client_config(&node, &creds.ca_pem).map_err(|e| bad(&e))?;
        tls.alpn_protocols = vec![proto::ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(|e| bad(&e))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport(idle));
        let failed = |reason: String| ClientError::Connect { addr, reason };
        let local: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(local).map_err(|e| failed(e.to_string()))?;
        let conn = endpoint
            .connect_with(cfg, addr, server_name)
            .map_err(|e| failed(e.to_string()))?
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut v = Volume {
            conn,
            endpoint,
            size: 0,
            read_only: false,
        };
        let open = Request {
            kind: Kind::Open,
            fua: false,
            forwarded,
            offset: 0,
            length: name.len() as u64,
        };
        let reply = v
            .call(&open, name.as_bytes(), proto::OPEN_REPLY_LEN)
            .await?;
        let (size, read_only) = proto::decode_open_reply(&reply)
            .ok_or_else(|| ClientError::Protocol("an open reply of the wrong length".into()))?;
        v.size = size;
        v.read_only = read_only;
        Ok(v)
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True for a snapshot (writes are refused).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `len` bytes at `offset` (in requests of at most [`MAX_DATA`]).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let piece = (len - out.len()).min(MAX_DATA as usize);
            let r = Request {
                kind: Kind::Read,
                fua: false,
                forwarded: false,
                offset: offset + out.len() as u64,
                length: piece as u64,
            };
            let data = self.call(&r, &[], piece as u64).await?;
            if data.len() != piece {
                return Err(ClientError::Protocol(format!(
                    "{} bytes read where {piece} were asked",
                    data.len()
                )));
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    /// Writes `data` at `offset` (in requests of at most [`MAX_DATA`]); with `fua` it is
    /// durable on every in-sync copy when this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        for (i, piece) in data.chunks(MAX_DATA as usize).enumerate() {
            let r = Request {
                kind: Kind::Write,
                fua,
                forwarded: false,
                offset: offset + (i as u64) * MAX_DATA,
                length: piece.len() as u64,
            };
            self.call(&r, piece, 0).await?;
        }
        Ok(())
    }

    /// Makes every completed write durable on every in-sync copy.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let r = Request {
            kind: Kind::Flush,
            fua: false,
            forwarded: false,
            offset: 0,
            length: 0,
        };
        self.call(&r, &[], 0).await.map(drop)
    }

    /// Discards `len` bytes at `offset`; they read as zeros afterwards.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        let r = Request {
            kind: Kind::Trim,
            fua,
            forwarded: false,
            offset,
            length: len,
        };
        self.call(&r, &[], 0).await.map(drop)
    }

    /// The allocation of `len` bytes at `offset` as runs from `offset`; may cover less
    /// than asked, never nothing.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ClientError> {
        let r = Request {
            kind: Kind::BlockStatus,
            fua: false,
            forwarded: false,
            offset,
            length: len,
        };
        let b = self
            .call(&r, &[], (MAX_EXTENTS * proto::EXTENT_LEN) as u64)
            .await?;
        let extents = proto::decode_extents(&b)
            .ok_or_else(|| ClientError::Protocol("a malformed block status reply".into()))?;
        if extents.is_empty() && len > 0 {
            return Err(ClientError::Protocol("an empty block status reply".into()));
        }
        Ok(extents)
    }

    /// The blake3 hash of `len` bytes at `offset` (at most [`MAX_DATA`]), computed by
    /// the store, so only 32 bytes travel. A store older than this request answers
    /// `NotSupported`.
    pub async fn digest(&self, offset: u64, len: u64) -> Result<[u8; 32], ClientError> {
        let r = Request {
            kind: Kind::Digest,
            fua: false,
            forwarded: false,
            offset,
            length: len,
        };
        let b = self.call(&r, &[], proto::DIGEST_LEN).await?;
        b.try_into()
            .map_err(|_| ClientError::Protocol("a digest reply that is not 32 bytes".into()))
    }

    /// Closes the connection after every request finished.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }

    /// Sends `header` and `payload` as they are, on a stream of their own, and returns
    /// the reply's payload (at most `max_reply` bytes). For tests of a server's handling
    /// of frames this client never sends.
    pub async fn call_raw(
        &self,
        header: [u8; REQUEST_LEN],
        payload: &[u8],
        max_reply: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let lost = |e: &dyn std::fmt::Display| ClientError::Connection(e.to_string());
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| lost(&e))?;
        // The server may answer (a refusal) before it read the payload, and stop the
        // stream: the reply, if any, says why, so it is read whatever the send did.
        let sent = async {
            send.write_all(&header).await.map_err(|e| e.to_string())?;
            send.write_all(payload).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())
        }
        .await;
        let mut h = [0u8; REPLY_LEN];
        if let Err(e) = recv.read_exact(&mut h).await {
            return Err(match sent {
                Err(s) => lost(&s),
                Ok(()) => lost(&e),
            });
        }
        let (code, len) =
            proto::decode_reply(&h).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(code) = code {
            if len > MAX_MESSAGE {
                return Err(ClientError::Protocol(format!(
                    "an error message of {len} bytes"
                )));
            }
            let mut m = vec![0u8; len as usize];
            recv.read_exact(&mut m).await.map_err(|e| lost(&e))?;
            return Err(ClientError::Refused {
                code,
                message: String::from_utf8_lossy(&m).into_owned(),
            });
        }
        sent.map_err(|e| lost(&e))?;
        if len > max_reply {
            return Err(ClientError::Protocol(format!(
                "a reply of {len} bytes where at most {max_reply} fit"
            )));
        }
        let mut data = vec![0u8; len as usize];
        recv.read_exact(&mut data).await.map_err(|e| lost(&e))?;
        Ok(data)
    }

    async fn call(
        &self,
        r: &Request,
        payload: &[u8],
        max_reply: u64,
    ) -> Result<Vec<u8>, ClientError> {
        self.call_raw(proto::encode_request(r), payload, max_reply)
            .await
    }
}
