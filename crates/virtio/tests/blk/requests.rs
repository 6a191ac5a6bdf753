//! Well-formed requests: what a driver asks is done, on the disk and in its buffers.

use tessera_virtio::VirtioDevice;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::rig::*;

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
