//! Requests of one batch run at once: four reads that each wait until all four are inside
//! the disk complete (one at a time they would each wait out the timeout). A snapshot's
//! quiesce gives up after its limit while a request hangs, and succeeds once it ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tessera_disk::{Disk, DiskError};
use tessera_virtio::blk::Block;
use tessera_virtio::mmio::{self, MmioTransport, QuiesceError};
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

/// How long a read waits for the others before giving up (and failing the test).
const WAIT: Duration = Duration::from_secs(5);

/// Reads wait inside until `want` of them are inside at once, or `open` is set.
struct Rendezvous {
    inside: Mutex<(usize, usize, bool)>, // (now, most ever, open)
    cv: Condvar,
    want: usize,
}

impl Disk for Rendezvous {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let mut g = self.inside.lock().expect("rendezvous");
        g.0 += 1;
        g.1 = g.1.max(g.0);
        self.cv.notify_all();
        let deadline = Instant::now() + WAIT;
        while g.1 < self.want && !g.2 && Instant::now() < deadline {
            g = self.cv.wait_timeout(g, WAIT).expect("rendezvous").0;
        }
        g.0 -= 1;
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
        "rendezvous".into()
    }
}

/// Forwards to the shared disk (the device takes ownership of its `Box<dyn Disk>`).
struct Shared(Arc<Rendezvous>);

impl Disk for Shared {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.0.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.0.write_zeroes(offset, len)
    }
    fn id(&self) -> String {
        self.0.id()
    }
}

struct Count(AtomicUsize);
impl Interrupt for Count {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn w32(t: &Mutex<MmioTransport>, off: u32, v: u32) {
    t.lock()
        .expect("transport")
        .write(u64::from(off), &v.to_le_bytes());
}

fn rig(want: usize) -> (Arc<Mutex<MmioTransport>>, GuestMem, Arc<Rendezvous>) {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let disk = Arc::new(Rendezvous {
        inside: Mutex::new((0, 0, false)),
        cv: Condvar::new(),
        want,
    });
    let t = MmioTransport::new(
        Box::new(Block::new(Box::new(Shared(disk.clone())))),
        mem.clone(),
        Arc::new(Count(AtomicUsize::new(0))),
    );
    (Arc::new(Mutex::new(t)), mem, disk)
}

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
}

/// `n` one-sector reads, request `i` at 0x8_0000 + i * 0x1000 (header, data, status).
fn reads(mem: &GuestMem, q: &MockSplitQueue<'_, GuestMem>, n: u16) -> Vec<u64> {
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let mut descs = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..n {
        let base = 0x8_0000 + u64::from(i) * 0x1000;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&h, GuestAddress(base)).expect("header");
        mem.write_obj(0xeeu8, GuestAddress(base + 0x800))
            .expect("status");
        let d = i * 3;
        descs.push(Descriptor::new(base, 16, next, d + 1));
        descs.push(Descriptor::new(base + 0x200, 512, next | write, d + 2));
        descs.push(Descriptor::new(base + 0x800, 1, write, 0));
        statuses.push(base + 0x800);
    }
    let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
    q.add_desc_chains(&raw, 0).expect("add chains");
    statuses
}

#[test]
fn the_requests_of_a_batch_are_in_the_disk_at_the_same_time() {
    let (t, mem, disk) = rig(4);
    let q = MockSplitQueue::new(&mem, 16);
    start(&t, &q);
    let statuses = reads(&mem, &q, 4);
    let started = Instant::now();
    mmio::serve(&t, 0).expect("serve");
    let most = disk.inside.lock().expect("rendezvous").1;
    assert_eq!(most, 4, "requests ran {most} at a time");
    assert!(started.elapsed() < WAIT, "a read waited out its timeout");
    for s in statuses {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(s)).expect("status"), 0);
    }
    assert_eq!(q.used().idx().load(), 4);
}

#[test]
fn quiesce_gives_up_on_a_hung_request_and_succeeds_after_it() {
    // Wants two inside at once but gets one: the read hangs until `open`.
    let (t, mem, disk) = rig(2);
    let q = MockSplitQueue::new(&mem, 16);
    start(&t, &q);
    reads(&mem, &q, 1);
    let worker = {
        let t = t.clone();
        std::thread::spawn(move || mmio::serve(&t, 0).expect("serve"))
    };
    while disk.inside.lock().expect("rendezvous").0 == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    let r = mmio::quiesced_within(&t, Duration::from_millis(200), || ());
    assert!(matches!(r, Err(QuiesceError::TimedOut(_))), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    disk.inside.lock().expect("rendezvous").2 = true;
    disk.cv.notify_all();
    let r = mmio::quiesced_within(&t, WAIT, || 42);
    assert_eq!(r.expect("quiesced"), 42);
    worker.join().expect("worker");
    assert_eq!(q.used().idx().load(), 1);
}
