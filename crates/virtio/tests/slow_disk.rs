//! A slow disk must not stall the vCPU: while a request waits on the disk, the driver's
//! register accesses (what a vCPU's MMIO exits do) still complete, and a reset issued
//! meanwhile keeps the finished request out of the reset queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_disk::{Disk, DiskError};
use tessera_virtio::blk::Block;
use tessera_virtio::mmio::MmioTransport;
use tessera_virtio::{GuestMem, Interrupt};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

/// How long a test waits for something that must happen.
const WAIT: Duration = Duration::from_secs(10);

/// A disk whose reads announce themselves and then wait until the test lets them go.
struct GatedDisk {
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

impl Disk for GatedDisk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let _ = self.entered.lock().expect("gate").send(());
        self.release
            .lock()
            .expect("gate")
            .recv_timeout(WAIT)
            .map_err(|_| DiskError::Unsupported("an ungated read"))?;
        buf.fill(0xab);
        Ok(())
    }
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), DiskError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), DiskError> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<(), DiskError> {
        Ok(())
    }
    fn id(&self) -> String {
        "gated".into()
    }
}

struct Count(AtomicUsize);
impl Interrupt for Count {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const HDR: u64 = 0x8_0000;
const DATA: u64 = 0x9_0000;
const STATUS: u64 = 0xa_0000;

struct Rig {
    t: Arc<Mutex<MmioTransport>>,
    mem: GuestMem,
    irqs: Arc<Count>,
    entered: Receiver<()>,
    release: Sender<()>,
}

fn rig() -> Rig {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let disk = GatedDisk {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    };
    let irqs = Arc::new(Count(AtomicUsize::new(0)));
    let t = MmioTransport::new(
        Box::new(Block::new(Box::new(disk))),
        mem.clone(),
        irqs.clone(),
    );
    Rig {
        t: Arc::new(Mutex::new(t)),
        mem,
        irqs,
        entered,
        release,
    }
}

fn r32(t: &Mutex<MmioTransport>, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.lock().expect("transport").read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &Mutex<MmioTransport>, off: u32, v: u32) {
    t.lock()
        .expect("transport")
        .write(u64::from(off), &v.to_le_bytes());
}

/// Brings the device to DRIVER_OK with queue 0 on the rings of `q`.
fn start(t: &Mutex<MmioTransport>, q: &MockSplitQueue<'_, GuestMem>) {
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // bit 32: VERSION_1
    w32(t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
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
    w32(
        t,
        VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(
        r32(t, VIRTIO_MMIO_STATUS),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK
    );
}

/// Puts a one-sector read of sector 0 in the available ring.
fn read_request(mem: &GuestMem, q: &MockSplitQueue<'_, GuestMem>) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).expect("header");
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("status");
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let chain = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(DATA, 512, next | write, 2),
        Descriptor::new(STATUS, 1, write, 0),
    ]
    .map(RawDescriptor::from);
    q.add_desc_chains(&chain, 0).expect("add chain");
}

/// Serves a queue notification the way the VMM's I/O thread does.
fn serve_in_background(t: &Arc<Mutex<MmioTransport>>) -> std::thread::JoinHandle<()> {
    let t = t.clone();
    std::thread::spawn(move || tessera_virtio::mmio::serve(&t, 0).expect("serve"))
}

/// Runs `f` on another thread and waits for it at most [`WAIT`]: a register access that
/// blocks behind the disk shows up as `None` instead of hanging the test.
fn within_wait<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT).ok()
}

#[test]
fn register_accesses_complete_while_a_request_waits_on_the_disk() {
    let r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    start(&r.t, &q);
    read_request(&r.mem, &q);
    let worker = serve_in_background(&r.t);
    r.entered
        .recv_timeout(WAIT)
        .expect("the request never reached the disk");

    // The disk holds the request: the driver can still read and write registers.
    let t = r.t.clone();
    let status = within_wait(move || r32(&t, VIRTIO_MMIO_STATUS));
    assert_eq!(
        status,
        Some(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
        "a register read waited for the disk"
    );
    let t = r.t.clone();
    let acked = within_wait(move || {
        w32(&t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        r32(&t, VIRTIO_MMIO_INTERRUPT_STATUS)
    });
    assert_eq!(acked, Some(0), "a register write waited for the disk");
    assert_eq!(
        q.used().idx().load(),
        0,
        "completed before the disk answered"
    );

    // Once the disk answers, the request completes as before: data, status, used ring, interrupt.
    r.release.send(()).unwrap();
    worker.join().unwrap();
    assert_eq!(q.used().idx().load(), 1, "request not completed");
    let used = q.used().ring().ref_at(0).unwrap().load();
    assert_eq!((used.id(), used.len()), (0, 513));
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(),
        0xab
    );
    assert_eq!(r.irqs.0.load(Ordering::SeqCst), 1);
    assert_eq!(
        r32(&r.t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
}

#[test]
fn a_reset_while_a_request_waits_keeps_its_completion_out_of_the_queue() {
    let r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    start(&r.t, &q);
    read_request(&r.mem, &q);
    let worker = serve_in_background(&r.t);
    r.entered
        .recv_timeout(WAIT)
        .expect("the request never reached the disk");

    let t = r.t.clone();
    let status = within_wait(move || {
        w32(&t, VIRTIO_MMIO_STATUS, 0);
        r32(&t, VIRTIO_MMIO_STATUS)
    });
    assert_eq!(status, Some(0), "the reset waited for the disk");

    r.release.send(()).unwrap();
    worker.join().unwrap();
    assert_eq!(
        q.used().idx().load(),
        0,
        "a completion landed after the reset"
    );
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0xee,
        "the status byte was written after the reset"
    );
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(),
        0,
        "read data landed after the reset"
    );
    assert_eq!(
        r.irqs.0.load(Ordering::SeqCst),
        0,
        "an interrupt after the reset"
    );
    assert_eq!(r32(&r.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn a_snapshot_waits_for_the_request_in_flight_and_sees_it_completed() {
    let r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    start(&r.t, &q);
    read_request(&r.mem, &q);
    let worker = serve_in_background(&r.t);
    r.entered
        .recv_timeout(WAIT)
        .expect("the request never reached the disk");

    // What a snapshot would save: the used index in guest memory and the queue's state.
    let (t, mem) = (r.t.clone(), r.mem.clone());
    let used_addr = q.used_addr();
    let (saved_tx, saved) = mpsc::channel();
    let snapshot = std::thread::spawn(move || {
        tessera_virtio::mmio::quiesced(&t, || {
            let used: u16 = mem
                .read_obj(GuestAddress(used_addr.0 + 2))
                .expect("used idx");
            let next_used = t.lock().expect("transport").save().queues[0].next_used;
            let _ = saved_tx.send((used, next_used));
        })
        .expect("quiesced");
    });
    r.release.send(()).unwrap();
    let (used, next_used) = saved.recv_timeout(WAIT).expect("the snapshot never ran");
    assert_eq!(
        (used, next_used),
        (1, 1),
        "the snapshot ran while the request was in flight"
    );
    snapshot.join().unwrap();
    worker.join().unwrap();
}
