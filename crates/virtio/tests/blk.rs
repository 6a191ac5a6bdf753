//! virtio-blk against hand-built virtqueues in synthetic guest memory, including guests
//! that lie in their descriptors.

use proptest::prelude::*;
use tessera_disk::RawFile;
use tessera_virtio::blk::Block;
use tessera_virtio::GuestMem;
use tessera_virtio::VirtioDevice;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 1 << 20;

struct Rig {
    mem: GuestMem,
    _file: tempfile::NamedTempFile,
    path: std::path::PathBuf,
    dev: Block,
}

fn rig() -> Rig {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let path = file.path().to_path_buf();
    let mut dev = Block::new(Box::new(RawFile::open(&path).unwrap()));
    let f = dev.features();
    assert!(f & (1 << VIRTIO_F_VERSION_1) != 0);
    dev.set_acked_features(f);
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
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Submits one chain, runs the device, returns (used length, status byte at `status_at`).
fn submit(r: &mut Rig, descs: &[RawDescriptor], status_at: u64) -> (u32, u8) {
    let q = MockSplitQueue::new(&r.mem, 16);
    q.build_desc_chain(descs).unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    mem_status(&r.mem, status_at, 0xee);
    r.dev.process_queue(0, &mut queue, &r.mem).unwrap();
    let used = q.used().ring().ref_at(0).unwrap().load();
    (
        used.len(),
        r.mem.read_obj::<u8>(GuestAddress(status_at)).unwrap(),
    )
}

fn mem_status(mem: &GuestMem, at: u64, v: u8) {
    mem.write_obj(v, GuestAddress(at)).unwrap();
}

const HDR: u64 = 0x8_0000;
const DATA: u64 = 0x9_0000;
const STATUS: u64 = 0xa_0000;

#[test]
fn write_then_read_back_through_the_disk() {
    let mut r = rig();
    r.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    header(&r.mem, HDR, VIRTIO_BLK_T_OUT, 8);
    let (len, st) = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 1024, false),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!((len, st), (1, VIRTIO_BLK_S_OK as u8));
    let on_disk = std::fs::read(&r.path).unwrap();
    assert!(on_disk[4096..5120].iter().all(|b| *b == 0x5a));

    // Read it back with the header and status sharing one descriptor each way split oddly.
    r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, 8);
    let (len, st) = submit(
        &mut r,
        &[
            desc(HDR, 8, false),
            desc(HDR + 8, 8, false),
            desc(DATA, 512, true),
            desc(DATA + 512, 513, true),
        ],
        DATA + 1024,
    );
    assert_eq!((len, st), (1025, VIRTIO_BLK_S_OK as u8));
    let mut back = [0u8; 1024];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0x5a; 1024]);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let mut r = rig();
    header(&r.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        submit(
            &mut r,
            &[desc(HDR, 16, false), desc(STATUS, 1, true)],
            STATUS
        )
        .1,
        0
    );
    header(&r.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (len, st) = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 20, true),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!((len, st), (21, 0));

    std::fs::write(&r.path, vec![0xffu8; 1 << 20]).unwrap();
    for (kind, flags) in [(VIRTIO_BLK_T_DISCARD, 0u32), (VIRTIO_BLK_T_WRITE_ZEROES, 1)] {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&16u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        header(&r.mem, HDR, kind, 0);
        let (_, st) = submit(
            &mut r,
            &[
                desc(HDR, 16, false),
                desc(DATA, 16, false),
                desc(STATUS, 1, true),
            ],
            STATUS,
        );
        assert_eq!(st, VIRTIO_BLK_S_OK as u8);
        let disk = std::fs::read(&r.path).unwrap();
        assert!(disk[8192..12288].iter().all(|b| *b == 0));
        assert!(disk[12288..12289] == [0xff]);
    }
}

#[test]
fn lying_requests_fail_without_touching_the_disk() {
    let mut r = rig();
    std::fs::write(&r.path, vec![0x11u8; 1 << 20]).unwrap();
    let cases: Vec<(&str, Vec<RawDescriptor>, u8)> = vec![
        // Write past the end of the disk.
        (
            "past the end",
            {
                header(&r.mem, HDR, VIRTIO_BLK_T_OUT, 2047);
                vec![
                    desc(HDR, 16, false),
                    desc(DATA, 1024, false),
                    desc(STATUS, 1, true),
                ]
            },
            VIRTIO_BLK_S_IOERR as u8,
        ),
        (
            "unknown type",
            {
                header(&r.mem, 0x8_1000, 99, 0);
                vec![desc(0x8_1000, 16, false), desc(STATUS, 1, true)]
            },
            VIRTIO_BLK_S_UNSUPP as u8,
        ),
        (
            "short header",
            vec![desc(HDR, 8, false), desc(STATUS, 1, true)],
            VIRTIO_BLK_S_IOERR as u8,
        ),
        (
            "not whole sectors",
            {
                header(&r.mem, 0x8_2000, VIRTIO_BLK_T_OUT, 0);
                vec![
                    desc(0x8_2000, 16, false),
                    desc(DATA, 100, false),
                    desc(STATUS, 1, true),
                ]
            },
            VIRTIO_BLK_S_IOERR as u8,
        ),
    ];
    for (what, descs, want) in cases {
        let (_, st) = submit(&mut r, &descs, STATUS);
        assert_eq!(st, want, "{what}");
    }
    // Sector number that overflows when multiplied by 512.
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, u64::MAX / 256);
    let (_, st) = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
    // A data buffer outside guest memory: the chain comes back with nothing written.
    header(&r.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let (len, st) = submit(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(MEM + 4096, 512, false),
            desc(STATUS, 1, true),
        ],
        STATUS,
    );
    assert_eq!((len, st), (0, 0xee));
    // No writable byte for the status.
    let (len, _) = submit(
        &mut r,
        &[desc(HDR, 16, false), desc(DATA, 512, false)],
        STATUS,
    );
    assert_eq!(len, 0);
    assert!(
        std::fs::read(&r.path).unwrap().iter().all(|b| *b == 0x11),
        "a refused request wrote"
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
    assert!(r.dev.process_queue(0, &mut queue, &r.mem).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]
    /// Arbitrary descriptor tables and request bytes never panic the device, and every
    /// descriptor the guest listed as read-only stays unmodified.
    #[test]
    fn random_descriptor_tables_never_panic(
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
        let _ = q.add_desc_chains(&table, 0);
        if let Ok(mut queue) = q.create_queue::<Queue>() {
            let _ = r.dev.process_queue(0, &mut queue, &r.mem);
        }
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
        let base = (k * 3) as u16;
        table.push(RawDescriptor::from(Descriptor::new(h, 16, next, base + 1)));
        table.push(RawDescriptor::from(Descriptor::new(d, 512, next, base + 2)));
        table.push(RawDescriptor::from(Descriptor::new(st, 1, write, 0)));
    }
    q.add_desc_chains(&table, 0).unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    r.dev.process_queue(0, &mut queue, &r.mem).unwrap();
    let disk = std::fs::read(&r.path).unwrap();
    for k in 0..3u64 {
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS + k)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        let at = (k * 8 * 512) as usize;
        assert!(
            disk[at..at + 512].iter().all(|b| *b == k as u8 + 1),
            "request {k} not on disk"
        );
        assert_eq!(q.used().ring().ref_at(k as usize).unwrap().load().len(), 1);
    }
}
