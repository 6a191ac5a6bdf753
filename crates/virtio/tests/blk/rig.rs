//! The test rig: a virtio-blk device over a raw file in synthetic guest memory, chains
//! submitted through a mock split queue and checked for what a guest relies on.

use tessera_disk::{Disk, DiskError, RawFile};
use tessera_virtio::blk::Block;
use tessera_virtio::GuestMem;
use tessera_virtio::VirtioDevice;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

pub const MEM: u64 = 1 << 20;
pub const DISK: u64 = 1 << 20;
/// What the tests put in the status byte before the device runs.
pub const UNTOUCHED: u8 = 0xee;
pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

pub const HDR: u64 = 0x8_0000;
pub const DATA: u64 = 0x9_0000;
pub const STATUS: u64 = 0xa_0000;

/// A disk the device must not write to.
pub struct ReadOnly(pub RawFile);

impl Disk for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
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

/// A disk whose every operation fails (a backend that lost its volume).
pub struct Broken;

impl Disk for Broken {
    fn size(&self) -> u64 {
        DISK
    }
    fn read_at(&self, _: u64, _: &mut [u8]) -> Result<(), DiskError> {
        Err(DiskError::Unsupported("reading"))
    }
    fn write_at(&self, _: u64, _: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::Unsupported("writing"))
    }
    fn flush(&self) -> Result<(), DiskError> {
        Err(DiskError::Unsupported("flushing"))
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
        Err(DiskError::Unsupported("discarding"))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<(), DiskError> {
        Err(DiskError::Unsupported("zeroing"))
    }
    fn id(&self) -> String {
        "broken".into()
    }
}

pub struct Rig {
    pub mem: GuestMem,
    _file: tempfile::NamedTempFile,
    pub path: std::path::PathBuf,
    pub dev: Block,
}

/// A device over a 1 MiB raw file, with every offered feature acked.
pub fn rig() -> Rig {
    rig_with(
        |path| Box::new(RawFile::open(path).expect("open disk")),
        |f| f,
    )
}

/// A device over `disk(path)` whose driver acks `ack(offered)`.
pub fn rig_with(
    disk: impl FnOnce(&std::path::Path) -> Box<dyn Disk>,
    ack: impl FnOnce(u64) -> u64,
) -> Rig {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
    let file = tempfile::NamedTempFile::new().expect("disk file");
    file.as_file().set_len(DISK).expect("size disk file");
    let path = file.path().to_path_buf();
    let mut dev = Block::new(disk(&path));
    let f = dev.features();
    assert!(f & (1 << VIRTIO_F_VERSION_1) != 0);
    dev.set_acked_features(ack(f));
    Rig {
        mem,
        _file: file,
        path,
        dev,
    }
}

pub fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

pub fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at))
        .expect("header in guest memory");
}

/// A discard / write-zeroes segment.
pub fn segment(sector: u64, count: u32, flags: u32) -> [u8; 16] {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&count.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    seg
}

pub fn read_mem(mem: &GuestMem, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at))
        .expect("read guest memory");
    v
}

/// The guest bytes of every device-readable descriptor that lies in guest memory.
pub fn readable_buffers(mem: &GuestMem, descs: &[RawDescriptor]) -> Vec<(u64, Vec<u8>)> {
    descs
        .iter()
        .map(|d| Descriptor::from(*d))
        .filter(|d| d.flags() & VRING_DESC_F_WRITE as u16 == 0)
        .filter(|d| d.addr().0 + u64::from(d.len()) <= MEM)
        .map(|d| (d.addr().0, read_mem(mem, d.addr().0, d.len() as usize)))
        .collect()
}

/// What the device answered to one chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// Length in the used ring: bytes the device wrote into the guest's buffers.
    pub len: u32,
    /// The byte at the status address afterwards ([`UNTOUCHED`] if not written).
    pub status: u8,
}

/// Submits one chain, runs the device, checks that the chain came back once and that no
/// device-readable buffer changed, and returns the answer.
pub fn submit(r: &mut Rig, descs: &[RawDescriptor], status_at: u64) -> Answer {
    let q = MockSplitQueue::new(&r.mem, 16);
    q.build_desc_chain(descs).expect("build chain");
    let mut queue: Queue = q.create_queue().expect("queue");
    r.mem
        .write_obj(UNTOUCHED, GuestAddress(status_at))
        .expect("status byte in guest memory");
    let readable = readable_buffers(&r.mem, descs);
    let notify = r
        .dev
        .process_queue(0, &mut queue, &r.mem)
        .expect("a well-formed queue stays usable");
    assert!(notify, "a served request must be signalled to the driver");
    assert_eq!(
        q.used().idx().load(),
        1,
        "the chain must come back exactly once"
    );
    let used = q.used().ring().ref_at(0).expect("used element").load();
    assert_eq!(used.id(), 0, "the used element names the chain's head");
    for (addr, before) in readable {
        assert_eq!(
            read_mem(&r.mem, addr, before.len()),
            before,
            "the device wrote into the device-readable buffer at {addr:#x}"
        );
    }
    Answer {
        len: used.len(),
        status: r
            .mem
            .read_obj::<u8>(GuestAddress(status_at))
            .expect("status byte"),
    }
}

/// Submits a request the device must refuse with `status`, writing nothing but the
/// status byte and leaving the disk as it was.
pub fn refused(r: &mut Rig, what: &str, descs: &[RawDescriptor], status: u8) {
    let disk = std::fs::read(&r.path).expect("read disk");
    let answer = submit(r, descs, STATUS);
    assert_eq!(answer, Answer { len: 1, status }, "{what}");
    assert!(
        std::fs::read(&r.path).expect("read disk") == disk,
        "{what}: a refused request changed the disk"
    );
}

/// Submits a chain the device cannot even answer (no place for a status, or buffers
/// outside guest memory): it comes back with length 0, status and disk untouched.
pub fn dropped(r: &mut Rig, what: &str, descs: &[RawDescriptor]) {
    let disk = std::fs::read(&r.path).expect("read disk");
    let answer = submit(r, descs, STATUS);
    assert_eq!(
        answer,
        Answer {
            len: 0,
            status: UNTOUCHED
        },
        "{what}"
    );
    assert!(
        std::fs::read(&r.path).expect("read disk") == disk,
        "{what}: a dropped request changed the disk"
    );
}
