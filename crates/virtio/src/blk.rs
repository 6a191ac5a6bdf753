//! virtio-blk (virtio 1.x, section 5.2): read, write, flush, get-id, discard and
//! write-zeroes against any [`Disk`].
//!
//! Requests are parsed with no assumption about how the driver split them into
//! descriptors (the header, data and status may share or span descriptors). Every length
//! and sector is checked before the disk is touched; a request that does not check out
//! gets `VIRTIO_BLK_S_IOERR` (or `UNSUPP`), and a chain with nowhere to put a status is
//! returned with length 0.

use std::io::Read;
use std::sync::{Arc, Mutex};

use tessera_disk::Disk;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;

use crate::ratelimit::LogLimit;
use crate::{Completion, GuestMem, RequestHandler, VirtioDevice};

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Largest data payload of one request (bounds the bounce buffer a guest can make us allocate).
pub const MAX_REQUEST: usize = 4 << 20;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Largest discard / write-zeroes range of one segment, in sectors.
const MAX_RANGE_SECTORS: u32 = 1 << 22; // 2 GiB
/// Segments per discard / write-zeroes request.
const MAX_RANGE_SEGS: u32 = 1;

/// A virtio-blk device: its registers' side (features, configuration space). Requests are
/// served by its [`BlockRequests`], which the transport runs without its register lock.
pub struct Block {
    disk: Arc<dyn Disk>,
    acked: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Shared by its request handlers: a failing disk fails every request.
    log_limit: Arc<Mutex<LogLimit>>,
}

/// Serves virtio-blk requests against the disk; may block on it for as long as it takes.
pub struct BlockRequests {
    disk: Arc<dyn Disk>,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    acked: u64,
    log_limit: Arc<Mutex<LogLimit>>,
}

/// Status of a request, as the device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        match self {
            Status::Ok => VIRTIO_BLK_S_OK as u8,
            Status::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

impl Block {
    /// A block device over `disk`.
    pub fn new(disk: Box<dyn Disk>) -> Block {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let s = disk.id();
        let n = s.len().min(id.len());
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        Block {
            disk: Arc::from(disk),
            acked: 0,
            id,
            log_limit: Arc::new(Mutex::new(crate::ratelimit::guest_lines())),
        }
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&(MAX_REQUEST as u32).to_le_bytes()); // size_max
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&4096u32.to_le_bytes()); // blk_size
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_RANGE_SEGS.to_le_bytes());
        c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&MAX_RANGE_SEGS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

impl RequestHandler for BlockRequests {
    fn run<'m>(
        &mut self,
        chain: DescriptorChain<&'m GuestMem>,
        mem: &'m GuestMem,
        acked_features: u64,
    ) -> Completion<'m> {
        self.acked = acked_features;
        let Ok(mut reader) = chain.clone().reader(mem) else {
            tracing::debug!("virtio-blk: readable descriptors outside guest memory");
            return Completion::nothing(chain);
        };
        let Ok(writer) = chain.clone().writer(mem) else {
            tracing::debug!("virtio-blk: writable descriptors outside guest memory");
            return Completion::nothing(chain);
        };
        // The status byte is the last writable byte; without one the request cannot even fail.
        let writable = writer.available_bytes();
        if writable == 0 {
            tracing::debug!("virtio-blk: request without a status byte");
            return Completion::nothing(chain);
        }
        let (status, data) = match self.handle(&mut reader, writable - 1) {
            Ok(data) => (Status::Ok, data),
            Err(s) => (s, Vec::new()),
        };
        Completion::new(chain, data, Some(status.byte()))
    }
}

