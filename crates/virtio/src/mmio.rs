//! The virtio-mmio (version 2) transport: the register window a driver programs.
//!
//! Register layout from the virtio 1.x specification, section 4.2.2. Reads and writes of
//! the wrong width, unknown offsets, writes in the wrong device state and queue
//! configurations that do not fit guest memory are ignored (and logged) or fail feature
//! negotiation; they never reach the device.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};

use crate::{Completion, GuestMem, Interrupt, RequestHandler, VirtioDevice};

mod worker;
pub use worker::{quiesced, quiesced_within, serve};

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Our vendor id ("TESS").
const VENDOR: u32 = 0x5353_4554;
/// Size of the register window.
pub const MMIO_WINDOW: u64 = 0x1000;

/// A queue's state in a snapshot (mirrors `virtio_queue::QueueState`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// The transport's and device's state in a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct TransportSnapshot {
    pub status: u32,
    pub interrupt_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub acked_features: u64,
    pub queues: Vec<QueueSnapshot>,
}

/// Why a saved transport state was refused. The snapshot is untrusted input.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot was taken of a device with a different number of queues.
    #[error("snapshot has {snapshot} queues, device has {device}")]
    QueueCount {
        /// Queues in the snapshot.
        snapshot: usize,
        /// Queues of this device.
        device: usize,
    },
    /// A queue's sizes or addresses are not a queue `virtio-queue` accepts.
    #[error("queue in snapshot: {0:?}")]
    Queue(virtio_queue::Error),
    /// A ready queue whose rings are not inside guest memory.
    #[error("queue in snapshot lies outside guest memory")]
    OutsideGuestMemory,
}

/// A thread panicked while holding the transport's or its request handler's lock.
#[derive(Debug, thiserror::Error)]
#[error("virtio device lock poisoned")]
pub struct Poisoned;

/// Why [`quiesced_within`] did not run its function.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    /// See [`Poisoned`].
    #[error(transparent)]
    Poisoned(#[from] Poisoned),
    /// Requests were still in flight when the time was up (a backend that hangs).
    #[error("disk requests still in flight after {0:?}")]
    TimedOut(Duration),
}

/// Requests of one batch that run at once (each on its own handler and thread). The
/// NBD backend pipelines them on its connection; a raw file lets the kernel overlap them.
pub const MAX_PARALLEL_REQUESTS: usize = 8;

/// One device behind a virtio-mmio register window.
///
/// Register accesses (vCPU exits) and queue serving share this state under one lock, but
/// serving holds it only to take requests off a queue and to complete them, never while a
/// request waits on the device's backend: see [`serve`].
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    /// The device's request halves (one per request run at once); their lock is held for
    /// a whole batch of requests, so holding it keeps the device from touching guest
    /// memory (see [`quiesced`]).
    requests: Arc<Mutex<Vec<Box<dyn RequestHandler>>>>,
    /// Changes on every reset and restore: a batch taken before one is dropped unwritten.
    generation: u64,
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    /// Lines a driver's mistakes make (a guest can make them in a loop).
    log_limit: crate::ratelimit::LogLimit,
}

