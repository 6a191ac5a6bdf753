//! Guests that lie in their descriptors: refused for the right reason, the disk and the
//! guest's device-readable buffers untouched, the VMM never panicking.

use proptest::prelude::*;
use tessera_virtio::blk::MAX_REQUEST;
use tessera_virtio::{QueueBroken, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::rig::*;

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
