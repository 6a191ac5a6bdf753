//! Virtio devices for the Tessera VMM: the virtio-mmio transport, virtio-blk and virtio-net.
//!
//! Everything here treats guest memory and guest register writes as hostile: a device
//! validates every descriptor and register value, fails the request or marks itself
//! broken, and never panics. Devices do not know the transport (the [`VirtioDevice`]
//! trait sits between them) nor what is behind a disk (`tessera-disk`).

#![forbid(unsafe_code)]

pub mod blk;
pub mod mmio;
pub mod net;
pub mod ratelimit;

use std::io::Write;

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory as the devices see it. The bitmap records every page the VMM writes
/// (descriptor data, used rings), which KVM's dirty log cannot see; live migration
/// needs both.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// A virtio device behind some transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 for block).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn set_acked_features(&mut self, features: u64);
    /// The features accepted so far (for snapshots).
    fn acked_features(&self) -> u64;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Largest size of each queue.
    fn queue_max_size(&self) -> u16;
    /// Reads the device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The request-serving half of the device, which the transport runs on an I/O worker
    /// without holding the lock its registers need (so a slow disk never stalls a vCPU).
    fn request_handler(&self) -> Box<dyn RequestHandler>;
    /// Serves every available buffer of `queue` on the calling thread, completing each at
    /// once; returns whether the driver must be notified. An `Err` means the queue itself is
    /// corrupt and the device must stop. (The transport instead splits this around its lock.)
    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<bool, QueueBroken> {
        let acked = self.acked_features();
        queue.set_event_idx(acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let mut handler = self.request_handler();
        let mut used = false;
        loop {
            let next = {
                let mut it = queue.iter(mem).map_err(QueueBroken)?;
                it.next()
            };
            let Some(chain) = next else {
                // Re-check after enabling notifications so a request that raced in is seen.
                if queue.enable_notification(mem).map_err(QueueBroken)? {
                    continue;
                }
                break;
            };
            let done = handler.run(chain, mem, acked);
            let (head, len) = (done.head(), done.finish(mem));
            queue.add_used(mem, head, len).map_err(QueueBroken)?;
            used = true;
        }
        if !used {
            return Ok(false);
        }
        queue.needs_notification(mem).map_err(QueueBroken)
    }
    /// Returns to the initial state (driver reset).
    fn reset(&mut self);
}

/// The driver left a queue in a state no correct driver produces (for example an
/// available index more than a queue size ahead). The device stops using it.
#[derive(Debug, thiserror::Error)]
#[error("virtqueue is corrupt: {0}")]
pub struct QueueBroken(pub virtio_queue::Error);

/// Raises the device's interrupt in the guest.
pub trait Interrupt: Send + Sync {
    /// Signals the interrupt (for KVM, writes the irqfd).
    fn trigger(&self) -> std::io::Result<()>;
}

/// Runs requests taken off a device's queue. It may block on its backend for as long as
/// that takes: the transport calls it without its register lock.
pub trait RequestHandler: Send {
    /// Runs the request in `chain` with the features the driver accepted. Reads guest
    /// buffers and does the backend I/O, but writes nothing into guest memory: the returned
    /// [`Completion`] does that once the transport knows the queue was not reset meanwhile.
    fn run<'m>(
        &mut self,
        chain: DescriptorChain<&'m GuestMem>,
        mem: &'m GuestMem,
        acked_features: u64,
    ) -> Completion<'m>;
}

/// A finished request whose results are not in guest memory yet.
pub struct Completion<'m> {
    chain: DescriptorChain<&'m GuestMem>,
    data: Vec<u8>,
    trailer: Option<u8>,
}

impl<'m> Completion<'m> {
    /// `data` goes to the start of the chain's writable buffers, `trailer` (virtio-blk's
    /// status) into their very last byte.
    pub fn new(
        chain: DescriptorChain<&'m GuestMem>,
        data: Vec<u8>,
        trailer: Option<u8>,
    ) -> Completion<'m> {
        Completion {
            chain,
            data,
            trailer,
        }
    }

    /// A request that writes nothing back (it is returned with length 0).
    pub fn nothing(chain: DescriptorChain<&'m GuestMem>) -> Completion<'m> {
        Completion::new(chain, Vec::new(), None)
    }

    /// The chain's head index, for the used ring.
    pub fn head(&self) -> u16 {
        self.chain.head_index()
    }

    /// Writes the results into the chain's buffers; returns the bytes written (the used
    /// length). The driver may have rewritten the descriptors since the request ran: they
    /// are walked and bounds-checked again, and what does not fit is dropped.
    pub fn finish(self, mem: &GuestMem) -> u32 {
        let Ok(mut writer) = self.chain.writer(mem) else {
            return 0;
        };
        let Some(trailer) = self.trailer else {
            let _ = writer.write_all(&self.data);
            return writer.bytes_written() as u32;
        };
        let avail = writer.available_bytes();
        if avail == 0 {
            return 0;
        }
        let Ok(mut trailer_w) = writer.split_at(avail - 1) else {
            return 0;
        };
        let _ = writer.write_all(&self.data);
        if trailer_w.write_all(&[trailer]).is_err() {
            return 0;
        }
        (writer.bytes_written() + 1) as u32
    }
}