impl MmioTransport {
    /// Wraps `device`, whose queues live in `mem` and whose interrupt is `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        interrupt: Arc<dyn Interrupt>,
    ) -> MmioTransport {
        let max = device.queue_max_size();
        let queues = (0..device.num_queues())
            .filter_map(|_| Queue::new(max).ok())
            .collect();
        MmioTransport {
            requests: Arc::new(Mutex::new(
                (0..MAX_PARALLEL_REQUESTS)
                    .map(|_| device.request_handler())
                    .collect(),
            )),
            generation: 0,
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            log_limit: crate::ratelimit::guest_lines(),
        }
    }

    /// Captures the transport and device state.
    pub fn save(&self) -> TransportSnapshot {
        TransportSnapshot {
            status: self.status,
            interrupt_status: self.interrupt_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            acked_features: self.device.acked_features(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx_enabled: s.event_idx_enabled,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
        }
    }

    /// Restores a captured state. The snapshot is untrusted input: queues are validated
    /// as if the driver had just programmed them.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), RestoreError> {
        if s.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                snapshot: s.queues.len(),
                device: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for q in &s.queues {
            let state = QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx_enabled,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            let queue = Queue::try_from(state).map_err(RestoreError::Queue)?;
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(RestoreError::OutsideGuestMemory);
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.generation = self.generation.wrapping_add(1);
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.device
            .set_acked_features(s.acked_features & self.device.features());
        Ok(())
    }

    /// The driver status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn has(&self, bit: u32) -> bool {
        self.status & bit != 0
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 {
            crate::limited!(
                self.log_limit,
                debug,
                offset,
                len = data.len(),
                "virtio-mmio: register read of the wrong width"
            );
            data.fill(0);
            return;
        }
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                crate::limited!(
                    self.log_limit,
                    debug,
                    offset,
                    "virtio-mmio: read of an unknown register"
                );
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Handles a guest write at `offset`. Returns the queue index when the write was a
    /// queue notification (the caller processes it, possibly on another thread).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u32> {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // virtio-blk has no writable configuration fields we honour.
            return None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::limited!(
                self.log_limit,
                debug,
                offset,
                len = data.len(),
                "virtio-mmio: register write of the wrong width"
            );
            return None;
        };
        let v = u32::from_le_bytes(bytes);
        let configuring = self.has(VIRTIO_CONFIG_S_DRIVER) && !self.has(VIRTIO_CONFIG_S_DRIVER_OK);
        let features_open =
            self.has(VIRTIO_CONFIG_S_DRIVER) && !self.has(VIRTIO_CONFIG_S_FEATURES_OK);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configuring => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if configuring => {
                let mem = self.mem.clone();
                let mut refused = false;
                if let Some(q) = self.queue() {
                    // A queue whose rings do not fit guest memory is never made ready.
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(&mem) {
                        q.set_ready(false);
                        refused = true;
                    }
                }
                if refused {
                    crate::limited!(
                        self.log_limit,
                        info,
                        "virtio-mmio: driver enabled an invalid queue; refused"
                    );
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if configuring => {
                self.set_addr(|q, v| q.set_desc_table_address(Some(v), None), v)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configuring => {
                self.set_addr(|q, v| q.set_desc_table_address(None, Some(v)), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configuring => {
                self.set_addr(|q, v| q.set_avail_ring_address(Some(v), None), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configuring => {
                self.set_addr(|q, v| q.set_avail_ring_address(None, Some(v)), v)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if configuring => {
                self.set_addr(|q, v| q.set_used_ring_address(Some(v), None), v)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if configuring => {
                self.set_addr(|q, v| q.set_used_ring_address(None, Some(v)), v)
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => return Some(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            other => crate::limited!(
                self.log_limit,
                debug,
                offset = other,
                value = v,
                "virtio-mmio: write ignored in this state"
            ),
        }
        None
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.queue() {
            f(q, v);
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits only accumulate (spec 2.1.2); anything else is a driver bug.
        if v & self.status != self.status {
            crate::limited!(
                self.log_limit,
                info,
                old = self.status,
                new = v,
                "virtio-mmio: driver cleared status bits; ignored"
            );
            return;
        }
        let mut v = v;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.has(VIRTIO_CONFIG_S_FEATURES_OK) {
            let offered = self.device.features();
            let legal = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if legal {
                self.device.set_acked_features(self.driver_features);
            } else {
                crate::limited!(
                    self.log_limit,
                    info,
                    driver = self.driver_features,
                    offered,
                    "virtio-mmio: feature negotiation failed"
                );
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v = (v & !VIRTIO_CONFIG_S_DRIVER_OK) | VIRTIO_CONFIG_S_FAILED;
        }
        let _ = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        self.status = v;
    }

    fn reset(&mut self) {
        // A batch still waiting on the backend now completes into nothing.
        self.generation = self.generation.wrapping_add(1);
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.interrupt_status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }

    /// Hands queue `index` to `f` under the transport's lock, with guest memory and the
    /// features the driver accepted, when the driver has the device running and the queue
    /// set up: for queues a device fills from the host side (virtio-net's receive queue) or
    /// serves without waiting (its transmit queue). `f` returns its result and whether it
    /// put buffers in the used ring (the driver is then signalled if it asked to be); an
    /// `Err` from `f` means the queue is corrupt and marks the device broken. `None` when
    /// the queue was not handed out.
    pub fn with_queue<R>(
        &mut self,
        index: usize,
        f: impl FnOnce(&mut Queue, &GuestMem, u64) -> Result<(R, bool), virtio_queue::Error>,
    ) -> Option<R> {
        if !self.has(VIRTIO_CONFIG_S_DRIVER_OK) || self.has(VIRTIO_CONFIG_S_NEEDS_RESET) {
            return None;
        }
        let acked = self.device.acked_features();
        let mem = self.mem.clone();
        let q = self.queues.get_mut(index).filter(|q| q.ready())?;
        match f(q, &mem, acked) {
            Ok((r, used)) => {
                let at = QueueAt {
                    index,
                    generation: self.generation,
                };
                if used {
                    self.signal_used(&at, &mem);
                }
                Some(r)
            }
            Err(e) => {
                self.broken(e);
                None
            }
        }
    }

    /// Serves a notification of queue `index` on the calling thread, under the caller's
    /// `&mut` (for a transport no other thread shares; shared ones use [`serve`]).
    pub fn notify(&mut self, index: u32) {
        let (requests, mem) = (self.requests.clone(), self.mem.clone());
        let mut requests = requests.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(handler) = requests.first_mut() else {
            return;
        };
        while let Some(batch) = self.take_requests(index, &mem) {
            let mut served = true;
            for chain in batch.chains {
                let done = handler.run(chain, &mem, batch.acked);
                if !self.complete(&batch.at, done, &mem) {
                    served = false;
                    break;
                }
            }
            if !served || !self.signal_used(&batch.at, &mem) {
                break;
            }
        }
    }

    /// Takes every available request off queue `index`, or `None` when there is nothing
    /// to serve (not running, broken, no such queue, or the queue is empty).
    fn take_requests<'m>(&mut self, index: u32, mem: &'m GuestMem) -> Option<Batch<'m>> {
        if !self.has(VIRTIO_CONFIG_S_DRIVER_OK) || self.has(VIRTIO_CONFIG_S_NEEDS_RESET) {
            return None;
        }
        let acked = self.device.acked_features();
        let Some(q) = self.queues.get_mut(index as usize) else {
            tracing::debug!(
                index,
                "virtio-mmio: notification for a queue that does not exist"
            );
            return None;
        };
        if !q.ready() {
            return None;
        }
        q.set_event_idx(acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        loop {
            let taken: Result<Vec<_>, _> = q.iter(mem).map(|it| it.collect());
            match taken {
                Ok(chains) if !chains.is_empty() => {
                    return Some(Batch {
                        at: QueueAt {
                            index: index as usize,
                            generation: self.generation,
                        },
                        acked,
                        chains,
                    })
                }
                // Re-check after enabling notifications so a request that raced in is seen.
                Ok(_) => match q.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => {
                        self.broken(e);
                        return None;
                    }
                },
                Err(e) => {
                    self.broken(e);
                    return None;
                }
            }
        }
    }

    /// Puts one request's results into guest memory and the used ring. Returns whether the
    /// queue may be served further (false after a reset or a breakage: then nothing of the
    /// request reaches guest memory, or the queue is marked broken).
    fn complete(&mut self, at: &QueueAt, done: Completion<'_>, mem: &GuestMem) -> bool {
        if at.generation != self.generation {
            tracing::debug!(
                "virtio-mmio: device reset while a request was in flight; its results dropped"
            );
            return false;
        }
        let Some(q) = self.queues.get_mut(at.index) else {
            return false;
        };
        let head = done.head();
        let len = done.finish(mem);
        if let Err(e) = q.add_used(mem, head, len) {
            self.broken(e);
            return false;
        }
        true
    }

    /// Signals the driver, if it wants to be, that a batch's requests are in the used ring.
    fn signal_used(&mut self, at: &QueueAt, mem: &GuestMem) -> bool {
        if at.generation != self.generation {
            return false;
        }
        let Some(q) = self.queues.get_mut(at.index) else {
            return false;
        };
        match q.needs_notification(mem) {
            Ok(true) => {
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                if let Err(e) = self.interrupt.trigger() {
                    tracing::error!(error = %e, "could not signal the guest");
                }
                true
            }
            Ok(false) => true,
            Err(e) => {
                self.broken(e);
                false
            }
        }
    }

    fn broken(&mut self, e: virtio_queue::Error) {
        crate::limited!(
            self.log_limit,
            warn,
            error = ?e,
            "virtio device marked broken: virtqueue is corrupt"
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        let _ = self.interrupt.trigger();
    }
}

/// Which queue, before which reset, a request was taken from.
struct QueueAt {
    index: usize,
    generation: u64,
}

/// Requests taken off a queue, to be run without the transport's lock. Each is completed
/// as soon as it has run, so a batch never holds more than one request's data.
struct Batch<'m> {
    at: QueueAt,
    acked: u64,
    chains: Vec<DescriptorChain<&'m GuestMem>>,
}
