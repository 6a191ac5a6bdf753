//! A forwarded export as the NBD server and the QUIC export see it: a
//! [`tessera_nbd::Device`] whose every request runs on another node's store.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tessera_nbd::device::{RemoteExtents, RemoteRead, RemoteWrite};
use tessera_nbd::proto::{Errno, STATE_HOLE, STATE_ZERO};
use tessera_nbd::{Device, DeviceError, Extent};
use tessera_volume_client::proto::EXTENT_HOLE;
use tessera_volume_client::{ClientError, Volume};
use tokio::runtime::Handle;

use super::link::{refuse_fenced, resend, Link};
use super::{failed, run, REQUEST_WAIT, WRITE_CHECK_EVERY};
use crate::claim::{self, ClusterAsk};
use crate::exports::StoreDevice;

/// An export this store serves: its own copy, or another node's store's through a
/// forwarded connection.
pub enum ExportDevice {
    /// A volume or snapshot this store holds.
    Local(StoreDevice),
    /// One it holds no copy of.
    Forwarded(ForwardedDevice),
}

/// An export opened on another node's store for a client of this one.
pub struct ForwardedDevice {
    pub(super) export: String,
    /// The volume (of a snapshot export: its volume), for the cluster's questions.
    pub(super) volume: String,
    pub(super) read_only: bool,
    /// The connection to the other store, made again when it breaks.
    pub(super) link: Arc<Link>,
    pub(super) rt: Handle,
    pub(super) cluster: ClusterAsk,
    /// When the cluster last said no VM uses the volume.
    pub(super) write_checked: Mutex<Option<Instant>>,
}

impl ForwardedDevice {
    /// Runs `f` on the connection and waits for it from this thread.
    fn call<T, F, G>(&self, write: bool, f: G) -> Result<T, DeviceError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ClientError>> + Send + 'static,
        G: Fn(Arc<Volume>) -> F + Send + Sync + 'static,
    {
        // The request bounds itself (REQUEST_WAIT); this is only a backstop.
        match run(&self.rt, REQUEST_WAIT * 2, self.call_async(write, f)) {
            Some(r) => r,
            None => Err(failed(&self.export, &self.link.via(), None)),
        }
    }

    /// Refuses a write when a VM uses the volume (asked of the cluster at the client's
    /// first write, then at most every [`WRITE_CHECK_EVERY`]), or when the client is
    /// fenced.
    fn may_write(&self) -> Result<(), DeviceError> {
        refuse_fenced(&self.link)?;
        let mut last = self.write_checked.lock();
        if last.is_some_and(|t| t.elapsed() < WRITE_CHECK_EVERY) {
            return Ok(());
        }
        claim::blocking(|| self.cluster.may_write(&self.volume)).map_err(|why| {
            tracing::warn!(export = %self.export, reason = %why, "a forwarded client's write refused");
            DeviceError::new(Errno::Perm, why)
        })?;
        *last = Some(Instant::now());
        Ok(())
    }

    /// Starts `f` on the connection and returns its completion, bounded by
    /// [`REQUEST_WAIT`], without holding a thread meanwhile. A request whose connection
    /// broke is sent once more on a new one (`link::resend`): a write without its reply
    /// was not acknowledged, and sending it again is what its client would do. One that
    /// timed out is not (it may still land): EIO.
    fn call_async<T, F, G>(
        &self,
        write: bool,
        f: G,
    ) -> Pin<Box<dyn Future<Output = Result<T, DeviceError>> + Send>>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ClientError>> + Send + 'static,
        G: Fn(Arc<Volume>) -> F + Send + Sync + 'static,
    {
        let (link, export) = (self.link.clone(), self.export.clone());
        Box::pin(async move {
            let began = Instant::now();
            let mut again = false;
            loop {
                let left = REQUEST_WAIT.saturating_sub(began.elapsed());
                let r = match tokio::time::timeout(left, link.get()).await {
                    Ok(r) => r?,
                    Err(_) => return Err(failed(&export, &link.via(), None)),
                };
                if write {
                    refuse_fenced(&link)?;
                }
                let left = REQUEST_WAIT.saturating_sub(began.elapsed());
                let e = match tokio::time::timeout(left, f(r.volume.clone())).await {
                    Ok(Ok(t)) => {
                        if write {
                            link.wrote(&r);
                        }
                        return Ok(t);
                    }
                    Ok(Err(e)) => Some(e),
                    Err(_) => None,
                };
                link.failed(&r, e.as_ref()).await;
                if !resend(e.as_ref(), again) {
                    return Err(failed(&export, &r.via, e));
                }
                tracing::info!(export = %export, node = %r.via, error = ?e,
                    "a forwarded request's connection broke; sending it again on a new one");
                again = true;
            }
        })
    }

