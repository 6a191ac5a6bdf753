//! The running service: opens the store, serves NBD and the admin socket, stops cleanly.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tessera_blockstore::{Store, StoreOptions};
use tessera_nbd::ServerConfig;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

use crate::exports::StoreExports;
use crate::repl::quic::ReplEndpoint;
use crate::repl::{Replication, RoleError};
use tessera_store_admin::{
    self as admin, AdminError, AdminOp, AdminReply, AdminResponse, ErrorKind, Outcome, StoreStatus,
    ADMIN_VERSION,
};

/// Everything the daemon needs to run, validated before anything starts.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The store's data directory.
    pub data_dir: PathBuf,
    /// NBD over TCP with TLS required (client certificates of the cluster CA), if any;
    /// served once `nbd_tls_dir` holds the node's credentials.
    pub nbd_tcp: Option<SocketAddr>,
    /// Where the node's credentials appear (`tesserad`'s `<data_dir>/tls`); needed with
    /// `nbd_tcp`.
    pub nbd_tls_dir: Option<PathBuf>,
    /// Plain NBD over TCP, without any authentication: only for an address the operator
    /// trusts everyone who can reach (loopback on a single-user machine, tests).
    pub nbd_tcp_plain: Option<SocketAddr>,
    /// NBD over a Unix socket.
    pub nbd_unix: PathBuf,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Tunables of the block store.
    pub store: StoreOptions,
    /// Limits of the NBD server (both listeners).
    pub nbd: ServerConfig,
    /// Replication over QUIC (UDP) on this address, with the credentials in
    /// `nbd_tls_dir`; off when `None`.
    pub repl_quic: Option<SocketAddr>,
    /// The newest replication protocol version this store offers (normally
    /// [`tessera_replication::wire::VERSION`]; lower only to hold it at an older
    /// release's wire format).
    pub repl_max_version: u8,
    /// The QUIC volume export (`crate::export`) on this UDP address, with the
    /// credentials in `nbd_tls_dir`; off when `None`.
    pub export_quic: Option<SocketAddr>,
    /// The node's `tesserad` status socket: a client writing a volume this store holds a
    /// replica copy of asks it to move the primary here (`crate::claim`). Without it a
    /// replica copy's writes are refused, as before.
    pub tesserad_socket: Option<PathBuf>,
}

/// A started daemon; dropping it does not stop it, call [`Running::shutdown`].
pub struct Running {
    /// The store (for in-process callers such as tests or the demo).
    pub store: Store,
    /// Where plain NBD over TCP listens, if enabled (the real port when 0 was asked).
    /// The TLS listener binds later, when the credentials appear (see `crate::tls`).
    pub nbd_tcp_plain: Option<SocketAddr>,
    /// Where replication over QUIC listens, if enabled (the real port when 0 was asked).
    pub repl_quic: Option<SocketAddr>,
    /// Where the QUIC volume export listens, if enabled (the real port when 0 was asked).
    pub export_quic: Option<SocketAddr>,
    /// Every volume's replication role.
    pub replication: Arc<Replication>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops listening and waits for the store's final checkpoint.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let store = self.store;
        // The final checkpoint syncs files: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    }
}

/// Takes group and other access away from `dir` and everything under it (symlinks are
/// not followed), logging what it changed. The store's files hold the disks' contents;
/// new ones are private through the umask, this catches a directory made by an older
/// version or by hand with a wider umask. A missing `dir` is nothing to do.
pub fn make_private(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    tighten(dir, &mut changed)?;
    const SHOWN: usize = 10;
    if !changed.is_empty() {
        let shown: Vec<String> = changed
            .iter()
            .take(SHOWN)
            .map(|p| p.display().to_string())
            .collect();
        tracing::warn!(
            dir = %dir.display(),
            count = changed.len(),
            paths = ?shown,
            more = changed.len().saturating_sub(SHOWN),
            "removed group and other access from files others could read"
        );
    }
    Ok(changed)
}

fn tighten(path: &Path, changed: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7700))?;
        changed.push(path.to_path_buf());
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path(), changed)?;
        }
    }
    Ok(())
}

