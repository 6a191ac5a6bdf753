//! virtio-net against hand-built virtqueues in synthetic guest memory and a backend that
//! records what it is given, including guests that lie in their descriptors.
//!
//! Checked besides the frames themselves: every chain comes back in the used ring exactly
//! once (or, for a receive buffer no frame went into, stays the driver's), no byte that only
//! device-readable descriptors cover is written, and drops are counted for their reason.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tessera_virtio::net::{
    tun, tun_offload, Net, NetBackend, NetWorker, Rx, MAX_PACKET, VNET_HDR_LEN,
};
use tessera_virtio::{GuestMem, VirtioDevice};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 1 << 20;
const BUF: u64 = 0x8_0000;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Frames waiting to be received, frames sent, and the last offload setting.
#[derive(Default)]
struct Wire {
    incoming: Mutex<VecDeque<Vec<u8>>>,
    sent: Mutex<Vec<Vec<u8>>>,
    offload: Mutex<Option<u32>>,
}

impl NetBackend for Wire {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(p) = self.incoming.lock().unwrap().pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(n)
    }
    fn send(&self, packet: &[u8]) -> std::io::Result<()> {
        self.sent.lock().unwrap().push(packet.to_vec());
        Ok(())
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        *self.offload.lock().unwrap() = Some(flags);
        Ok(())
    }
}

struct Rig {
    mem: GuestMem,
    wire: Arc<Wire>,
    dev: Net,
    worker: NetWorker,
}

fn rig(ack: impl FnOnce(u64) -> u64) -> Rig {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let wire = Arc::new(Wire::default());
    let (mut dev, worker) = Net::new(MAC, wire.clone());
    let f = dev.features();
    dev.set_acked_features(ack(f));
    Rig {
        mem,
        wire,
        dev,
        worker,
    }
}

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// A header (no offload) and an Ethernet frame of `len` bytes with a recognisable pattern.
fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    p
}

