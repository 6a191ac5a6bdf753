//! The virtio-mmio register window against a driver that follows the spec and one that
//! writes garbage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use tessera_disk::RawFile;
use tessera_virtio::blk::Block;
use tessera_virtio::mmio::MmioTransport;
use tessera_virtio::GuestMem;
use tessera_virtio::Interrupt;
use vm_memory::GuestAddress;

struct Count(AtomicUsize);
impl Interrupt for Count {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn transport() -> (MmioTransport, tempfile::NamedTempFile) {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let dev = Block::new(Box::new(RawFile::open(f.path()).unwrap()));
    (
        MmioTransport::new(Box::new(dev), mem, Arc::new(Count(AtomicUsize::new(0)))),
        f,
    )
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) -> Option<u32> {
    t.write(off, &v.to_le_bytes())
}

#[test]
fn identification_and_negotiation_follow_the_spec() {
    let (mut t, _f) = transport();
    assert_eq!(r32(&mut t, 0), 0x7472_6976);
    assert_eq!(r32(&mut t, 4), 2);
    assert_eq!(r32(&mut t, 8), 2);
    w32(&mut t, 0x70, 1 | 2);
    // Asking for a feature that was not offered (bit 63) fails FEATURES_OK.
    w32(&mut t, 0x24, 1);
    w32(&mut t, 0x20, 1 | (1 << 31));
    w32(&mut t, 0x70, 1 | 2 | 8);
    assert_eq!(
        r32(&mut t, 0x70) & 8,
        0,
        "FEATURES_OK accepted with an unoffered feature"
    );
    // Reset and do it right.
    w32(&mut t, 0x70, 0);
    w32(&mut t, 0x70, 1 | 2);
    w32(&mut t, 0x24, 1);
    w32(&mut t, 0x20, 1); // VERSION_1
    w32(&mut t, 0x70, 1 | 2 | 8);
    assert_eq!(r32(&mut t, 0x70) & 8, 8);
    // A queue whose rings lie outside guest memory is never made ready.
    w32(&mut t, 0x30, 0);
    w32(&mut t, 0x38, 8);
    w32(&mut t, 0x80, 0);
    w32(&mut t, 0x84, 0x10); // descriptor table at 64 GiB
    w32(&mut t, 0x44, 1);
    assert_eq!(r32(&mut t, 0x44), 0);
    // Wrong-width register accesses are ignored.
    let mut two = [0xaa; 2];
    t.read(0, &mut two);
    assert_eq!(two, [0, 0]);
    assert_eq!(t.write(0x70, &[0]), None);
    assert_eq!(r32(&mut t, 0x70) & 8, 8);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
    /// Any sequence of register reads, writes and notifications leaves the VMM standing.
    #[test]
    fn random_register_traffic_never_panics(ops in proptest::collection::vec(
        (0u64..0x200, any::<u32>(), 0u8..4, any::<bool>()), 1..200)) {
        let (mut t, _f) = transport();
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
    }
}
