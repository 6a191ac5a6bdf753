//! The virtio-mmio register window against a driver that follows the spec and one that
//! writes garbage: negotiation, queue setup, notifications that serve requests and raise
//! the interrupt, a corrupt queue that marks the device `NEEDS_RESET`, and snapshots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use tessera_disk::RawFile;
use tessera_virtio::blk::Block;
use tessera_virtio::mmio::{MmioTransport, RestoreError};
use tessera_virtio::GuestMem;
use tessera_virtio::Interrupt;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

/// Counts interrupts.
struct Count(AtomicUsize);
impl Interrupt for Count {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    t: MmioTransport,
    mem: GuestMem,
    irqs: Arc<Count>,
    _disk: tempfile::NamedTempFile,
}

impl Rig {
    fn irqs(&self) -> usize {
        self.irqs.0.load(Ordering::SeqCst)
    }
}

fn rig() -> Rig {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let f = tempfile::NamedTempFile::new().expect("disk file");
    f.as_file().set_len(1 << 20).expect("size disk file");
    let dev = Block::new(Box::new(RawFile::open(f.path()).expect("open disk")));
    let irqs = Arc::new(Count(AtomicUsize::new(0)));
    Rig {
        t: MmioTransport::new(Box::new(dev), mem.clone(), irqs.clone()),
        mem,
        irqs,
        _disk: f,
    }
}

fn r32(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u32, v: u32) -> Option<u32> {
    t.write(u64::from(off), &v.to_le_bytes())
}

/// Negotiates VERSION_1 only (so every used buffer needs a notification).
fn negotiate(t: &mut MmioTransport) {
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // bit 32: VERSION_1
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(r32(t, VIRTIO_MMIO_STATUS), ACK | DRIVER | FEATURES_OK);
}

/// Programs queue 0 with the rings of `q`.
fn set_queue(t: &mut MmioTransport, q: &MockSplitQueue<'_, GuestMem>) {
    w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w32(t, VIRTIO_MMIO_QUEUE_NUM, 16);
    for (low, high, addr) in [
        (
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            q.desc_table_addr().0,
        ),
        (
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            q.avail_addr().0,
        ),
        (
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            q.used_addr().0,
        ),
    ] {
        w32(t, low, addr as u32);
        w32(t, high, (addr >> 32) as u32);
    }
    w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r32(t, VIRTIO_MMIO_QUEUE_READY), 1, "valid queue refused");
}

const HDR: u64 = 0x8_0000;
const ID: u64 = 0x9_0000;
const STATUS: u64 = 0xa_0000;

/// Puts a GET_ID request in the available ring at descriptor `first`.
fn get_id_request(mem: &GuestMem, q: &MockSplitQueue<'_, GuestMem>, first: u16) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).expect("header");
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("status");
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let chain = [
        Descriptor::new(HDR, 16, next, first + 1),
        Descriptor::new(ID, 20, next | write, first + 2),
        Descriptor::new(STATUS, 1, write, 0),
    ]
    .map(RawDescriptor::from);
    q.add_desc_chains(&chain, first).expect("add chain");
}

