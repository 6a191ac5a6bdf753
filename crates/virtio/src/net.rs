//! virtio-net (virtio 1.x, section 5.1): one receive and one transmit queue over a
//! [`NetBackend`] (a tap opened with `IFF_VNET_HDR`), the MAC and link status in the
//! configuration space, and checksum/segmentation offloads carried in the 12-byte
//! virtio-net header, which the device passes between guest and backend unchanged.
//!
//! Both queues are served under the transport's lock ([`crate::mmio::MmioTransport::with_queue`]):
//! a frame is one non-blocking read or write of the backend, never a wait. Every chain is
//! checked before it is used: a receive chain must be all device-writable and a transmit
//! chain all device-readable, inside guest memory, its length within [`MAX_PACKET`]; a
//! header must only use offloads the driver negotiated. What fails is dropped and counted
//! ([`NetStats`]), the chain returned to the driver, and at most a few lines logged.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::mmio::{MmioTransport, Poisoned};
use crate::ratelimit::LogLimit;
use crate::{Completion, GuestMem, RequestHandler, VirtioDevice};

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-net header with VIRTIO_F_VERSION_1 (`struct virtio_net_hdr_v1`): flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (without header): a 64 KiB GSO packet, Ethernet and one VLAN tag.
pub const MAX_FRAME: usize = 65_535 + 14 + 4;
/// Largest header and frame the device moves in one chain.
pub const MAX_PACKET: usize = VNET_HDR_LEN + MAX_FRAME;
/// Smallest frame worth sending: an Ethernet header.
const MIN_FRAME: usize = 14;

/// `TUN_F_*` bits of `TUNSETOFFLOAD` (linux/if_tun.h): what the backend may hand the guest.
pub mod tun {
    /// Partial checksums (NEEDS_CSUM) allowed.
    pub const CSUM: u32 = 0x01;
    /// TCPv4 segmentation offload.
    pub const TSO4: u32 = 0x02;
    /// TCPv6 segmentation offload.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN bits.
    pub const TSO_ECN: u32 = 0x08;
    /// UDP fragmentation offload.
    pub const UFO: u32 = 0x10;
}

/// Where frames come from and go to: a tap with a virtio-net header of [`VNET_HDR_LEN`]
/// bytes in front of every frame.
pub trait NetBackend: Send + Sync {
    /// Reads one packet (header and frame) into `buf` without blocking; returns its length,
    /// or `ErrorKind::WouldBlock` when none is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one packet (header and frame).
    fn send(&self, packet: &[u8]) -> io::Result<()>;
    /// Which offloads (`tun::*` bits) the guest accepts in what it receives.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

/// What the device dropped and moved, for logs and the VMM's status.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames put into the guest's receive buffers.
    pub rx_frames: AtomicU64,
    /// Frames taken from the guest's transmit queue and sent.
    pub tx_frames: AtomicU64,
    /// Received frames dropped: longer than the guest's buffer (or [`MAX_PACKET`]).
    pub rx_oversize: AtomicU64,
    /// Transmit chains dropped: longer than [`MAX_PACKET`] or shorter than a header and an
    /// Ethernet header.
    pub tx_oversize: AtomicU64,
    /// Chains returned unused: a descriptor with the wrong direction, outside guest
    /// memory, or a header asking for an offload that was not negotiated.
    pub invalid_chains: AtomicU64,
    /// Frames the backend refused (transmit) or read errors (receive).
    pub backend_errors: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct NetCounts {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_oversize: u64,
    pub tx_oversize: u64,
    pub invalid_chains: u64,
    pub backend_errors: u64,
}

impl NetStats {
    /// The counters now.
    pub fn counts(&self) -> NetCounts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCounts {
            rx_frames: g(&self.rx_frames),
            tx_frames: g(&self.tx_frames),
            rx_oversize: g(&self.rx_oversize),
            tx_oversize: g(&self.tx_oversize),
            invalid_chains: g(&self.invalid_chains),
            backend_errors: g(&self.backend_errors),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The features offered: virtio 1, the MAC and link status, and the offloads a Linux
/// guest uses (checksum, TSO, UFO both ways). Not offered: mergeable receive buffers,
/// multiqueue, the control queue.
pub fn offered_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
    ]
    .iter()
    .fold(0, |f, bit| f | (1u64 << bit))
}

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The `TUNSETOFFLOAD` flags for what the driver accepted: segmentation offloads only
/// together with partial checksums, as the specification makes them depend (5.1.3.1).
pub fn tun_offload(acked: u64) -> u32 {
    if !has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut f = tun::CSUM;
    if has(acked, VIRTIO_NET_F_GUEST_TSO4) {
        f |= tun::TSO4;
    }
    if has(acked, VIRTIO_NET_F_GUEST_TSO6) {
        f |= tun::TSO6;
    }
    if has(acked, VIRTIO_NET_F_GUEST_ECN) && f & (tun::TSO4 | tun::TSO6) != 0 {
        f |= tun::TSO_ECN;
    }
    if has(acked, VIRTIO_NET_F_GUEST_UFO) {
        f |= tun::UFO;
    }
    f
}

/// Whether a transmit header asks only for what the driver negotiated (the backend would
/// otherwise be handed offload work the guest was never allowed to ask for).
fn tx_header_allowed(hdr: &[u8; VNET_HDR_LEN], frame_len: usize, acked: u64) -> bool {
    let flags = u32::from(hdr[0]);
    let gso = u32::from(hdr[1]);
    let csum_start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let csum_offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    if flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
        return false;
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
        && (!has(acked, VIRTIO_NET_F_CSUM) || csum_start + csum_offset + 2 > frame_len)
    {
        return false;
    }
    let ecn = gso & VIRTIO_NET_HDR_GSO_ECN != 0;
    if ecn && !has(acked, VIRTIO_NET_F_HOST_ECN) {
        return false;
    }
    let needs = match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => return !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
        _ => return false,
    };
    // Segmentation needs the partial checksum it fills in per segment.
    has(acked, needs) && flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
}

