//! Round trips and bad input for the repair messages (`SnapshotRead`, `Repair`,
//! `RepairReply`).

use super::*;

fn vol() -> VolumeName {
    VolumeName::new("vm-disk.0_a").unwrap()
}

fn snap() -> VolumeName {
    VolumeName::new("nightly").unwrap()
}

fn repair(snapshot: Option<VolumeName>, offset: u64, data: Vec<u8>) -> Message {
    Message::Repair {
        volume: vol(),
        generation: Generation(3),
        request: 9,
        snapshot,
        offset,
        data,
    }
}

fn messages() -> Vec<Message> {
    let mut all = vec![
        Message::SnapshotRead {
            volume: vol(),
            generation: Generation(3),
            request: 4,
            snapshot: snap(),
            offset: 1 << 20,
            len: 8192,
        },
        repair(None, 4096, vec![5; 4096]),
        repair(Some(snap()), 1 << 30, vec![6; 4096]),
    ];
    for o in [
        RepairOutcome::Rewritten,
        RepairOutcome::NotNeeded,
        RepairOutcome::Mismatch,
    ] {
        all.push(Message::RepairReply {
            request: 9,
            result: Ok(o),
        });
    }
    all.push(Message::RepairReply {
        request: 9,
        result: Err(ReplyError::StaleGeneration {
            current: Generation(4),
        }),
    });
    all
}

#[test]
fn repair_messages_round_trip_and_every_truncation_is_a_typed_error() {
    for msg in messages() {
        let frame = encode(&msg).unwrap();
        assert_eq!(decode_body(&frame[4..]).unwrap(), msg);
        for cut in 0..frame.len() - 4 {
            match decode_body(&frame[4..4 + cut]) {
                Err(WireError::Truncated { .. }) => {}
                other => panic!("{msg:?} cut at {cut}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_repair_carries_exactly_one_aligned_block() {
    for (offset, len) in [(4096, 512), (4096, 8192), (4096, 0), (512, 4096)] {
        assert!(
            encode(&repair(None, offset, vec![1; len])).is_err(),
            "{offset} {len}"
        );
    }
    // The decoder applies the same rule to what a peer sends: a short block.
    let mut frame = encode(&repair(None, 4096, vec![1; 4096])).unwrap();
    let at = frame.len() - 4096 - 4;
    frame[at..at + 4].copy_from_slice(&2048u32.to_be_bytes());
    frame.truncate(frame.len() - 2048);
    assert!(decode_body(&frame[4..]).is_err());
    // A snapshot read follows a read's rules.
    let bad = Message::SnapshotRead {
        volume: vol(),
        generation: Generation(3),
        request: 1,
        snapshot: snap(),
        offset: 100,
        len: 4096,
    };
    assert!(encode(&bad).is_err());
}

#[test]
fn bad_flags_and_outcomes_are_refused() {
    // The snapshot flag of a Repair: byte after kind, name (1 + 11), generation, request.
    let mut frame = encode(&repair(None, 4096, vec![1; 4096])).unwrap();
    let flag = 4 + 2 + 1 + vol().as_str().len() + 8 + 8;
    assert_eq!(frame[flag], 0);
    frame[flag] = 2;
    assert_eq!(
        decode_body(&frame[4..]),
        Err(WireError::BadValue {
            field: "snapshot flag",
            value: 2
        })
    );
    let mut reply = encode(&Message::RepairReply {
        request: 1,
        result: Ok(RepairOutcome::Mismatch),
    })
    .unwrap();
    let last = reply.len() - 1;
    reply[last] = 7;
    assert_eq!(
        decode_body(&reply[4..]),
        Err(WireError::BadValue {
            field: "repair outcome",
            value: 7
        })
    );
}