/// Opens the store and starts every listener.
pub async fn start(cfg: &DaemonConfig) -> anyhow::Result<Running> {
    if cfg.nbd_tcp.is_some() && cfg.nbd_tls_dir.is_none() {
        anyhow::bail!(
            "NBD over TCP is served with TLS only: give the directory of the node's credentials \
             (--nbd-tls-dir, tesserad's <data_dir>/tls), or use --nbd-tcp-plain for an address \
             everyone who can reach is trusted"
        );
    }
    make_private(&cfg.data_dir)
        .with_context(|| format!("making {} private", cfg.data_dir.display()))?;
    let dir = cfg.data_dir.clone();
    let opts = cfg.store.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir, opts))
        .await?
        .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;
    let mut tasks = Vec::new();
    let mut endpoint = None;
    if let Some(addr) = cfg.repl_quic {
        let Some(dir) = cfg.nbd_tls_dir.clone() else {
            anyhow::bail!("replication over QUIC needs the node's credentials (--nbd-tls-dir)");
        };
        let key = crate::repl::reset_key::ResetKey::load_or_create(
            &cfg.data_dir.join("replication/quic-reset.key"),
        );
        let ep = ReplEndpoint::bind(addr, dir, key, cfg.repl_max_version)?;
        tasks.push(tokio::spawn(crate::repl::quic::follow_credentials(
            ep.clone(),
        )));
        endpoint = Some(ep);
    }
    let repl_quic = match &endpoint {
        Some(ep) => Some(ep.local_addr()?),
        None => None,
    };
    let replication = Replication::new(store.clone(), endpoint.clone());
    replication.restore();
    if let Some(ep) = endpoint {
        tasks.push(tokio::spawn(crate::repl::replica::serve(
            ep,
            replication.replicas.clone(),
        )));
    }
    let exports = Arc::new(
        StoreExports::replicated(store.clone(), replication.clone())
            .with_cluster(
                cfg.tesserad_socket
                    .clone()
                    .map(crate::claim::ClusterAsk::new),
            )
            .with_forwarding(cfg.nbd_tls_dir.clone()),
    );
    if let (Some(addr), Some(dir)) = (cfg.nbd_tcp, cfg.nbd_tls_dir.clone()) {
        let (ex, nbd) = (exports.clone(), cfg.nbd.clone());
        tasks.push(tokio::spawn(crate::tls::serve(addr, dir, ex, nbd)));
    }
    let export_quic = match cfg.export_quic {
        Some(addr) => Some(start_export(cfg, addr, &exports, &mut tasks)?),
        None => None,
    };
    let mut nbd_tcp_plain = None;
    if let Some(addr) = cfg.nbd_tcp_plain {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding plain NBD TCP listener on {addr}"))?;
        nbd_tcp_plain = Some(l.local_addr()?);
        tracing::warn!(%addr, "serving plain NBD over TCP: anyone who can reach this address can read and write every volume");
        let (ex, nbd) = (exports.clone(), cfg.nbd.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = tessera_nbd::serve_tcp(l, ex, nbd).await {
                tracing::error!(error = %e, "NBD TCP listener failed");
            }
        }));
    }
    let l = tessera_nbd::bind_unix(&cfg.nbd_unix)
        .with_context(|| format!("binding NBD socket {}", cfg.nbd_unix.display()))?;
    let (ex, nbd) = (exports.clone(), cfg.nbd.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = tessera_nbd::serve_unix(l, ex, nbd).await {
            tracing::error!(error = %e, "NBD Unix listener failed");
        }
    }));
    let admin = tessera_nbd::bind_unix(&cfg.admin_socket)
        .with_context(|| format!("binding admin socket {}", cfg.admin_socket.display()))?;
    // Only root (the owner) may administer volumes.
    std::fs::set_permissions(&cfg.admin_socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", cfg.admin_socket.display()))?;
    let (st, rp) = (store.clone(), replication.clone());
    tasks.push(tokio::spawn(serve_admin(admin, st, rp)));
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        nbd_tls = ?cfg.nbd_tcp,
        nbd_plain = ?nbd_tcp_plain,
        nbd_unix = %cfg.nbd_unix.display(),
        repl_quic = ?repl_quic,
        export_quic = ?export_quic,
        admin = %cfg.admin_socket.display(),
        "tessera-store is serving"
    );
    Ok(Running {
        store,
        nbd_tcp_plain,
        repl_quic,
        export_quic,
        replication,
        tasks,
    })
}

