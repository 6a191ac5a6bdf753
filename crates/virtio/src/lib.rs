//! Virtio devices for the Tessera VMM: the virtio-mmio transport and virtio-blk.
//!
//! Everything here treats guest memory and guest register writes as hostile: a device
//! validates every descriptor and register value, fails the request or marks itself
//! broken, and never panics. Devices do not know the transport (the [`VirtioDevice`]
//! trait sits between them) nor what is behind a disk (`tessera-disk`).

#![forbid(unsafe_code)]

pub mod blk;
pub mod mmio;

use virtio_queue::Queue;
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
    /// Processes available buffers of queue `index`; returns whether the driver must be
    /// notified. An `Err` means the queue itself is corrupt and the device must stop.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<bool, QueueBroken>;
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