fn read_mem(mem: &GuestMem, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

/// Puts `chain` on a fresh queue and runs `f` on it; returns the used elements.
fn on_queue(
    r: &mut Rig,
    chain: &[RawDescriptor],
    f: impl FnOnce(&mut NetWorker, &mut Queue, &GuestMem),
) -> Vec<(u32, u32)> {
    let q = MockSplitQueue::new(&r.mem, 16);
    q.build_desc_chain(chain).unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    f(&mut r.worker, &mut queue, &r.mem);
    (0..q.used().idx().load())
        .map(|i| {
            let e = q.used().ring().ref_at(i.into()).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

fn transmit(r: &mut Rig, chain: &[RawDescriptor]) -> Vec<(u32, u32)> {
    let acked = r.dev.acked_features();
    on_queue(r, chain, |w, q, mem| {
        w.transmit(q, mem, acked).unwrap();
    })
}

fn receive(r: &mut Rig, chain: &[RawDescriptor]) -> (Rx, Vec<(u32, u32)>) {
    let acked = r.dev.acked_features();
    let mut rx = Rx::Stopped;
    let used = on_queue(r, chain, |w, q, mem| {
        rx = w.receive(q, mem, acked).unwrap().0;
    });
    (rx, used)
}

#[test]
fn a_frame_split_over_descriptors_is_sent_whole() {
    let mut r = rig(|f| f);
    let p = packet(100, 1);
    r.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    let used = transmit(
        &mut r,
        &[
            desc(BUF, 5, false),
            desc(BUF + 5, (p.len() - 5) as u32, false),
        ],
    );
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(*r.wire.sent.lock().unwrap(), vec![p]);
    assert_eq!(r.worker.stats().counts().tx_frames, 1);
}

#[test]
fn lying_transmit_chains_are_returned_and_never_sent() {
    let mut r = rig(|f| f);
    let p = packet(100, 2);
    r.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    let n = p.len() as u32;
    // A device-writable descriptor in a transmit chain.
    assert_eq!(transmit(&mut r, &[desc(BUF, n, true)]), vec![(0, 0)]);
    assert_eq!(
        transmit(
            &mut r,
            &[desc(BUF, 12, false), desc(BUF + 12, n - 12, true)]
        ),
        vec![(0, 0)]
    );
    // Outside guest memory.
    assert_eq!(transmit(&mut r, &[desc(MEM - 8, n, false)]), vec![(0, 0)]);
    assert_eq!(r.worker.stats().counts().invalid_chains, 3);
    // Longer than any frame (three descriptors of 30000 bytes), and a runt.
    assert_eq!(
        transmit(
            &mut r,
            &[
                desc(0, 30_000, false),
                desc(0, 30_000, false),
                desc(0, 30_000, false)
            ]
        ),
        vec![(0, 0)]
    );
    assert_eq!(transmit(&mut r, &[desc(BUF, 20, false)]), vec![(0, 0)]);
    assert_eq!(r.worker.stats().counts().tx_oversize, 2);
    assert!(r.wire.sent.lock().unwrap().is_empty());
}

#[test]
fn offloads_in_a_transmit_header_must_have_been_negotiated() {
    // TSO4 asked for without HOST_TSO4 negotiated: dropped.
    let mut r = rig(|f| f & !(1 << VIRTIO_NET_F_HOST_TSO4));
    let mut p = packet(200, 3);
    p[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    p[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    p[6..8].copy_from_slice(&34u16.to_le_bytes());
    p[8..10].copy_from_slice(&16u16.to_le_bytes());
    r.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    let d = [desc(BUF, p.len() as u32, false)];
    assert_eq!(transmit(&mut r, &d), vec![(0, 0)]);
    assert!(r.wire.sent.lock().unwrap().is_empty());
    // With it negotiated the same header goes to the tap.
    let mut r2 = rig(|f| f);
    r2.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    assert_eq!(transmit(&mut r2, &d), vec![(0, 0)]);
    assert_eq!(r2.wire.sent.lock().unwrap().len(), 1);
    // A checksum offset past the frame's end is refused even when CSUM is negotiated.
    p[1] = 0;
    p[6..8].copy_from_slice(&190u16.to_le_bytes());
    r2.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    assert_eq!(transmit(&mut r2, &d), vec![(0, 0)]);
    assert_eq!(r2.wire.sent.lock().unwrap().len(), 1);
}

#[test]
fn a_received_frame_fills_the_buffers_with_num_buffers_one() {
    let mut r = rig(|f| f);
    let p = packet(300, 4);
    r.wire.incoming.lock().unwrap().push_back(p.clone());
    r.mem.write_slice(&[0xee; 2048], GuestAddress(BUF)).unwrap();
    let (rx, used) = receive(&mut r, &[desc(BUF, 100, true), desc(BUF + 100, 1000, true)]);
    assert_eq!(rx, Rx::NoBuffers, "one buffer, used up");
    assert_eq!(used, vec![(0, p.len() as u32)]);
    let got = read_mem(&r.mem, BUF, p.len());
    assert_eq!(&got[..10], &p[..10]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], &p[12..]);
    assert_eq!(read_mem(&r.mem, BUF + p.len() as u64, 4), [0xee; 4]);
    // No frame waiting: the buffer stays the driver's.
    let (rx, used) = receive(&mut r, &[desc(BUF, 1100, true)]);
    assert_eq!((rx, used), (Rx::Drained, vec![]));
}

#[test]
fn frames_too_long_for_the_buffer_are_dropped_and_lying_receive_chains_returned() {
    let mut r = rig(|f| f);
    r.wire.incoming.lock().unwrap().push_back(packet(1500, 5));
    let (rx, used) = receive(&mut r, &[desc(BUF, 1000, true)]);
    assert_eq!((rx, used), (Rx::Drained, vec![]), "dropped, buffer kept");
    assert_eq!(r.worker.stats().counts().rx_oversize, 1);
    // A device-readable descriptor in a receive chain: returned with nothing written.
    r.wire.incoming.lock().unwrap().push_back(packet(60, 6));
    r.mem.write_slice(&[0xee; 64], GuestAddress(BUF)).unwrap();
    let (_, used) = receive(&mut r, &[desc(BUF, 10, false), desc(BUF + 10, 1000, true)]);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(read_mem(&r.mem, BUF, 64), [0xee; 64]);
    assert_eq!(r.worker.stats().counts().invalid_chains, 1);
    assert_eq!(r.wire.incoming.lock().unwrap().len(), 1, "the frame waits");
}

#[test]
fn the_taps_offloads_follow_what_the_driver_accepted() {
    let r = rig(|f| f);
    assert_eq!(
        *r.wire.offload.lock().unwrap(),
        Some(tun::CSUM | tun::TSO4 | tun::TSO6 | tun::TSO_ECN | tun::UFO)
    );
    let r = rig(|f| f & !(1 << VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(
        *r.wire.offload.lock().unwrap(),
        Some(0),
        "TSO needs GUEST_CSUM"
    );
    assert_eq!(tun_offload(1 << VIRTIO_NET_F_GUEST_CSUM), tun::CSUM);
    let mut r = rig(|f| f);
    r.dev.reset();
    assert_eq!(
        *r.wire.offload.lock().unwrap(),
        Some(0),
        "reset clears them"
    );
}

#[test]
fn config_space_holds_the_mac_and_link_up() {
    let r = rig(|f| f);
    let mut c = [0u8; 10];
    r.dev.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(&c[6..8], &(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    assert_eq!(&c[8..], &[0, 0], "past the end reads zero");
    let mut far = [0xffu8; 4];
    r.dev.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    const { assert!(MAX_PACKET > 65_535) };
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
    /// Arbitrary descriptor tables on both queues, with frames of any size waiting, never
    /// panic the device or break a queue whose rings are sound, and no byte that only
    /// device-readable descriptors cover is written.
    #[test]
    fn random_descriptor_tables_never_panic_or_write_readable_buffers(
        descs in proptest::collection::vec((0u64..(MEM + 0x2000), 0u32..70_000, any::<bool>(), any::<bool>(), 0u16..20), 1..8),
        frames in proptest::collection::vec(0usize..(MAX_PACKET + 100), 0..4),
        hdr in proptest::collection::vec(any::<u8>(), VNET_HDR_LEN),
        tx in any::<bool>(),
        acked_mask in any::<u64>(),
    ) {
        let mut r = rig(|f| f & acked_mask);
        for (i, &n) in frames.iter().enumerate() {
            let mut p = packet(n.saturating_sub(VNET_HDR_LEN), i as u8);
            p.truncate(n);
            r.wire.incoming.lock().unwrap().push_back(p);
        }
        r.mem.write_slice(&hdr, GuestAddress(BUF)).unwrap();
        let q = MockSplitQueue::new(&r.mem, 16);
        let table: Vec<RawDescriptor> = descs.iter().map(|&(addr, len, write, next, to)| {
            let mut flags = 0u16;
            if write { flags |= VRING_DESC_F_WRITE as u16; }
            if next { flags |= VRING_DESC_F_NEXT as u16; }
            RawDescriptor::from(Descriptor::new(addr, len, flags, to))
        }).collect();
        q.add_desc_chains(&table, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let mut may_write = vec![false; MEM as usize];
        let used = q.used_addr().0 as usize;
        may_write[used..used + 4 + 16 * 8 + 2].fill(true);
        // The avail ring's used_event slot is the driver's, but enable_notification
        // writes avail_event in the used ring (covered above).
        for &(addr, len, write, _, _) in &descs {
            if write && addr < MEM {
                let end = (addr + u64::from(len)).min(MEM);
                may_write[addr as usize..end as usize].fill(true);
            }
        }
        let before = read_mem(&r.mem, 0, MEM as usize);
        let acked = r.dev.acked_features();
        if tx {
            prop_assert!(r.worker.transmit(&mut queue, &r.mem, acked).is_ok());
            for p in r.wire.sent.lock().unwrap().iter() {
                prop_assert!(p.len() <= MAX_PACKET && p.len() >= VNET_HDR_LEN + 14);
            }
        } else {
            prop_assert!(r.worker.receive(&mut queue, &r.mem, acked).is_ok());
        }
        let after = read_mem(&r.mem, 0, MEM as usize);
        let written = (0..MEM as usize).find(|&i| before[i] != after[i] && !may_write[i]);
        prop_assert_eq!(written, None, "the device wrote a byte no writable descriptor covers");
        // Every chain returned is returned once.
        let n = q.used().idx().load();
        let mut heads: Vec<u32> = (0..n).map(|i| q.used().ring().ref_at(i.into()).unwrap().load().id()).collect();
        heads.sort_unstable();
        heads.dedup();
        prop_assert_eq!(heads.len(), usize::from(n));
    }
}