/// A virtio-net device: its registers' side. Frames are moved by a [`NetWorker`] on the
/// VMM's I/O thread.
pub struct Net {
    mac: [u8; 6],
    acked: u64,
    backend: Arc<dyn NetBackend>,
    log_limit: Arc<Mutex<LogLimit>>,
}

impl Net {
    /// A NIC with `mac` over `backend`, and the worker that moves its frames.
    pub fn new(mac: [u8; 6], backend: Arc<dyn NetBackend>) -> (Net, NetWorker) {
        let log_limit = Arc::new(Mutex::new(crate::ratelimit::guest_lines()));
        let worker = NetWorker {
            backend: backend.clone(),
            buf: vec![0u8; MAX_PACKET],
            stats: Arc::new(NetStats::default()),
            log_limit: log_limit.clone(),
        };
        (
            Net {
                mac,
                acked: 0,
                backend,
                log_limit,
            },
            worker,
        )
    }

    fn offload(&self) {
        let flags = tun_offload(self.acked);
        if let Err(e) = self.backend.set_offload(flags) {
            // The guest then gets no offloaded frames it cannot take only if the tap keeps
            // its old setting; say so (the backend keeps the last good one).
            if let Ok(mut l) = self.log_limit.lock() {
                crate::limited!(l, warn, error = %e, flags, "virtio-net: could not set the tap's offloads");
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        offered_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & offered_features();
        self.offload();
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn request_handler(&self) -> Box<dyn RequestHandler> {
        Box::new(NoRequests)
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.offload();
    }
}

/// virtio-net's queues are served by [`NetWorker`], never through the transport's
/// request path; a chain that reaches it anyway is returned unused.
struct NoRequests;

impl RequestHandler for NoRequests {
    fn run<'m>(
        &mut self,
        chain: DescriptorChain<&'m GuestMem>,
        _mem: &'m GuestMem,
        _acked: u64,
    ) -> Completion<'m> {
        Completion::nothing(chain)
    }
}

/// How a receive pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rx {
    /// The backend has no more frames.
    Drained,
    /// The guest has no receive buffer: wait for its notification before reading more.
    NoBuffers,
    /// The device is not running (driver not ready, queue not set up, or broken).
    Stopped,
}

/// Moves frames between a NIC's queues and its backend; runs on the VMM's I/O thread.
pub struct NetWorker {
    backend: Arc<dyn NetBackend>,
    buf: Vec<u8>,
    stats: Arc<NetStats>,
    log_limit: Arc<Mutex<LogLimit>>,
}

/// Whether every descriptor of `chain` goes the one way (`write` = device-writable).
fn one_way(chain: &DescriptorChain<&GuestMem>, write: bool) -> bool {
    let mut n = 0usize;
    for d in chain.clone() {
        if d.is_write_only() != write {
            return false;
        }
        n += 1;
    }
    n > 0
}

