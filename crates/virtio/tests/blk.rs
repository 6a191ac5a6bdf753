//! virtio-blk against hand-built virtqueues in synthetic guest memory, including guests
//! that lie in their descriptors.
//!
//! Every submission checks what a guest relies on besides the status byte: the request
//! comes back in the used ring exactly once, and no buffer the guest gave the device to
//! read (a descriptor without `VRING_DESC_F_WRITE`) is written. Every refused request is
//! checked for its reason (`IOERR` or `UNSUPP`) and for leaving the disk untouched.

use proptest::prelude::*;
use tessera_disk::{Disk, DiskError, RawFile};
use tessera_virtio::blk::{Block, MAX_REQUEST};
use tessera_virtio::GuestMem;
use tessera_virtio::{QueueBroken, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 1 << 20;
const DISK: u64 = 1 << 20;
/// What the tests put in the status byte before the device runs.
const UNTOUCHED: u8 = 0xee;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const HDR: u64 = 0x8_0000;
const DATA: u64 = 0x9_0000;
const STATUS: u64 = 0xa_0000;

/// A disk the device must not write to.
struct ReadOnly(RawFile);

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
struct Broken;

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

struct Rig {
    mem: GuestMem,
    _file: tempfile::NamedTempFile,
    path: std::path::PathBuf,
    dev: Block,
}

/// A device over a 1 MiB raw file, with every offered feature acked.
fn rig() -> Rig {
    rig_with(
        |path| Box::new(RawFile::open(path).expect("open disk")),
        |f| f,
    )
}

/// A device over `disk(path)` whose driver acks `ack(offered)`.
fn rig_with(
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

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at))
        .expect("header in guest memory");
}

/// A discard / write-zeroes segment.
fn segment(sector: u64, count: u32, flags: u32) -> [u8; 16] {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&count.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    seg
}

fn read_mem(mem: &GuestMem, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at))
        .expect("read guest memory");
    v
}

