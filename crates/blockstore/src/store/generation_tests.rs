//! The replication fence: a raised generation is durable, never lowered, stamped on the
//! write records that follow, and refuses writers bound to an older one.

use std::time::Duration;

use super::{Store, StoreOptions};
use crate::error::StoreError;
use crate::format::{RecordKind, BLOCK_SIZE};
use crate::wal::{list_segments, replay_segment};

const MIB: u64 = 1 << 20;

fn quiet(dir: &std::path::Path) -> Store {
    let opts = StoreOptions {
        checkpoint_interval: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    Store::open(dir, opts).unwrap()
}

#[test]
fn a_raised_generation_survives_a_reopen_and_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = quiet(dir.path());
        s.create_volume("v", 4 * MIB).unwrap();
        assert_eq!(s.generation("v").unwrap(), 1);
        assert_eq!(s.raise_generation("v", 7).unwrap(), 7);
        assert_eq!(s.raise_generation("v", 3).unwrap(), 7, "lower: unchanged");
        assert_eq!(s.raise_generation("v", 7).unwrap(), 7, "equal: unchanged");
        assert_eq!(s.volume_info("v").unwrap().generation, 7);
    }
    let s = quiet(dir.path());
    assert_eq!(s.generation("v").unwrap(), 7, "persisted across a reopen");
    assert_eq!(s.raise_generation("v", 2).unwrap(), 7);
    assert!(matches!(
        s.raise_generation("nope", 9),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(s.generation("nope"), Err(StoreError::NotFound(_))));
}

#[test]
fn writes_are_stamped_with_the_generation_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 4 * MIB).unwrap();
    let e = s.open_export("v").unwrap();
    e.write_at(0, &vec![1u8; BLOCK_SIZE], false).unwrap();
    s.raise_generation("v", 4).unwrap();
    assert_eq!(e.generation(), 4);
    e.write_at(BLOCK_SIZE as u64, &vec![2u8; BLOCK_SIZE], false)
        .unwrap();
    e.trim(0, BLOCK_SIZE as u64, false).unwrap();
    s.flush().unwrap();

    let wal = dir.path().join("wal");
    let mut stamps = Vec::new();
    for seg in list_segments(&wal).unwrap() {
        replay_segment(&wal, seg, |r| {
            if matches!(r.header.kind, RecordKind::Data | RecordKind::Fill(_)) {
                stamps.push(r.header.generation);
            }
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(stamps, vec![1, 4, 4]);
}

#[test]
fn an_export_bound_to_an_old_generation_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(dir.path());
    s.create_volume("v", 4 * MIB).unwrap();
    let old = s.open_export("v").unwrap();
    old.bind_generation(1);
    old.write_at(0, &vec![1u8; BLOCK_SIZE], false).unwrap();
    s.raise_generation("v", 2).unwrap();

    let stale = |r: crate::Result<()>| {
        matches!(
            r,
            Err(StoreError::StaleGeneration {
                held: 1,
                current: 2,
                ..
            })
        )
    };
    assert!(stale(old.write_at(0, &vec![9u8; BLOCK_SIZE], false)));
    assert!(stale(old.write_zeroes(0, BLOCK_SIZE as u64, false, false)));
    assert!(stale(old.trim(0, BLOCK_SIZE as u64, false)));

    let mut buf = vec![0u8; BLOCK_SIZE];
    old.read_at(0, &mut buf).unwrap();
    assert_eq!(
        buf,
        vec![1u8; BLOCK_SIZE],
        "reads still work, nothing written"
    );

    let new = s.open_export("v").unwrap();
    new.bind_generation(2);
    new.write_at(0, &vec![3u8; BLOCK_SIZE], false).unwrap();
    old.bind_generation(0);
    old.write_at(0, &vec![4u8; BLOCK_SIZE], false)
        .expect("an unbound export is not fenced");
}
