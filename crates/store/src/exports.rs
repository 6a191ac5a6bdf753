//! The bridge between the block store and the NBD server: store exports as NBD devices.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tessera_blockstore::{Allocation, Export, Store, StoreError};
use tessera_nbd::device::RemoteWrite;
use tessera_nbd::proto::{Errno, STATE_HOLE, STATE_ZERO};
use tessera_nbd::{Device, DeviceError, ExportEntry, Exports, Extent, Peer};
use tessera_replication::replica::Op;
use tessera_replication::wire::MAX_DATA;

use crate::admission::Writer;
use crate::claim::{self, ClusterAsk};
use crate::forward::{self, ExportDevice};
use crate::repl::Replication;

/// Every volume and snapshot of a store, as NBD exports.
pub struct StoreExports {
    store: Store,
    repl: Option<Arc<Replication>>,
    /// The node's `tesserad`, asked to move a volume's primary here (`crate::claim`).
    cluster: Option<ClusterAsk>,
    /// How a client is forwarded to another node's store (`crate::forward`).
    forwarder: Option<forward::Forwarder>,
}

impl StoreExports {
    /// Wraps a store whose volumes are not replicated.
    pub fn new(store: Store) -> Self {
        StoreExports {
            store,
            repl: None,
            cluster: None,
            forwarder: None,
        }
    }

    /// Wraps a store whose volumes may be replicated: writes to a volume this store is
    /// the primary of go through its replication, writes to a replica are refused.
    pub fn replicated(store: Store, repl: Arc<Replication>) -> Self {
        StoreExports {
            store,
            repl: Some(repl),
            cluster: None,
            forwarder: None,
        }
    }