    fn write_forwarded(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.may_write()?;
        let data = Arc::new(data);
        self.call(true, move |v| {
            let data = data.clone();
            async move { v.write(offset, &data, fua).await }
        })
    }

    fn trim_forwarded(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.may_write()?;
        self.call(true, move |v| async move { v.trim(offset, len, fua).await })
    }
}

impl Device for ForwardedDevice {
    fn size(&self) -> u64 {
        self.link.size()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let len = buf.len();
        let data = self.call(false, move |v| async move { v.read(offset, len).await })?;
        // The client checks each answer's length; never a panic on another store's word.
        if data.len() != len {
            return Err(failed(
                &self.export,
                &self.link.via(),
                Some(ClientError::Protocol(format!(
                    "{} bytes read where {len} were asked",
                    data.len()
                ))),
            ));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }
    fn remote_reads(&self) -> bool {
        true
    }
    fn read_remote(&self, offset: u64, len: usize) -> RemoteRead {
        self.call_async(false, move |v| async move { v.read(offset, len).await })
    }
    fn extents_remote(&self, offset: u64, len: u64) -> RemoteExtents {
        let runs = self.call_async(
            false,
            move |v| async move { v.block_status(offset, len).await },
        );
        Box::pin(async move { Ok(runs.await?.into_iter().map(extent_of).collect()) })
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.write_forwarded(offset, data.to_vec(), fua)
    }
    fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.write_forwarded(offset, data, fua)
    }
    fn remote_writes(&self) -> bool {
        true
    }
    fn write_remote(&self, offset: u64, data: Vec<u8>, fua: bool) -> RemoteWrite {
        if let Err(e) = self.may_write() {
            return Box::pin(std::future::ready(Err(e)));
        }
        let data = Arc::new(data);
        self.call_async(true, move |v| {
            let data = data.clone();
            async move { v.write(offset, &data, fua).await }
        })
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.call(false, |v| async move { v.flush().await })
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.trim_forwarded(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        // The export's trim is its write-zeroes: a trimmed range reads as zeros, and
        // Tessera's copies store zeros as holes whatever NO_HOLE asks.
        self.trim_forwarded(offset, len, fua)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let runs = self.call(
            false,
            move |v| async move { v.block_status(offset, len).await },
        )?;
        Ok(runs.into_iter().map(extent_of).collect())
    }
}

/// An extent of the other store's answer as NBD's.
fn extent_of(e: tessera_volume_client::proto::Extent) -> Extent {
    Extent {
        length: e.length,
        flags: if e.flags & EXTENT_HOLE != 0 {
            STATE_HOLE
        } else {
            0
        } | if e.is_zero() { STATE_ZERO } else { 0 },
    }
}

/// Every call to the device behind.
macro_rules! either {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            ExportDevice::Local($d) => $e,
            ExportDevice::Forwarded($d) => $e,
        }
    };
}

impl Device for ExportDevice {
    fn size(&self) -> u64 {
        either!(self, d => d.size())
    }
    fn read_only(&self) -> bool {
        either!(self, d => d.read_only())
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        either!(self, d => d.read(offset, buf))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        either!(self, d => d.write(offset, data, fua))
    }
    fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        either!(self, d => d.write_owned(offset, data, fua))
    }
    fn remote_writes(&self) -> bool {
        either!(self, d => d.remote_writes())
    }
    fn write_remote(&self, offset: u64, data: Vec<u8>, fua: bool) -> RemoteWrite {
        either!(self, d => d.write_remote(offset, data, fua))
    }
    fn remote_reads(&self) -> bool {
        either!(self, d => d.remote_reads())
    }
    fn read_remote(&self, offset: u64, len: usize) -> RemoteRead {
        either!(self, d => d.read_remote(offset, len))
    }
    fn extents_remote(&self, offset: u64, len: u64) -> RemoteExtents {
        either!(self, d => d.extents_remote(offset, len))
    }
    fn flush(&self) -> Result<(), DeviceError> {
        either!(self, d => d.flush())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        either!(self, d => d.trim(offset, len, fua))
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        either!(self, d => d.write_zeroes(offset, len, no_hole, fua))
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        either!(self, d => d.extents(offset, len))
    }
}
