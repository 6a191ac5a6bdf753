//! Disks that refuse: read-only, features the driver did not ack, a failing backend.

use tessera_disk::RawFile;
use tessera_virtio::VirtioDevice;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

use crate::rig::*;

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