    /// A client's first write to a volume this store holds a replica copy of asks
    /// `cluster` to make this node its primary; a volume it holds no copy of is served by
    /// forwarding to a node that holds one ([`StoreExports::with_forwarding`]), else
    /// refused at open with where its copies are.
    pub fn with_cluster(mut self, cluster: Option<ClusterAsk>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Forwards a client of a volume this store holds no copy of to another node's store,
    /// authenticated with the node's credentials in `tls_dir` (`crate::forward`).
    pub fn with_forwarding(mut self, tls_dir: Option<std::path::PathBuf>) -> Self {
        self.forwarder = tls_dir.map(forward::Forwarder::new);
        self
    }
}

/// One open export. Its role is looked up at every write, so a role set while a client
/// is connected applies to that client's next write.
pub struct StoreDevice {
    export: Export,
    repl: Option<Arc<Replication>>,
    cluster: Option<ClusterAsk>,
    /// This client wrote through the store as the volume's primary: if the store no
    /// longer is, the primary moved away since, and this client's writes are fenced (it
    /// does not take the primary back).
    wrote_as_primary: AtomicBool,
    /// Whether this client may write while a VM uses the volume (`crate::admission`).
    writer: Writer,
}

/// How long a write waits for a role change of its volume on this node to end (a new
/// primary reconciles its copies first: bounded by the replicas' timeout).
const ROLE_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Where a write goes.
enum Route {
    /// Straight to the local copy.
    Local,
    /// Through the volume's primary.
    Replicated(Arc<crate::repl::primary::PrimaryHandle>),
}

impl StoreDevice {
    /// Where a write (or trim, write-zeroes) goes. A replica copy here becomes the
    /// primary through the cluster first, unless this client wrote here as the primary
    /// before (then the primary moved away meanwhile: fenced).
    fn route(&self) -> Result<Route, DeviceError> {
        let Some(repl) = &self.repl else {
            return Ok(Route::Local);
        };
        let name = self.export.name();
        let epoch = repl.role_epoch();
        if let Some(p) = repl.primaries.get(name) {
            self.wrote_as_primary.store(true, Ordering::Relaxed);
            return Ok(Route::Replicated(p));
        }
        if repl.waits_for_configuration(name) {
            // Just restarted: tesserad sets the role within seconds, so a client that
            // reconnected at once (a forwarding store does, `crate::forward`) waits for
            // it like for a role change instead of failing.
            let deadline = std::time::Instant::now() + ROLE_CHANGE_WAIT;
            let configured = claim::blocking(|| {
                while repl.waits_for_configuration(name) {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                true
            });
            if configured {
                return self.route();
            }
            return Err(DeviceError::new(
                Errno::Perm,
                format!("volume {name} was this store's replicated primary before it restarted: writes are refused until tesserad configures it again"),
            ));
        }
        if self.wrote_as_primary.load(Ordering::Relaxed) {
            return Err(DeviceError::new(
                Errno::Perm,
                format!("volume {name}: its primary moved to another node after this client wrote here; this client's writes are refused (fenced); connect again to write through this node"),
            ));
        }
        if !repl.replicas.is_replica(name) {
            // Neither role: a volume without replication, or one whose role is changing
            // right now (then this copy alone must not take the write).
            // Almost always settled: asked without leaving the async worker (a
            // `block_in_place` hands the worker's core to another thread, a thread
            // wake-up on every write).
            let settled = repl.settled_epoch_now().or_else(|| {
                claim::blocking(|| repl.settled_epoch(std::time::Instant::now() + ROLE_CHANGE_WAIT))
            });
            return match settled {
                Some(e) if e == epoch => Ok(Route::Local),
                Some(_) => self.route(),
                None => Err(DeviceError::new(
                    Errno::Io,
                    format!("volume {name}: its replication role on this node is still changing after {ROLE_CHANGE_WAIT:?}; try again"),
                )),
            };
        }
        let Some(cluster) = &self.cluster else {
            return Err(DeviceError::new(
                Errno::Perm,
                format!("volume {name} is a replica on this store: only its primary writes it"),
            ));
        };
        let p = claim::blocking(|| cluster.take_primary(name, || repl.primaries.get(name)))
            .map_err(|why| {
                tracing::warn!(volume = name, reason = %why, "an export client's write refused");
                DeviceError::new(Errno::Perm, why)
            })?;
        self.wrote_as_primary.store(true, Ordering::Relaxed);
        Ok(Route::Replicated(p))
    }

    /// Whether this client may write (a snapshot is refused as read-only by the store
    /// itself, not here).
    fn admitted(&self) -> Result<(), DeviceError> {
        if self.export.read_only() {
            return Ok(());
        }
        self.writer.check(self.export.name())
    }

    /// The volume's primary, if this store is it.
    fn primary(&self) -> Option<Arc<crate::repl::primary::PrimaryHandle>> {
        self.repl.as_ref()?.primaries.get(self.export.name())
    }

    /// The primary of the volume this export is or is a snapshot (`volume@snapshot`) of,
    /// if this store is it.
    fn volume_primary(&self) -> Option<Arc<crate::repl::primary::PrimaryHandle>> {
        self.repl.as_ref()?.primaries.get(self.volume())
    }

    /// The volume the export reads (a snapshot export's too).
    fn volume(&self) -> &str {
        let name = self.export.name();
        name.split_once('@').map_or(name, |(v, _)| v)
    }

    /// Runs `op` through the primary, split into frames the wire carries.
    fn forward(p: &crate::repl::primary::PrimaryHandle, op: Op) -> Result<(), DeviceError> {
        let fail =
            |e: crate::repl::primary::ForwardError| DeviceError::new(Errno::Io, e.to_string());
        match op {
            Op::Write { offset, fua, data } if data.len() > MAX_DATA => {
                let mut at = 0usize;
                while at < data.len() {
                    let end = (at + MAX_DATA).min(data.len());
                    p.submit(Op::Write {
                        offset: offset + at as u64,
                        fua: false,
                        data: data[at..end].to_vec(),
                    })
                    .map_err(fail)?;
                    at = end;
                }
                if fua {
                    p.submit(Op::Flush).map_err(fail)?;
                }
                Ok(())
            }
            op => p.submit(op).map_err(fail),
        }
    }

    /// Runs a write through the primary without holding a thread: every frame is
    /// submitted at once (they pipeline), then awaited; FUA is a flush after them all.
    async fn forward_write(
        p: Arc<crate::repl::primary::PrimaryHandle>,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let fail =
            |e: crate::repl::primary::ForwardError| DeviceError::new(Errno::Io, e.to_string());
        if data.len() <= MAX_DATA {
            return p
                .submit_async(Op::Write { offset, fua, data })
                .await
                .map_err(fail);
        }
        let pieces: Vec<_> = data
            .chunks(MAX_DATA)
            .enumerate()
            .map(|(i, piece)| {
                p.submit_async(Op::Write {
                    offset: offset + (i * MAX_DATA) as u64,
                    fua: false,
                    data: piece.to_vec(),
                })
            })
            .collect();
        drop(data);
        let mut first_error = None;
        for piece in pieces {
            if let Err(e) = piece.await {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(fail(e));
        }
        if fua {
            p.submit_async(Op::Flush).await.map_err(fail)?;
        }
        Ok(())
    }
}

fn errno(e: &StoreError) -> Errno {
    match e {
        StoreError::NoSpace { .. } => Errno::NoSpc,
        StoreError::ReadOnly => Errno::Perm,
        StoreError::OutOfRange { .. } | StoreError::Invalid { .. } => Errno::Inval,
        StoreError::Gone(_) => Errno::Shutdown,
        _ => Errno::Io,
    }
}

fn dev_err(e: StoreError) -> DeviceError {
    DeviceError::new(errno(&e), e.to_string())
}

impl Device for StoreDevice {
    fn size(&self) -> u64 {
        self.export.size()
    }
    fn read_only(&self) -> bool {
        self.export.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        match self.export.read_at(offset, buf) {
            // A bad block on a primary's copy (of the volume or of one of its snapshots)
            // is repaired from an in-sync replica; on a replica's, from the primary.
            Err(e @ StoreError::Corrupt { .. }) => match self.volume_primary() {
                Some(p) => p
                    .read_repaired(&self.export, offset, buf)
                    .map_err(|why| DeviceError::new(Errno::Io, format!("{e}; {why}"))),
                None => match &self.repl {
                    Some(r) if r.replicas.is_replica(self.volume()) => r
                        .read_repaired_on_replica(&self.export, offset, buf)
                        .map_err(|why| DeviceError::new(Errno::Io, format!("{e}; {why}"))),
                    _ => Err(dev_err(e)),
                },
            },
            r => r.map_err(dev_err),
        }
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.write_owned(offset, data.to_vec(), fua)
    }
    fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.admitted()?;
        match self.route()? {
            Route::Local => self.export.write_owned(offset, data, fua).map_err(dev_err),
            Route::Replicated(p) => Self::forward(&p, Op::Write { offset, fua, data }),
        }
    }
    fn remote_writes(&self) -> bool {
        // Asked on the async side: never a move of the primary (that waits) from here.
        self.primary().is_some()
    }
    fn write_remote(&self, offset: u64, data: Vec<u8>, fua: bool) -> RemoteWrite {
        if let Err(e) = self.admitted() {
            return Box::pin(std::future::ready(Err(e)));
        }
        match self.route() {
            Ok(Route::Replicated(p)) => Box::pin(Self::forward_write(p, offset, data, fua)),
            // The role changed since the server asked: written like any other write.
            _ => Box::pin(std::future::ready(self.write_owned(offset, data, fua))),
        }
    }
    fn flush(&self) -> Result<(), DeviceError> {
        // A client that never wrote (a reader of a replica copy) flushes nothing of its
        // own: it does not move the primary.
        let reader = self.primary().is_none() && !self.wrote_as_primary.load(Ordering::Relaxed);
        if reader
            && self
                .repl
                .as_ref()
                .is_some_and(|r| r.replicas.is_replica(self.export.name()))
        {
            return Ok(());
        }
        match self.route()? {
            Route::Local => self.export.flush().map_err(dev_err),
            Route::Replicated(p) => Self::forward(&p, Op::Flush),
        }
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.admitted()?;
        match self.route()? {
            Route::Local => self.export.trim(offset, len, fua).map_err(dev_err),
            Route::Replicated(p) => {
                Self::forward(&p, Op::Trim { offset, len })?;
                if fua {
                    Self::forward(&p, Op::Flush)?;
                }
                Ok(())
            }
        }
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.admitted()?;
        match self.route()? {
            Route::Local => self
                .export
                .write_zeroes(offset, len, no_hole, fua)
                .map_err(dev_err),
            // Replicas store zeroes as holes: NO_HOLE is not carried on the wire.
            Route::Replicated(p) => {
                Self::forward(&p, Op::WriteZeroes { offset, len })?;
                if fua {
                    Self::forward(&p, Op::Flush)?;
                }
                Ok(())
            }
        }
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(self
            .export
            .extents(offset, len)
            .map_err(dev_err)?
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                flags: match e.allocation {
                    Allocation::Data => 0,
                    Allocation::Hole => STATE_HOLE | STATE_ZERO,
                },
            })
            .collect())
    }
}

