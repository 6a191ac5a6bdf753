//! The VM's virtio-mmio devices as the vCPUs and the I/O threads share them: the disk's
//! and each NIC's transport, its interrupt (an irqfd) and its queue notification (an
//! ioeventfd that wakes the device's own I/O thread, so a vCPU never waits for I/O).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use tessera_virtio::blk::Block;
use tessera_virtio::mmio::{self, MmioTransport, MMIO_WINDOW};
use tessera_virtio::net::Net;
use tessera_virtio::Interrupt;
use vmm_sys_util::eventfd::EventFd;

use super::error::{kvm, thread, VmError};
use crate::layout::{VIRTIO_IRQ, VIRTIO_MMIO_BASE};

struct IrqFd(EventFd);

impl Interrupt for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A virtio-mmio device as the vCPU sees it: where its registers are, the registers, and
/// the eventfd that wakes its I/O worker.
#[derive(Clone)]
pub(crate) struct Virtio {
    pub base: u64,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub kick: Arc<EventFd>,
}

/// The transport's lock, or why it cannot be had.
pub(crate) fn lock(
    t: &Arc<Mutex<MmioTransport>>,
) -> Result<std::sync::MutexGuard<'_, MmioTransport>, VmError> {
    t.lock().map_err(|_| VmError::Poisoned("virtio device"))
}

/// The device whose register window holds the whole access, and the offset in it.
pub(crate) fn mmio_device(devices: &[Virtio], addr: u64, len: usize) -> Option<(&Virtio, u64)> {
    let end = addr.checked_add(len as u64)?;
    devices
        .iter()
        .find(|v| addr >= v.base && end <= v.base + MMIO_WINDOW)
        .map(|v| (v, addr - v.base))
}

/// Sets up the virtio-blk device over `disk` at the disk's window, with its interrupt,
/// its queue notification and the I/O thread that serves its requests.
pub(crate) fn start_disk(
    vm: &VmFd,
    mem: &tessera_virtio::GuestMem,
    disk: Box<dyn tessera_disk::Disk>,
) -> Result<Virtio, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&irq, VIRTIO_IRQ)
        .map_err(kvm("register virtio irqfd"))?;
    let t = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(Block::new(disk)),
        mem.clone(),
        Arc::new(IrqFd(irq)),
    )));
    // Queue notifications land in an eventfd (no exit to us); an I/O thread serves them.
    let notify = EventFd::new(0).map_err(VmError::EventFd)?;
    vm.register_ioevent(
        &notify,
        &IoEventAddress::Mmio(VIRTIO_MMIO_BASE + 0x50),
        NoDatamatch,
    )
    .map_err(kvm("register ioeventfd"))?;
    let kick = Arc::new(notify.try_clone().map_err(VmError::EventFd)?);
    let worker = t.clone();
    // The worker takes the transport's lock only around taking requests off the queue
    // and completing them, never across disk I/O: the vCPU's MMIO exits need that lock.
    std::thread::Builder::new()
        .name("virtio-blk".into())
        .spawn(move || loop {
            if notify.read().is_err() {
                return;
            }
            if let Err(e) = mmio::serve(&worker, 0) {
                tracing::error!(error = %e, "virtio-blk worker stops");
                return;
            }
        })
        .map_err(thread("virtio-blk"))?;
    Ok(Virtio {
        base: VIRTIO_MMIO_BASE,
        transport: t,
        kick,
    })
}

/// Sets up NIC `nic` at `base` with interrupt `irq`: its tap, the virtio-net device, the
/// irqfd and ioeventfd, and the I/O thread that moves its frames.
pub(crate) fn start_nic(
    vm: &VmFd,
    mem: &tessera_virtio::GuestMem,
    nic: &crate::net::NicConfig,
    base: u64,
    irq: u32,
) -> Result<Virtio, VmError> {
    let mac = nic.check()?;
    let tap = Arc::new(crate::net::Tap::open(nic)?);
    let (dev, worker) = Net::new(mac, tap.clone());
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&irqfd, irq)
        .map_err(kvm("register virtio-net irqfd"))?;
    let t = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(dev),
        mem.clone(),
        Arc::new(IrqFd(irqfd)),
    )));
    let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_ioevent(&notify, &IoEventAddress::Mmio(base + 0x50), NoDatamatch)
        .map_err(kvm("register virtio-net ioeventfd"))?;
    let kick = Arc::new(notify.try_clone().map_err(VmError::EventFd)?);
    let worker_t = t.clone();
    let name = format!("virtio-net-{}", tap.name());
    tracing::info!(tap = %tap.name(), mac = %nic.mac, base = format_args!("{base:#x}"), irq, "NIC attached");
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let Err(e) = crate::net::io_loop(worker_t, worker, notify, tap) {
                tracing::error!(error = %e, "virtio-net I/O thread stops");
            }
        })
        .map_err(thread(&name))?;
    Ok(Virtio {
        base,
        transport: t,
        kick,
    })
}