/// Binds the QUIC volume export on `addr` (its own socket, the replication endpoint's
/// code and TLS rules with the export's ALPN) and starts serving `exports` on it once
/// the node's credentials are there. Returns the bound address.
fn start_export(
    cfg: &DaemonConfig,
    addr: SocketAddr,
    exports: &Arc<StoreExports>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let Some(dir) = cfg.nbd_tls_dir.clone() else {
        anyhow::bail!("the QUIC volume export needs the node's credentials (--nbd-tls-dir)");
    };
    let key_dir = cfg.data_dir.join("export");
    std::fs::create_dir_all(&key_dir).with_context(|| format!("creating {}", key_dir.display()))?;
    let key = crate::repl::reset_key::ResetKey::load_or_create(&key_dir.join("quic-reset.key"));
    let ep = ReplEndpoint::bind_for(addr, dir, key, tessera_volume_client::proto::ALPN)?;
    let bound = ep.local_addr()?;
    tasks.push(tokio::spawn(crate::repl::quic::follow_credentials(
        ep.clone(),
    )));
    tasks.push(tokio::spawn(crate::export::serve(ep, exports.clone())));
    Ok(bound)
}

async fn serve_admin(listener: UnixListener, store: Store, repl: Arc<Replication>) {
    loop {
        let sock = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::error!(error = %e, "admin socket accept failed");
                return;
            }
        };
        let (store, repl) = (store.clone(), repl.clone());
        tokio::spawn(async move {
            if let Err(e) = admin_connection(sock, store, repl).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn admin_connection(
    sock: tokio::net::UnixStream,
    store: Store,
    repl: Arc<Replication>,
) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = Vec::new();
        let n = (&mut r)
            .take(admin::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > admin::MAX_LINE;
        if too_long && line.last() != Some(&b'\n') {
            // Skip the rest of the overlong line in bounded pieces, then answer it.
            loop {
                let mut rest = Vec::new();
                let n = (&mut r)
                    .take(admin::MAX_LINE as u64)
                    .read_until(b'\n', &mut rest)
                    .await?;
                if n == 0 || rest.last() == Some(&b'\n') {
                    break;
                }
            }
        }
        let outcome = if too_long {
            Outcome::Error(AdminError {
                kind: ErrorKind::BadRequest,
                message: format!("request line longer than {} bytes", admin::MAX_LINE),
            })
        } else {
            match std::str::from_utf8(&line).map_err(|e| AdminError {
                kind: ErrorKind::BadRequest,
                message: e.to_string(),
            }) {
                Err(e) => Outcome::Error(e),
                Ok(text) => match admin::parse_request(text.trim_end()) {
                    Err(e) => Outcome::Error(e),
                    Ok(op) => {
                        let (st, rp) = (store.clone(), repl.clone());
                        tokio::task::spawn_blocking(move || execute(&st, &rp, op))
                            .await
                            .unwrap_or_else(|e| {
                                Outcome::Error(AdminError {
                                    kind: ErrorKind::Io,
                                    message: format!("operation failed: {e}"),
                                })
                            })
                    }
                },
            }
        };
        let mut out = serde_json::to_vec(&AdminResponse {
            v: ADMIN_VERSION,
            outcome,
        })
        .map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

/// Runs one admin operation against the store.
pub fn execute(store: &Store, repl: &Replication, op: AdminOp) -> Outcome {
    // `tesserad` asks for the status every few seconds: not worth a log line each time.
    if !matches!(op, AdminOp::Status {} | AdminOp::ReplicationStatus {}) {
        tracing::info!(?op, "admin operation");
    }
    let res = match op {
        AdminOp::CreateVolume { name, size } => {
            store.create_volume(&name, size).map(AdminReply::Volume)
        }
        AdminOp::ListVolumes {} => Ok(AdminReply::Volumes(store.list_volumes())),
        AdminOp::VolumeInfo { name } => store.volume_info(&name).map(AdminReply::Volume),
        AdminOp::ResizeVolume { name, size } => {
            // A replicated volume's copies grow through its primary's stream.
            match repl.resize_volume(&name, size) {
                None => store.resize_volume(&name, size),
                Some(Ok(info)) => Ok(info),
                Some(Err(RoleError::Store(e))) => Err(e),
                Some(Err(RoleError::Refused(why))) => {
                    tracing::info!(error = %why, "admin operation refused");
                    return Outcome::Error(AdminError {
                        kind: ErrorKind::Invalid,
                        message: why,
                    });
                }
            }
            .map(AdminReply::Volume)
        }
        AdminOp::DeleteVolume { name } => store.delete_volume(&name).map(|()| AdminReply::Done),
        AdminOp::CreateSnapshot { volume, snapshot } => {
            // A replicated volume's snapshot goes through its primary's stream.
            match repl.create_snapshot(&volume, &snapshot) {
                None => store.create_snapshot(&volume, &snapshot),
                Some(Ok(info)) => Ok(info),
                Some(Err(RoleError::Store(e))) => Err(e),
                Some(Err(RoleError::Refused(why))) => {
                    tracing::info!(error = %why, "admin operation refused");
                    return Outcome::Error(AdminError {
                        kind: ErrorKind::Invalid,
                        message: why,
                    });
                }
            }
            .map(AdminReply::Snapshot)
        }
        AdminOp::DeleteSnapshot { volume, snapshot } => {
            store.delete_snapshot(&volume, &snapshot).map(|()| {
                repl.forget_snapshot(&volume, &snapshot);
                AdminReply::Done
            })
        }
        AdminOp::CloneSnapshot {
            volume,
            snapshot,
            name,
        } => store
            .clone_snapshot(&volume, &snapshot, &name)
            .map(AdminReply::Volume),
        // Bad blocks of volumes this store is the primary of are repaired from replicas.
        AdminOp::Scrub {} => store
            .scrub()
            .map(|r| AdminReply::Scrub(repl.repair_scrubbed(r))),
        AdminOp::Status {} => Ok(AdminReply::Status(status(store))),
        AdminOp::SetReplication {
            volume,
            generation,
            role,
        } => match repl.set_role(&volume, generation, &role) {
            Ok(_) => store.volume_info(&volume).map(AdminReply::Volume),
            Err(RoleError::Store(e)) => Err(e),
            Err(RoleError::Refused(why)) => {
                tracing::info!(error = %why, "admin operation refused");
                return Outcome::Error(AdminError {
                    kind: ErrorKind::Invalid,
                    message: why,
                });
            }
        },
        AdminOp::ReplicationStatus {} => Ok(AdminReply::Replication(repl.status())),
    };
    match res {
        Ok(r) => Outcome::Ok(r),
        Err(e) => {
            tracing::info!(error = %e, "admin operation refused");
            Outcome::Error(AdminError::from(&e))
        }
    }
}

/// The store's health and what it holds: memory and the catalog only, so it answers even
/// when the disk under the store has failed.
fn status(store: &Store) -> StoreStatus {
    let exports = store.list_exports();
    let snapshots = exports.iter().filter(|(_, snapshot)| *snapshot).count();
    StoreStatus {
        degraded: store.degraded(),
        data_dir: store.dir().display().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        volumes: (exports.len() - snapshots) as u64,
        snapshots: snapshots as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_data_dir_left_readable_is_made_private_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let (dir, wal, seg) = (
            d.path().join("store"),
            d.path().join("store/wal"),
            d.path().join("store/wal/1.wal"),
        );
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::write(&seg, b"disk contents").unwrap();
        let shared = outside.path().join("shared");
        std::fs::write(&shared, b"not ours").unwrap();
        std::os::unix::fs::symlink(&shared, dir.join("link")).unwrap();
        for (p, m) in [
            (&dir, 0o755),
            (&wal, 0o750),
            (&seg, 0o644),
            (&shared, 0o644),
        ] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let changed = make_private(&dir).unwrap();
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert_eq!((mode(&dir), mode(&wal), mode(&seg)), (0o700, 0o700, 0o600));
        assert_eq!(
            mode(&shared),
            0o644,
            "a link's target is not ours to change"
        );
        assert!(make_private(&dir).unwrap().is_empty());
        assert!(make_private(&d.path().join("missing")).unwrap().is_empty());
    }
}
