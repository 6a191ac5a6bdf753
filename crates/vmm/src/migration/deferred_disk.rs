//! The disk of an incoming VM, attached only when the VM may run: the target builds the
//! whole VM (the virtio-blk device included, with the size the guest already saw) before
//! the cluster has moved the volume's primary to its node, and opens the real disk at
//! `go`. A request before that waits for it (none comes: the vCPUs do not run, but the
//! device's I/O thread looks at a restored queue once) or fails after a bound.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tessera_disk::{Disk, DiskError};

use super::wire::DiskInfo;
use super::Shared;

/// How long a request waits for the disk to be attached before it fails.
const ATTACH_WAIT: Duration = Duration::from_secs(120);

/// A disk whose backend comes later; share it with [`DeferredDisk::handle`].
pub struct DeferredDisk {
    info: DiskInfo,
    inner: Mutex<Option<Arc<dyn Disk>>>,
    attached: Condvar,
    /// Where the first request's start and end are marked (the downtime's last part:
    /// the guest's first disk request after it resumed, and how long the disk took).
    watch: Mutex<Option<Arc<Shared>>>,
}

/// Why a disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The disk opened is not the size the guest saw.
    #[error("the target's disk has {found} bytes; the guest's had {want}")]
    Size {
        /// The guest's disk size.
        want: u64,
        /// The opened disk's.
        found: u64,
    },
}

impl DeferredDisk {
    /// A disk of the source's size and mode, not attached yet.
    pub fn new(info: DiskInfo) -> Arc<DeferredDisk> {
        Arc::new(DeferredDisk {
            info,
            inner: Mutex::new(None),
            attached: Condvar::new(),
            watch: Mutex::new(None),
        })
    }

    /// Marks the first request's start and end (`first_disk_request`, `first_disk_done`)
    /// in `shared`'s timeline, and logs the timeline then.
    pub fn watch_first_request(&self, shared: Arc<Shared>) {
        *self.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(shared);
    }

    /// Runs request `f`, marking it when it is the first watched one.
    fn request<T>(
        &self,
        f: impl FnOnce(&dyn Disk) -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let watch = self.watch.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(sh) = &watch {
            sh.mark("first_disk_request");
        }
        let res = self.get().and_then(|d| f(&*d));
        if let Some(sh) = watch {
            sh.mark("first_disk_done");
            tracing::info!(
                timeline = %super::timeline_line(&sh.status().timeline),
                "the migrated guest's first disk request is done"
            );
        }
        res
    }

    /// What the virtio-blk device holds.
    pub fn handle(self: &Arc<Self>) -> Box<dyn Disk> {
        Box::new(Handle(self.clone()))
    }

    /// Attaches the real disk (it must be the size the guest saw); waiting requests go on.
    pub fn attach(&self, disk: Box<dyn Disk>) -> Result<(), AttachError> {
        if disk.size() != self.info.size {
            return Err(AttachError::Size {
                want: self.info.size,
                found: disk.size(),
            });
        }
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::from(disk));
        self.attached.notify_all();
        Ok(())
    }

    fn get(&self) -> Result<Arc<dyn Disk>, DiskError> {
        let deadline = Instant::now() + ATTACH_WAIT;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = g.as_ref() {
                return Ok(d.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DiskError::Io(std::io::Error::other(
                    "the incoming VM's disk was never attached",
                )));
            }
            g = self
                .attached
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

struct Handle(Arc<DeferredDisk>);

impl Disk for Handle {
    fn size(&self) -> u64 {
        self.0.info.size
    }
    fn read_only(&self) -> bool {
        self.0.info.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.request(|d| d.read_at(offset, buf))
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.0.request(|d| d.write_at(offset, data))
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.0.request(|d| d.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.0.request(|d| d.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.0.request(|d| d.write_zeroes(offset, len))
    }
    fn id(&self) -> String {
        let g = self.0.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|d| d.id()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Mutex<Vec<u8>>);
    impl Disk for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            let g = self.0.lock().unwrap();
            buf.copy_from_slice(&g[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.0.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<(), DiskError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64) -> Result<(), DiskError> {
            Ok(())
        }
        fn id(&self) -> String {
            "mem".into()
        }
    }

    #[test]
    fn a_request_waits_for_the_disk_and_a_wrong_size_is_refused() {
        let d = DeferredDisk::new(DiskInfo {
            size: 4096,
            read_only: false,
        });
        let h = d.handle();
        assert_eq!(h.size(), 4096);
        assert_eq!(h.id(), "");
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            h.read_at(0, &mut b).map(|()| b)
        });
        let small = Box::new(Mem(Mutex::new(vec![0; 512])));
        assert!(matches!(
            d.attach(small),
            Err(AttachError::Size {
                want: 4096,
                found: 512
            })
        ));
        let mut data = vec![0u8; 4096];
        data[..4].copy_from_slice(b"disk");
        d.attach(Box::new(Mem(Mutex::new(data)))).unwrap();
        assert_eq!(&reader.join().unwrap().unwrap(), b"disk");
        assert_eq!(d.handle().id(), "mem");
    }
}