impl NetWorker {
    /// The counters of this NIC.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn log(&self, what: &str) {
        if let Ok(mut l) = self.log_limit.lock() {
            crate::limited!(l, debug, "virtio-net: {what}");
        }
    }

    /// Sends every frame the driver queued on the transmit queue of `t`.
    pub fn transmit_on(&mut self, t: &Mutex<MmioTransport>) -> Result<(), Poisoned> {
        let mut t = t.lock().map_err(|_| Poisoned)?;
        t.with_queue(TX_QUEUE, |q, mem, acked| {
            self.transmit(q, mem, acked).map(|used| ((), used))
        });
        Ok(())
    }

    /// Fills the guest's receive buffers of `t` with frames from the backend.
    pub fn receive_on(&mut self, t: &Mutex<MmioTransport>) -> Result<Rx, Poisoned> {
        let mut t = t.lock().map_err(|_| Poisoned)?;
        Ok(
            t.with_queue(RX_QUEUE, |q, mem, acked| self.receive(q, mem, acked))
                .unwrap_or(Rx::Stopped),
        )
    }

    /// Sends every chain of the transmit queue `q`; returns whether any went to the used
    /// ring. An `Err` means the queue itself is corrupt.
    pub fn transmit(
        &mut self,
        q: &mut Queue,
        mem: &GuestMem,
        acked: u64,
    ) -> Result<bool, virtio_queue::Error> {
        q.set_event_idx(has(acked, VIRTIO_RING_F_EVENT_IDX));
        let mut used = false;
        loop {
            let next = q.iter(mem)?.next();
            let Some(chain) = next else {
                if q.enable_notification(mem)? {
                    continue;
                }
                return Ok(used);
            };
            let head = chain.head_index();
            self.send_chain(chain, mem, acked);
            q.add_used(mem, head, 0)?;
            used = true;
        }
    }

    fn send_chain(&mut self, chain: DescriptorChain<&GuestMem>, mem: &GuestMem, acked: u64) {
        if !one_way(&chain, false) {
            bump(&self.stats.invalid_chains);
            return self.log("transmit chain with a device-writable descriptor; dropped");
        }
        let Ok(mut reader) = chain.reader(mem) else {
            bump(&self.stats.invalid_chains);
            return self.log("transmit chain outside guest memory; dropped");
        };
        let len = reader.available_bytes();
        if !(VNET_HDR_LEN + MIN_FRAME..=MAX_PACKET).contains(&len) {
            bump(&self.stats.tx_oversize);
            return self.log("transmit frame too long or too short; dropped");
        }
        let Some(packet) = self.buf.get_mut(..len) else {
            return;
        };
        if reader.read_exact(packet).is_err() {
            bump(&self.stats.invalid_chains);
            return self.log("transmit chain could not be read; dropped");
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr.copy_from_slice(&packet[..VNET_HDR_LEN]);
        if !tx_header_allowed(&hdr, len - VNET_HDR_LEN, acked) {
            bump(&self.stats.invalid_chains);
            return self.log("transmit header asks for an offload not negotiated; dropped");
        }
        // num_buffers means nothing on transmit; the tap ignores it too.
        packet[10] = 0;
        packet[11] = 0;
        match self.backend.send(packet) {
            Ok(()) => bump(&self.stats.tx_frames),
            Err(e) => {
                bump(&self.stats.backend_errors);
                if let Ok(mut l) = self.log_limit.lock() {
                    crate::limited!(l, info, error = %e, "virtio-net: the tap refused a frame");
                }
            }
        }
    }

    /// Reads frames from the backend into the receive queue `q` until one of them runs
    /// out; returns how that ended and whether any buffer went to the used ring. An `Err`
    /// means the queue itself is corrupt.
    pub fn receive(
        &mut self,
        q: &mut Queue,
        mem: &GuestMem,
        acked: u64,
    ) -> Result<(Rx, bool), virtio_queue::Error> {
        q.set_event_idx(has(acked, VIRTIO_RING_F_EVENT_IDX));
        let mut used = false;
        loop {
            let mut it = q.iter(mem)?;
            let Some(chain) = it.next() else {
                if q.enable_notification(mem)? {
                    continue;
                }
                return Ok((Rx::NoBuffers, used));
            };
            let head = chain.head_index();
            if !one_way(&chain, true) {
                bump(&self.stats.invalid_chains);
                self.log("receive chain with a device-readable descriptor; returned unused");
                q.add_used(mem, head, 0)?;
                used = true;
                continue;
            }
            let Ok(mut writer) = chain.writer(mem) else {
                bump(&self.stats.invalid_chains);
                self.log("receive chain outside guest memory; returned unused");
                q.add_used(mem, head, 0)?;
                used = true;
                continue;
            };
            let room = writer.available_bytes();
            let n = match self.backend.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) => {
                    // The buffer stays the driver's for the next frame.
                    it.go_to_previous_position();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        return Ok((Rx::Drained, used));
                    }
                    bump(&self.stats.backend_errors);
                    if let Ok(mut l) = self.log_limit.lock() {
                        crate::limited!(l, warn, error = %e, "virtio-net: reading the tap failed");
                    }
                    return Ok((Rx::Drained, used));
                }
            };
            let Some(packet) = self.buf.get_mut(..n) else {
                it.go_to_previous_position();
                continue;
            };
            if n < VNET_HDR_LEN || n > room {
                // Dropped; the buffer stays the driver's for the next frame.
                it.go_to_previous_position();
                bump(&self.stats.rx_oversize);
                self.log("received frame longer than the guest's buffer; dropped");
                continue;
            }
            // Without mergeable buffers a frame is always in one buffer (5.1.6.4).
            packet[10..12].copy_from_slice(&1u16.to_le_bytes());
            if writer.write_all(packet).is_err() {
                bump(&self.stats.invalid_chains);
                q.add_used(mem, head, 0)?;
            } else {
                bump(&self.stats.rx_frames);
                q.add_used(mem, head, n as u32)?;
            }
            used = true;
        }
    }
}
