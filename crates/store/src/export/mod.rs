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

/// Opens what the client at `addr` names in its `Open` (`forwarded`: a store forwarding
/// its own client): the device and the name to show for it, or the refusal's code and
/// words. The name may carry a writer key after it
/// (`vol#KEY`, `tessera_nbd::export_name`, as over NBD): it goes to the exports, which
/// split it off, and nowhere else; every log line and refusal names the export without
/// it.
async fn open<E: Exports>(
    exports: Arc<E>,
    name: String,
    addr: std::net::SocketAddr,
    forwarded: bool,
) -> Result<(Arc<E::Device>, String), (ErrorCode, String)> {
    let (shown, key) = tessera_nbd::export_name::split(&name);
    let (shown, key) = (shown.to_string(), key.map(str::to_string));
    // Never a VM's VMM (those use NBD): asked about like any other writer. A store
    // forwarding its own client is served from a copy here, never forwarded on.
    let peer = tessera_nbd::Peer::Other {
        name: format!("quic {addr}"),
        relayed: forwarded,
    };
    let opened = tokio::task::spawn_blocking(move || exports.open_for(&name, &peer))
        .await
        .map_err(|e| (ErrorCode::Io, format!("opening {shown:?} failed: {e}")))?;
    match opened {
        Ok(Some(d)) => {
            tracing::info!(%addr, volume = %shown, "volume export: volume opened over QUIC");
            Ok((d, shown))
        }
        Ok(None) => Err((
            ErrorCode::NotFound,
            format!("no volume or snapshot named {shown:?} on this store"),
        )),
        // The exports' words name the export without the key; should one ever echo the
        // name it was given, the key is taken out here.
        Err(e) => Err((
            request::code_of(e.errno),
            match key {
                Some(k) => e.message.replace(&k, "(writer key)"),
                None => e.message,
            },
        )),
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
    let (device, name) = match open(exports.clone(), name, addr, forwarded).await {
        Ok(opened) => opened,
        Err((code, why)) => return refuse(send, &mut recv, code, &why).await,
    };
    use tessera_nbd::Device;
    let payload = proto::encode_open_reply(device.size(), device.read_only());
    reply(&mut send, None, &payload).await?;
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tessera_nbd::{Device, DeviceError, ExportEntry, Extent};

    use super::*;

    const KEY: &str = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e7aaaa";

    /// A volume `v` of 1 MiB; `denied` is refused with words echoing the whole name it
    /// was asked for; the names asked for are kept.
    #[derive(Default)]
    struct Fake {
        asked: Mutex<Vec<String>>,
    }

    impl Device for Fake {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn extents(&self, _: u64, _: u64) -> Result<Vec<Extent>, DeviceError> {
            Ok(Vec::new())
        }
    }

    impl Exports for Fake {
        type Device = Fake;
        fn list(&self) -> Vec<ExportEntry> {
            Vec::new()
        }
        fn open(&self, name: &str) -> Result<Option<Arc<Fake>>, DeviceError> {
            self.asked.lock().unwrap().push(name.to_string());
            match tessera_nbd::export_name::shown(name) {
                "v" => Ok(Some(Arc::new(Fake::default()))),
                "denied" => Err(DeviceError::new(
                    tessera_nbd::proto::Errno::Perm,
                    format!("{name} may not be written here"),
                )),
                _ => Ok(None),
            }
        }
    }

    const ADDR: &str = "127.0.0.1:1";

    /// A client sending `vol#KEY` over QUIC: the key reaches the exports (which admit
    /// writers by it) and appears in no refusal, no name shown, no log line.
    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_key_after_the_name_is_never_shown() {
        let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        let _log = tracing::subscriber::set_default(subscriber);
        let exports = Arc::new(Fake::default());

        let (device, shown) = open(
            exports.clone(),
            format!("v#{KEY}"),
            ADDR.parse().unwrap(),
            false,
        )
        .await
        .unwrap();
        assert_eq!(shown, "v");
        assert_eq!(device.size(), 1 << 20);

        let Err((code, why)) = open(
            exports.clone(),
            format!("nosuch#{KEY}"),
            ADDR.parse().unwrap(),
            false,
        )
        .await
        else {
            panic!("nosuch opened");
        };
        assert_eq!(code, ErrorCode::NotFound);
        assert!(why.contains("\"nosuch\"") && !why.contains(KEY), "{why}");

        let Err((code, why)) = open(
            exports.clone(),
            format!("denied#{KEY}"),
            ADDR.parse().unwrap(),
            false,
        )
        .await
        else {
            panic!("denied opened");
        };
        assert_eq!(code, ErrorCode::NotPermitted);
        assert!(why.contains("denied") && !why.contains(KEY), "{why}");

        // The exports were given the key each time.
        let asked = exports.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 3, "{asked:?}");
        assert!(
            asked.iter().all(|n| n.ends_with(&format!("#{KEY}"))),
            "{asked:?}"
        );
        let logged = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("volume opened over QUIC") && logged.contains("volume=v"),
            "{logged}"
        );
        assert!(!logged.contains(KEY), "{logged}");
        assert!(!logged.contains("5ec2e7"), "{logged}");
    }

    /// A log writer into a shared buffer.
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