/// The guest bytes of every device-readable descriptor that lies in guest memory.
fn readable_buffers(mem: &GuestMem, descs: &[RawDescriptor]) -> Vec<(u64, Vec<u8>)> {
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
struct Answer {
    /// Length in the used ring: bytes the device wrote into the guest's buffers.
    len: u32,
    /// The byte at the status address afterwards ([`UNTOUCHED`] if not written).
    status: u8,
}

/// Submits one chain, runs the device, checks that the chain came back once and that no
/// device-readable buffer changed, and returns the answer.
fn submit(r: &mut Rig, descs: &[RawDescriptor], status_at: u64) -> Answer {
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
fn refused(r: &mut Rig, what: &str, descs: &[RawDescriptor], status: u8) {
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
fn dropped(r: &mut Rig, what: &str, descs: &[RawDescriptor]) {
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

#[test]
fn write_then_read_back_through_the_disk() {
    let mut r = rig();
    r.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    header(&r.mem, HDR, VIRTIO_BLK_T_OUT, 8);
    let answer = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 1024, false),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!(answer, Answer { len: 1, status: OK });
    let on_disk = std::fs::read(&r.path).unwrap();
    assert!(on_disk[4096..5120].iter().all(|b| *b == 0x5a));
    assert!(on_disk[..4096].iter().all(|b| *b == 0), "wrote before");
    assert!(on_disk[5120..].iter().all(|b| *b == 0), "wrote after");

    // Read it back with the header split in two and the status sharing the last data
    // descriptor.
    r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, 8);
    let answer = submit(
        &mut r,
        &[
            desc(HDR, 8, false),
            desc(HDR + 8, 8, false),
            desc(DATA, 512, true),
            desc(DATA + 512, 513, true),
        ],
        DATA + 1024,
    );
    assert_eq!(
        answer,
        Answer {
            len: 1025,
            status: OK
        }
    );
    assert_eq!(read_mem(&r.mem, DATA, 1024), [0x5a; 1024]);
}

#[test]
fn flush_and_get_id() {
    let mut r = rig();
    header(&r.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let answer = submit(
        &mut r,
        &[desc(HDR, 16, false), desc(STATUS, 1, true)],
        STATUS,
    );
    assert_eq!(answer, Answer { len: 1, status: OK });

    header(&r.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    r.mem.write_slice(&[0xaa; 20], GuestAddress(DATA)).unwrap();
    let answer = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 20, true),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!(
        answer,
        Answer {
            len: 21,
            status: OK
        }
    );
    let name = r.path.file_name().unwrap().to_string_lossy().into_owned();
    let mut want = [0u8; 20];
    let n = name.len().min(20);
    want[..n].copy_from_slice(&name.as_bytes()[..n]);
    assert_eq!(read_mem(&r.mem, DATA, 20), want, "disk id of {name:?}");
}

#[test]
fn discard_and_write_zeroes_clear_exactly_their_range() {
    let mut r = rig();
    for (kind, flags) in [
        (VIRTIO_BLK_T_DISCARD, 0u32),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        ),
    ] {
        // Each operation starts from a full disk, so one that does nothing fails.
        std::fs::write(&r.path, vec![0xffu8; DISK as usize]).unwrap();
        r.mem
            .write_slice(&segment(16, 8, flags), GuestAddress(DATA))
            .unwrap();
        header(&r.mem, HDR, kind, 0);
        let answer = submit(
            &mut r,
            &[
                desc(HDR, 16, false),
                desc(DATA, 16, false),
                desc(STATUS, 1, true),
            ],
            STATUS,
        );
        assert_eq!(answer, Answer { len: 1, status: OK }, "type {kind}");
        let disk = std::fs::read(&r.path).unwrap();
        assert!(disk[8192..12288].iter().all(|b| *b == 0), "type {kind}");
        assert!(disk[..8192].iter().all(|b| *b == 0xff), "type {kind}");
        assert!(disk[12288..].iter().all(|b| *b == 0xff), "type {kind}");
    }
}

#[test]
fn lying_requests_are_refused_for_their_reason_without_touching_the_disk() {
    let mut r = rig();
    std::fs::write(&r.path, vec![0x11u8; DISK as usize]).unwrap();
    let out = |r: &Rig, sector: u64| header(&r.mem, HDR, VIRTIO_BLK_T_OUT, sector);
    let data_out = |len: u32| {
        vec![
            desc(HDR, 16, false),
            desc(DATA, len, false),
            desc(STATUS, 1, true),
        ]
    };

    out(&r, 2047);
    refused(&mut r, "write past the end", &data_out(1024), IOERR);
    out(&r, 0);
    refused(&mut r, "write of part of a sector", &data_out(100), IOERR);
    out(&r, u64::MAX / 256);
    refused(&mut r, "sector overflows as bytes", &data_out(512), IOERR);
    // More than MAX_REQUEST bytes, spread over descriptors that each fit guest memory.
    let mut big = vec![desc(HDR, 16, false)];
    let piece = 0x4_b000u32;
    big.extend((0..14).map(|_| desc(0xb_0000, piece, false)));
    big.push(desc(STATUS, 1, true));
    assert!(14 * piece as usize > MAX_REQUEST);
    out(&r, 0);
    refused(&mut r, "write larger than MAX_REQUEST", &big, IOERR);

    refused(
        &mut r,
        "header shorter than 16 bytes",
        &[desc(HDR, 8, false), desc(STATUS, 1, true)],
        IOERR,
    );
    header(&r.mem, HDR, 99, 0);
    refused(
        &mut r,
        "unknown request type",
        &[desc(HDR, 16, false), desc(STATUS, 1, true)],
        UNSUPP,
    );

    // Reads that do not check out write nothing into the data buffer.
    r.mem
        .write_slice(&[0x77; 1024], GuestAddress(DATA))
        .unwrap();
    for (what, sector) in [
        ("read past the end", 2047),
        ("read overflow", u64::MAX / 256),
    ] {
        header(&r.mem, HDR, VIRTIO_BLK_T_IN, sector);
        refused(
            &mut r,
            what,
            &[
                desc(HDR, 16, false),
                desc(DATA, 1024, true),
                desc(STATUS, 1, true),
            ],
            IOERR,
        );
        assert_eq!(read_mem(&r.mem, DATA, 1024), [0x77; 1024], "{what}");
    }

    // Discard and write-zeroes segments.
    let ranged = |r: &mut Rig, what: &str, kind: u32, segs: &[[u8; 16]], want: u8| {
        let bytes: Vec<u8> = segs.concat();
        r.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        header(&r.mem, HDR, kind, 0);
        let mut descs = vec![desc(HDR, 16, false)];
        if !bytes.is_empty() {
            descs.push(desc(DATA, bytes.len() as u32, false));
        }
        descs.push(desc(STATUS, 1, true));
        refused(r, what, &descs, want);
    };
    let (discard, zeroes) = (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES);
    ranged(&mut r, "discard without a segment", discard, &[], IOERR);
    ranged(
        &mut r,
        "discard with two segments (one allowed)",
        discard,
        &[segment(0, 8, 0), segment(16, 8, 0)],
        IOERR,
    );
    ranged(
        &mut r,
        "discard past the end",
        discard,
        &[segment(2040, 16, 0)],
        IOERR,
    );
    ranged(
        &mut r,
        "discard sector overflows",
        discard,
        &[segment(u64::MAX / 256, 8, 0)],
        IOERR,
    );
    ranged(
        &mut r,
        "discard with the unmap flag",
        discard,
        &[segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        UNSUPP,
    );
    ranged(
        &mut r,
        "write-zeroes with an unknown flag",
        zeroes,
        &[segment(0, 8, 2)],
        UNSUPP,
    );
    ranged(
        &mut r,
        "discard longer than max_discard_sectors",
        discard,
        &[segment(0, (1 << 22) + 1, 0)],
        UNSUPP,
    );
    // A segment list that is not whole segments.
    r.mem
        .write_slice(&segment(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    header(&r.mem, HDR, discard, 0);
    refused(
        &mut r,
        "discard with a partial segment",
        &[
            desc(HDR, 16, false),
            desc(DATA, 12, false),
            desc(STATUS, 1, true),
        ],
        IOERR,
    );

    // Chains that cannot be answered at all.
    out(&r, 0);
    dropped(
        &mut r,
        "data buffer outside guest memory",
        &[
            desc(HDR, 16, false),
            desc(MEM + 4096, 512, false),
            desc(STATUS, 1, true),
        ],
    );
    dropped(
        &mut r,
        "no writable byte for the status",
        &[desc(HDR, 16, false), desc(DATA, 512, false)],
    );
    dropped(
        &mut r,
        "status buffer outside guest memory",
        &[
            desc(HDR, 16, false),
            desc(DATA, 512, false),
            desc(MEM - 1, 2, true),
        ],
    );
    assert!(
        std::fs::read(&r.path).unwrap().iter().all(|b| *b == 0x11),
        "a refused request wrote"
    );
}

#[test]
fn buffers_the_guest_marked_device_readable_are_never_written() {
    let mut r = rig();
    std::fs::write(&r.path, vec![0x33u8; DISK as usize]).unwrap();
    r.mem
        .write_slice(&[0x77; 1024], GuestAddress(DATA))
        .unwrap();
    // A read whose data buffer is device-readable: the disk's bytes have nowhere to go.
    // `submit` checks that the readable buffers are unchanged.
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let answer = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 1024, false),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!(answer.len, 1, "only the status byte may be written");
    // A read split over a readable and a writable buffer fills only the writable one.
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let answer = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 512, false),
            desc(DATA + 512, 512, true),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!(
        answer,
        Answer {
            len: 513,
            status: OK
        }
    );
    assert_eq!(read_mem(&r.mem, DATA + 512, 512), [0x33; 512]);
    // GET_ID into a readable buffer.
    header(&r.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let answer = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 20, false),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!(answer.len, 1, "only the status byte may be written");
    assert_eq!(read_mem(&r.mem, DATA, 512), [0x77; 512]);
}

#[test]
fn a_read_only_disk_refuses_writes_and_offers_no_discard() {
    let mut r = rig_with(
        |path| Box::new(ReadOnly(RawFile::open(path).unwrap())),
        |f| f,
    );
    let f = r.dev.features();
    assert!(f & (1 << VIRTIO_BLK_F_RO) != 0, "RO not offered");
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0, "discard offered");
    assert_eq!(
        f & (1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0,
        "write-zeroes offered"
    );
    std::fs::write(&r.path, vec![0x22u8; DISK as usize]).unwrap();
    r.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    header(&r.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    refused(
        &mut r,
        "write to a read-only disk",
        &[
            desc(HDR, 16, false),
            desc(DATA, 512, false),
            desc(STATUS, 1, true),
        ],
        IOERR,
    );
    r.mem
        .write_slice(&segment(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&r.mem, HDR, kind, 0);
        refused(
            &mut r,
            "discard / write-zeroes on a read-only disk",
            &[
                desc(HDR, 16, false),
                desc(DATA, 16, false),
                desc(STATUS, 1, true),
            ],
            UNSUPP,
        );
    }
    // Reads still work.
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let answer = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!(
        answer,
        Answer {
            len: 513,
            status: OK
        }
    );
    assert_eq!(read_mem(&r.mem, DATA, 512), [0x22; 512]);
}

#[test]
fn requests_for_features_the_driver_did_not_ack_are_unsupported() {
    let mut r = rig_with(
        |path| Box::new(RawFile::open(path).unwrap()),
        |f| {
            f & !((1 << VIRTIO_BLK_F_FLUSH)
                | (1 << VIRTIO_BLK_F_DISCARD)
                | (1 << VIRTIO_BLK_F_WRITE_ZEROES))
        },
    );
    std::fs::write(&r.path, vec![0x44u8; DISK as usize]).unwrap();
    r.mem
        .write_slice(&segment(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    header(&r.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    refused(
        &mut r,
        "flush without FLUSH",
        &[desc(HDR, 16, false), desc(STATUS, 1, true)],
        UNSUPP,
    );
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&r.mem, HDR, kind, 0);
        refused(
            &mut r,
            "discard / write-zeroes not acked",
            &[
                desc(HDR, 16, false),
                desc(DATA, 16, false),
                desc(STATUS, 1, true),
            ],
            UNSUPP,
        );
    }
}

#[test]
fn a_failing_disk_answers_ioerr() {
    let mut r = rig_with(|_| Box::new(Broken), |f| f);
    r.mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        header(&r.mem, HDR, kind, 0);
        let answer = submit(
            &mut r,
            &[
                desc(HDR, 16, false),
                desc(DATA, 512, kind == VIRTIO_BLK_T_IN),
                desc(STATUS, 1, true),
            ],
            STATUS,
        );
        assert_eq!(
            answer,
            Answer {
                len: 1,
                status: IOERR
            },
            "type {kind}"
        );
        assert_eq!(read_mem(&r.mem, DATA, 512), [0x77; 512], "type {kind}");
    }
    header(&r.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let answer = submit(
        &mut r,
        &[desc(HDR, 16, false), desc(STATUS, 1, true)],
        STATUS,
    );
    assert_eq!(
        answer,
        Answer {
            len: 1,
            status: IOERR
        }
    );
}

#[test]
fn a_corrupt_available_index_breaks_the_queue_not_the_vmm() {
    let mut r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    let mut queue: Queue = q.create_queue().unwrap();
    // avail.idx 1000 ahead of next_avail on a 16-entry queue.
    r.mem
        .write_obj(1000u16, GuestAddress(q.avail_addr().0 + 2))
        .unwrap();
    let err = r.dev.process_queue(0, &mut queue, &r.mem).unwrap_err();
    assert!(
        matches!(err, QueueBroken(virtio_queue::Error::InvalidAvailRingIndex)),
        "{err:?}"
    );
    assert_eq!(q.used().idx().load(), 0, "a broken queue got used entries");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]
    /// Arbitrary descriptor tables and request bytes never panic the device or break a
    /// queue whose rings are sound, and no byte that only device-readable descriptors
    /// cover is modified.
    #[test]
    fn random_descriptor_tables_never_panic_or_write_readable_buffers(
        descs in proptest::collection::vec((0u64..(MEM + 0x2000), 0u32..70_000, any::<bool>(), any::<bool>(), 0u16..20), 1..8),
        hdr in proptest::collection::vec(any::<u8>(), 16),
    ) {
        let mut r = rig();
        r.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let q = MockSplitQueue::new(&r.mem, 16);
        let table: Vec<RawDescriptor> = descs.iter().map(|&(addr, len, write, next, to)| {
            let mut flags = 0u16;
            if write { flags |= VRING_DESC_F_WRITE as u16; }
            if next { flags |= VRING_DESC_F_NEXT as u16; }
            RawDescriptor::from(Descriptor::new(addr, len, flags, to))
        }).collect();
        q.add_desc_chains(&table, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        // Bytes the device may write: writable descriptors and the used ring (flags,
        // index, 16 elements of 8 bytes, avail_event).
        let mut may_write = vec![false; MEM as usize];
        let used = q.used_addr().0 as usize;
        may_write[used..used + 4 + 16 * 8 + 2].fill(true);
        for &(addr, len, write, _, _) in &descs {
            if write && addr < MEM {
                let end = (addr + u64::from(len)).min(MEM);
                may_write[addr as usize..end as usize].fill(true);
            }
        }
        let before = read_mem(&r.mem, 0, MEM as usize);
        prop_assert!(r.dev.process_queue(0, &mut queue, &r.mem).is_ok());
        let after = read_mem(&r.mem, 0, MEM as usize);
        let written = (0..MEM as usize).find(|&i| before[i] != after[i] && !may_write[i]);
        prop_assert_eq!(written, None, "the device wrote a byte no writable descriptor covers");
    }
}

#[test]
fn several_requests_in_flight_are_all_served_in_one_notification() {
    let mut r = rig();
    let q = MockSplitQueue::new(&r.mem, 16);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let mut table = Vec::new();
    for k in 0..3u64 {
        let (h, d, st) = (HDR + k * 0x100, DATA + k * 0x1000, STATUS + k);
        header(&r.mem, h, VIRTIO_BLK_T_OUT, k * 8);
        r.mem
            .write_slice(&[k as u8 + 1; 512], GuestAddress(d))
            .unwrap();
        r.mem.write_obj(UNTOUCHED, GuestAddress(st)).unwrap();
        let base = (k * 3) as u16;
        table.push(RawDescriptor::from(Descriptor::new(h, 16, next, base + 1)));
        table.push(RawDescriptor::from(Descriptor::new(d, 512, next, base + 2)));
        table.push(RawDescriptor::from(Descriptor::new(st, 1, write, 0)));
    }
    q.add_desc_chains(&table, 0).unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    assert!(r.dev.process_queue(0, &mut queue, &r.mem).unwrap());
    assert_eq!(q.used().idx().load(), 3);
    let disk = std::fs::read(&r.path).unwrap();
    for k in 0..3u64 {
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS + k)).unwrap(), OK);
        let at = (k * 8 * 512) as usize;
        assert!(
            disk[at..at + 512].iter().all(|b| *b == k as u8 + 1),
            "request {k} not on disk"
        );
        let used = q.used().ring().ref_at(k as usize).unwrap().load();
        assert_eq!((used.id(), used.len()), (k as u32 * 3, 1), "request {k}");
    }
}