impl Exports for StoreExports {
    type Device = ExportDevice;

    fn list(&self) -> Vec<ExportEntry> {
        let mut listed: Vec<ExportEntry> = self
            .store
            .list_exports()
            .into_iter()
            .map(|(name, snapshot)| ExportEntry {
                description: if snapshot {
                    "Tessera snapshot (read-only)".into()
                } else {
                    "Tessera volume".into()
                },
                name,
            })
            .collect();
        if let (Some(c), Some(_)) = (&self.cluster, &self.forwarder) {
            forward::list_elsewhere(c, &mut listed);
        }
        listed
    }

    fn open(&self, name: &str) -> Result<Option<Arc<ExportDevice>>, DeviceError> {
        // A client nothing is known of is asked about like the QUIC export's.
        let peer = Peer::Other {
            name: "unknown".into(),
            relayed: false,
        };
        self.open_for(name, &peer)
    }

    fn open_for(&self, name: &str, peer: &Peer) -> Result<Option<Arc<ExportDevice>>, DeviceError> {
        // A writer key after the name: a VMM's (`crate::admission`), never forwarded.
        let (name, key) = tessera_nbd::export_name::split(name);
        match self.store.open_export(name) {
            Ok(export) => Ok(Some(Arc::new(ExportDevice::Local(StoreDevice {
                export,
                repl: self.repl.clone(),
                cluster: self.cluster.clone(),
                wrote_as_primary: AtomicBool::new(false),
                writer: Writer::for_peer(self.cluster.as_ref(), peer, key),
            })))),
            Err(StoreError::NotFound(_)) if forward::relayed(peer) => {
                Err(forward::not_forwarded_again(name))
            }
            Err(StoreError::NotFound(_)) => {
                let base = name.split('@').next().unwrap_or(name);
                let Some(c) = self.cluster.as_ref() else {
                    return Ok(None);
                };
                match claim::blocking(|| c.copies_elsewhere(base)) {
                    Some(copies) => forward::open(self.forwarder.as_ref(), c, name, base, copies)
                        .map(|d| Some(Arc::new(ExportDevice::Forwarded(d)))),
                    None => Ok(None),
                }
            }
            Err(e) => Err(dev_err(e)),
        }
    }
}
