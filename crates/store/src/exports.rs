//! The bridge between the block store and the NBD server: store exports as NBD devices.

use std::sync::Arc;

use tessera_blockstore::{Allocation, Export, Store, StoreError};
use tessera_nbd::proto::{Errno, STATE_HOLE, STATE_ZERO};
use tessera_nbd::{Device, DeviceError, ExportEntry, Exports, Extent};

/// Every volume and snapshot of a store, as NBD exports.
pub struct StoreExports {
    store: Store,
}

impl StoreExports {
    /// Wraps a store.
    pub fn new(store: Store) -> Self {
        StoreExports { store }
    }
}

/// One open export.
pub struct StoreDevice(Export);

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
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.0.read_at(offset, buf).map_err(dev_err)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.0.write_at(offset, data, fua).map_err(dev_err)
    }
    fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.0.write_owned(offset, data, fua).map_err(dev_err)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush().map_err(dev_err)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.0.trim(offset, len, fua).map_err(dev_err)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.0
            .write_zeroes(offset, len, no_hole, fua)
            .map_err(dev_err)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(self
            .0
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
    type Device = StoreDevice;

    fn list(&self) -> Vec<ExportEntry> {
        self.store
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
            .collect()
    }

    fn open(&self, name: &str) -> Result<Option<Arc<StoreDevice>>, DeviceError> {
        match self.store.open_export(name) {
            Ok(e) => Ok(Some(Arc::new(StoreDevice(e)))),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(dev_err(e)),
        }
    }
}