#[test]
fn identification_and_negotiation_follow_the_spec() {
    let Rig { mut t, .. } = rig();
    let t = &mut t;
    assert_eq!(r32(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r32(t, VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(r32(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    // Asking for a feature that was not offered (bit 63) fails FEATURES_OK.
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1 | (1 << 31));
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(
        r32(t, VIRTIO_MMIO_STATUS),
        ACK | DRIVER,
        "FEATURES_OK accepted with an unoffered feature"
    );
    // DRIVER_OK without FEATURES_OK fails the device.
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER | DRIVER_OK);
    assert_eq!(r32(t, VIRTIO_MMIO_STATUS), ACK | DRIVER | FAILED);
    // Without VERSION_1 (a legacy driver) negotiation fails too.
    w32(t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r32(t, VIRTIO_MMIO_STATUS), 0, "reset");
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(r32(t, VIRTIO_MMIO_STATUS), ACK | DRIVER, "no VERSION_1");
    // Reset and do it right.
    w32(t, VIRTIO_MMIO_STATUS, 0);
    negotiate(t);
    // Clearing status bits other than by reset is ignored.
    w32(t, VIRTIO_MMIO_STATUS, ACK);
    assert_eq!(r32(t, VIRTIO_MMIO_STATUS), ACK | DRIVER | FEATURES_OK);
    // A queue whose rings lie outside guest memory is never made ready.
    w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w32(t, VIRTIO_MMIO_QUEUE_NUM, 8);
    w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
    w32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10); // descriptor table at 64 GiB
    w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r32(t, VIRTIO_MMIO_QUEUE_READY), 0);
    // A queue that does not exist reads as absent.
    w32(t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r32(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    // Wrong-width register accesses are ignored.
    let mut two = [0xaa; 2];
    t.read(0, &mut two);
    assert_eq!(two, [0, 0]);
    assert_eq!(t.write(u64::from(VIRTIO_MMIO_STATUS), &[0]), None);
    assert_eq!(r32(t, VIRTIO_MMIO_STATUS), ACK | DRIVER | FEATURES_OK);
}

#[test]
fn a_notification_serves_the_queue_and_raises_the_interrupt() {
    let mut r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    negotiate(&mut r.t);
    set_queue(&mut r.t, &q);
    get_id_request(&r.mem, &q, 0);

    // Before DRIVER_OK a notification does nothing.
    assert_eq!(w32(&mut r.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0), Some(0));
    r.t.notify(0);
    assert_eq!(q.used().idx().load(), 0, "served before DRIVER_OK");
    assert_eq!(r.irqs(), 0);

    let ok = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
    w32(&mut r.t, VIRTIO_MMIO_STATUS, ok);
    assert_eq!(r32(&mut r.t, VIRTIO_MMIO_STATUS), ok);
    // Queue configuration is frozen once the driver is running.
    w32(&mut r.t, VIRTIO_MMIO_QUEUE_NUM, 4);
    w32(&mut r.t, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(r32(&mut r.t, VIRTIO_MMIO_QUEUE_READY), 1);

    // A queue that does not exist is ignored.
    r.t.notify(7);
    assert_eq!(r.irqs(), 0);

    r.t.notify(0);
    assert_eq!(q.used().idx().load(), 1, "request not served");
    let used = q.used().ring().ref_at(0).unwrap().load();
    assert_eq!((used.id(), used.len()), (0, 21));
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(r.irqs(), 1, "no interrupt for a used buffer");
    assert_eq!(
        r32(&mut r.t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    w32(&mut r.t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut r.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Nothing new available: no interrupt.
    r.t.notify(0);
    assert_eq!(r.irqs(), 1);
}

#[test]
fn a_corrupt_queue_marks_the_device_needs_reset_until_the_driver_resets_it() {
    let mut r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    negotiate(&mut r.t);
    set_queue(&mut r.t, &q);
    let ok = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
    w32(&mut r.t, VIRTIO_MMIO_STATUS, ok);
    // avail.idx 1000 ahead of next_avail on a 16-entry queue.
    r.mem
        .write_obj(1000u16, GuestAddress(q.avail_addr().0 + 2))
        .unwrap();
    r.t.notify(0);
    assert_eq!(r32(&mut r.t, VIRTIO_MMIO_STATUS), ok | NEEDS_RESET);
    assert_eq!(
        r32(&mut r.t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(r.irqs(), 1, "the driver was not told");

    // A broken device serves nothing, even once the ring looks sane again.
    r.mem
        .write_obj(0u16, GuestAddress(q.avail_addr().0 + 2))
        .unwrap();
    get_id_request(&r.mem, &q, 0);
    r.t.notify(0);
    assert_eq!(q.used().idx().load(), 0, "a broken device served a request");

    // After a reset and a fresh setup it works again.
    w32(&mut r.t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r32(&mut r.t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(r32(&mut r.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(
        r32(&mut r.t, VIRTIO_MMIO_QUEUE_READY),
        0,
        "reset keeps the queue"
    );
    negotiate(&mut r.t);
    set_queue(&mut r.t, &q);
    w32(&mut r.t, VIRTIO_MMIO_STATUS, ok);
    r.t.notify(0);
    assert_eq!(q.used().idx().load(), 1, "not served after reset");
}

#[test]
fn a_snapshot_restores_the_same_state_and_a_bad_one_is_refused() {
    let mut r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    negotiate(&mut r.t);
    set_queue(&mut r.t, &q);
    w32(
        &mut r.t,
        VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    get_id_request(&r.mem, &q, 0);
    r.t.notify(0);
    let saved = r.t.save();

    let mut fresh = rig();
    fresh.t.restore(&saved).unwrap();
    assert_eq!(fresh.t.save(), saved);
    assert_eq!(r32(&mut fresh.t, VIRTIO_MMIO_STATUS), saved.status);

    let mut bad = saved.clone();
    bad.queues.push(bad.queues[0]);
    assert!(
        matches!(
            rig().t.restore(&bad),
            Err(RestoreError::QueueCount {
                snapshot: 2,
                device: 1
            })
        ),
        "two queues for a one-queue device"
    );
    let mut bad = saved.clone();
    bad.queues[0].desc_table = 1 << 36;
    assert!(
        matches!(rig().t.restore(&bad), Err(RestoreError::OutsideGuestMemory)),
        "ready queue outside guest memory"
    );
    let mut bad = saved.clone();
    bad.queues[0].max_size = 3; // not a power of two
    assert!(
        matches!(rig().t.restore(&bad), Err(RestoreError::Queue(_))),
        "invalid queue size"
    );
    // A refused snapshot leaves the transport as it was.
    let mut t = rig().t;
    let before = t.save();
    assert!(t.restore(&bad).is_err());
    assert_eq!(t.save(), before);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
    /// Any sequence of register reads, writes and notifications leaves the VMM standing
    /// and the device identifiable.
    #[test]
    fn random_register_traffic_never_panics(ops in proptest::collection::vec(
        (0u64..0x200, any::<u32>(), 0u8..4, any::<bool>()), 1..200)) {
        let Rig { mut t, .. } = rig();
        for (off, v, width, write) in ops {
            let len = [1usize, 2, 4, 8][width as usize];
            if write {
                let bytes = v.to_le_bytes();
                let data: Vec<u8> = bytes.iter().copied().cycle().take(len).collect();
                if let Some(q) = t.write(off & !3, &data) {
                    t.notify(q);
                }
            } else {
                let mut data = vec![0u8; len];
                t.read(off, &mut data);
            }
        }
        prop_assert_eq!(r32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        prop_assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
    }
}