impl BlockRequests {
    fn acked(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    /// Runs one request whose writable buffers hold `writable` bytes before the status;
    /// returns what goes into them.
    fn handle<B: BitmapSlice>(
        &mut self,
        r: &mut virtio_queue::Reader<'_, B>,
        writable: usize,
    ) -> Result<Vec<u8>, Status> {
        let hdr: [u8; 16] = r.read_obj().map_err(|_| Status::IoErr)?;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writable;
                let off = self.range(sector, len)?;
                let mut buf = vec![0u8; len];
                self.disk
                    .read_at(off, &mut buf)
                    .map_err(|e| self.fail("read", e))?;
                Ok(buf)
            }
            VIRTIO_BLK_T_OUT => {
                if self.disk.read_only() {
                    return Err(Status::IoErr);
                }
                let len = r.available_bytes();
                let off = self.range(sector, len)?;
                let mut buf = vec![0u8; len];
                r.read_exact(&mut buf).map_err(|_| Status::IoErr)?;
                self.disk
                    .write_at(off, &buf)
                    .map_err(|e| self.fail("write", e))?;
                Ok(Vec::new())
            }
            VIRTIO_BLK_T_FLUSH if self.acked(VIRTIO_BLK_F_FLUSH) => {
                self.disk.flush().map_err(|e| self.fail("flush", e))?;
                Ok(Vec::new())
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writable.min(self.id.len());
                Ok(self.id[..n].to_vec())
            }
            VIRTIO_BLK_T_DISCARD if self.acked(VIRTIO_BLK_F_DISCARD) => {
                self.ranges(r, false).map(|()| Vec::new())
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.acked(VIRTIO_BLK_F_WRITE_ZEROES) => {
                self.ranges(r, true).map(|()| Vec::new())
            }
            other => {
                tracing::debug!(kind = other, "virtio-blk: unsupported request type");
                Err(Status::Unsupp)
            }
        }
    }

    /// Checks a data request: whole sectors, bounded, inside the disk. Returns its offset.
    fn range(&self, sector: u64, len: usize) -> Result<u64, Status> {
        if len % SECTOR as usize != 0 || len > MAX_REQUEST {
            return Err(Status::IoErr);
        }
        let off = sector.checked_mul(SECTOR).ok_or(Status::IoErr)?;
        match off.checked_add(len as u64) {
            Some(end) if end <= self.disk.size() => Ok(off),
            _ => Err(Status::IoErr),
        }
    }

    /// Discard or write-zeroes: a list of (sector, count, flags) segments.
    fn ranges<B: BitmapSlice>(
        &mut self,
        r: &mut virtio_queue::Reader<'_, B>,
        zero: bool,
    ) -> Result<(), Status> {
        let bytes = r.available_bytes();
        if bytes == 0 || bytes % 16 != 0 || bytes / 16 > MAX_RANGE_SEGS as usize {
            return Err(Status::IoErr);
        }
        for _ in 0..bytes / 16 {
            let seg: [u8; 16] = r.read_obj().map_err(|_| Status::IoErr)?;
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(s);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Only write-zeroes knows a flag (unmap); discard must have none.
            if count > MAX_RANGE_SECTORS || flags & !u32::from(zero) != 0 {
                return Err(Status::Unsupp);
            }
            let len = u64::from(count) * SECTOR;
            let off = sector.checked_mul(SECTOR).ok_or(Status::IoErr)?;
            if off
                .checked_add(len)
                .is_none_or(|end| end > self.disk.size())
            {
                return Err(Status::IoErr);
            }
            let res = if zero {
                self.disk.write_zeroes(off, len)
            } else {
                self.disk.discard(off, len)
            };
            res.map_err(|e| self.fail(if zero { "write-zeroes" } else { "discard" }, e))?;
        }
        Ok(())
    }

    fn fail(&self, what: &str, e: tessera_disk::DiskError) -> Status {
        if let Ok(mut limit) = self.log_limit.lock() {
            crate::limited!(limit, warn, error = %e, "virtio-blk: {what} failed");
        }
        Status::IoErr
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn request_handler(&self) -> Box<dyn RequestHandler> {
        Box::new(BlockRequests {
            disk: self.disk.clone(),
            id: self.id,
            acked: self.acked,
            log_limit: self.log_limit.clone(),
        })
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}
