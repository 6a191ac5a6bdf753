//! Round trips and every kind of bad input for the codec.

use super::*;

mod replies;

fn vol() -> VolumeName {
    VolumeName::new("vm-disk.0_a").unwrap()
}

fn every_message() -> Vec<Message> {
    let g = Generation(7);
    let errors = [
        ReplyError::StaleGeneration {
            current: Generation(9),
        },
        ReplyError::UnknownVolume,
        ReplyError::OutOfRange,
        ReplyError::NoSpace,
        ReplyError::Io("disk on fire: ünïcode".into()),
        ReplyError::NotReplica,
        ReplyError::SeqGap { expected: 12 },
        ReplyError::NotInSync,
    ];
    let mut all = vec![
        Message::Fence {
            volume: vol(),
            generation: g,
        },
        Message::Write {
            volume: vol(),
            generation: g,
            seq: 1,
            offset: 4096,
            fua: true,
            data: (0..8192u32).map(|i| i as u8).collect(),
        },
        Message::Write {
            volume: vol(),
            generation: g,
            seq: u64::MAX,
            offset: 512,
            fua: false,
            data: vec![0xab; MAX_DATA],
        },
        Message::WriteZeroes {
            volume: vol(),
            generation: g,
            seq: 2,
            offset: 0,
            len: 1 << 40,
        },
        Message::Trim {
            volume: vol(),
            generation: g,
            seq: 3,
            offset: 1024,
            len: 512,
        },
        Message::Flush {
            volume: vol(),
            generation: g,
            seq: 4,
        },
        Message::Snapshot {
            volume: vol(),
            generation: g,
            seq: 5,
            name: VolumeName::new("before-upgrade.1").unwrap(),
            size: None,
        },
        Message::Snapshot {
            volume: vol(),
            generation: g,
            seq: 6,
            name: VolumeName::new("s1").unwrap(),
            size: Some(16 << 20),
        },
        Message::Resize {
            volume: vol(),
            generation: g,
            seq: 6,
            size: 64 << 30,
        },
        Message::Digests {
            volume: vol(),
            generation: g,
            request: 5,
            offset: 8192,
            blocks: MAX_DIGEST_BLOCKS,
        },
        Message::DigestsReply {
            request: 5,
            result: Ok(vec![[1; 32], [2; 32]]),
        },
        Message::Read {
            volume: vol(),
            generation: g,
            request: 6,
            offset: 0,
            len: 4096,
        },
        Message::ReadReply {
            request: 6,
            result: Ok(vec![3; 4096]),
        },
        Message::Reply {
            seq: 0,
            result: Ok(()),
        },
        Message::Unsettled {
            volume: vol(),
            generation: g,
            request: 7,
        },
        Message::UnsettledReply {
            request: 7,
            result: Ok(vec![(0, 512), (4096, 4 << 20), (1 << 40, 4096)]),
        },
        Message::UnsettledReply {
            request: 8,
            result: Ok(Vec::new()),
        },
        Message::SnapshotList {
            volume: vol(),
            generation: g,
            request: 1,
        },
        Message::SnapshotListReply {
            request: 1,
            result: Ok(vec![VolumeName::new("template").unwrap(), vol()]),
        },
        Message::SnapshotListReply {
            request: 2,
            result: Ok(Vec::new()),
        },
    ];
    for e in errors {
        all.push(Message::Reply {
            seq: 9,
            result: Err(e.clone()),
        });
        all.push(Message::DigestsReply {
            request: 1,
            result: Err(e.clone()),
        });
        all.push(Message::ReadReply {
            request: 2,
            result: Err(e.clone()),
        });
        all.push(Message::UnsettledReply {
            request: 3,
            result: Err(e.clone()),
        });
        all.push(Message::SnapshotListReply {
            request: 4,
            result: Err(e),
        });
    }
    all
}

#[test]
fn every_message_round_trips() {
    for msg in every_message() {
        let frame = encode(&msg).unwrap();
        let mut prefix = [0; 4];
        prefix.copy_from_slice(&frame[..4]);
        assert_eq!(frame_body_len(prefix).unwrap(), frame.len() - 4);
        assert_eq!(decode_body(&frame[4..]).unwrap(), msg);
    }
}

#[test]
fn the_streaming_decoder_takes_bytes_in_any_pieces() {
    let msgs = every_message();
    let mut stream = Vec::new();
    for m in &msgs {
        encode_into(m, &mut stream).unwrap();
    }
    // One byte at a time for small frames would be slow on the 4 MiB one; use odd chunks.
    for chunk in [1usize, 3, 4096 + 7, stream.len()] {
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            d.push(piece).unwrap();
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert!(d.at_boundary());
        assert_eq!(got, msgs, "chunk size {chunk}");
    }
}

#[test]
fn many_small_frames_in_one_push_all_come_out_in_order() {
    // A whole read of replies (16 bytes each) at once, the last one cut in two.
    let mut stream = Vec::new();
    for seq in 1..=1000 {
        encode_into(
            &Message::Reply {
                seq,
                result: Ok(()),
            },
            &mut stream,
        )
        .unwrap();
    }
    let cut = stream.len() - 3;
    let mut d = Decoder::new();
    d.push(&stream[..cut]).unwrap();
    let mut seqs = Vec::new();
    while let Some(m) = d.next_message().unwrap() {
        let Message::Reply { seq, .. } = m else {
            panic!("not a reply: {m:?}")
        };
        seqs.push(seq);
    }
    assert_eq!(seqs, (1..1000).collect::<Vec<_>>());
    assert!(!d.at_boundary());
    assert_eq!(d.wants(), 3);
    d.push(&stream[cut..]).unwrap();
    assert!(matches!(
        d.next_message().unwrap(),
        Some(Message::Reply { seq: 1000, .. })
    ));
    assert!(d.at_boundary());
    // An oversize prefix behind whole frames is refused when its turn comes.
    let mut bad = Vec::new();
    encode_into(
        &Message::Reply {
            seq: 1,
            result: Ok(()),
        },
        &mut bad,
    )
    .unwrap();
    bad.extend_from_slice(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
    d.push(&bad).unwrap();
    assert!(d.next_message().unwrap().is_some());
    assert!(d.next_message().is_err());
    assert_eq!(d.push(&[0]), Err(WireError::Poisoned));
}

#[test]
fn wants_says_how_many_bytes_complete_the_next_step() {
    let frame = encode(&Message::Flush {
        volume: vol(),
        generation: Generation(1),
        seq: 1,
    })
    .unwrap();
    let mut d = Decoder::new();
    assert_eq!(d.wants(), 4);
    d.push(&frame[..2]).unwrap();
    assert_eq!(d.wants(), 2);
    d.push(&frame[2..4]).unwrap();
    assert_eq!(d.wants(), frame.len() - 4);
    assert_eq!(d.next_message().unwrap(), None);
    let n = d.wants();
    d.push(&frame[4..4 + n]).unwrap();
    assert_eq!(d.wants(), 0);
    assert!(d.next_message().unwrap().is_some());
    assert_eq!(d.wants(), 4);
}

#[test]
fn an_oversize_frame_is_refused_from_its_length_alone() {
    let len = (MAX_FRAME_LEN + 1) as u32;
    assert_eq!(
        frame_body_len(len.to_be_bytes()),
        Err(WireError::Oversize {
            len: MAX_FRAME_LEN + 1,
            max: MAX_FRAME_LEN
        })
    );
    let mut d = Decoder::new();
    // Only the prefix: the decoder fails before any body arrives, having buffered 4 bytes.
    assert!(matches!(
        d.push(&u32::MAX.to_be_bytes()),
        Err(WireError::Oversize { .. })
    ));
    assert_eq!(d.buffered(), 4);
    assert_eq!(d.push(&[0]), Err(WireError::Poisoned));
    assert_eq!(d.next_message(), Err(WireError::Poisoned));
}

#[test]
fn frames_too_short_for_version_and_kind_are_refused() {
    for len in [0u32, 1] {
        assert_eq!(
            frame_body_len(len.to_be_bytes()),
            Err(WireError::TooShort { len: len as usize })
        );
    }
    assert!(matches!(decode_body(&[]), Err(WireError::Truncated { .. })));
    assert!(matches!(
        decode_body(&[1]),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn unknown_version_and_kind_are_refused() {
    let frame = encode(&Message::Reply {
        seq: 1,
        result: Ok(()),
    })
    .unwrap();
    let mut body = frame[4..].to_vec();
    body[0] = VERSION + 1;
    assert_eq!(
        decode_body(&body),
        Err(WireError::UnknownVersion(VERSION + 1))
    );
    body[0] = 0;
    assert_eq!(decode_body(&body), Err(WireError::UnknownVersion(0)));
    body[0] = VERSION;
    for kind in [0u8, 21, 255] {
        body[1] = kind;
        assert_eq!(decode_body(&body), Err(WireError::UnknownKind(kind)));
    }
}

fn sized_snapshot() -> Message {
    Message::Snapshot {
        volume: VolumeName::new("v").unwrap(),
        generation: Generation(3),
        seq: 9,
        name: VolumeName::new("s1").unwrap(),
        size: Some(16 << 20),
    }
}

#[test]
fn a_frame_carries_the_oldest_version_that_has_its_kind() {
    // A store of version 1 reads every message it knows from a newer one: only kind 20
    // (a snapshot with a size, version 2) is sent as a version-2 frame.
    for msg in every_message() {
        let frame = encode(&msg).unwrap();
        let want = if frame[5] == 20 { 2 } else { 1 };
        assert_eq!(frame[4], want, "{msg:?}");
        assert_eq!(msg.version(), want);
        assert_eq!(decode_body(&frame[4..]).unwrap(), msg);
    }
    assert_eq!(encode(&sized_snapshot()).unwrap()[4..6], [2, 20]);
}

#[test]
fn a_kind_in_a_frame_of_a_version_without_it_is_refused() {
    let mut body = encode(&sized_snapshot()).unwrap()[4..].to_vec();
    body[0] = 1;
    assert_eq!(
        decode_body(&body),
        Err(WireError::KindNotInVersion {
            kind: 20,
            version: 1
        })
    );
}

#[test]
fn a_decoder_of_a_version_1_connection_refuses_a_version_2_frame() {
    let old = encode(&Message::Reply {
        seq: 1,
        result: Ok(()),
    })
    .unwrap();
    let new = encode(&sized_snapshot()).unwrap();
    let mut d = Decoder::speaking(1);
    d.push(&old).unwrap();
    assert!(matches!(d.next_message(), Ok(Some(Message::Reply { .. }))));
    d.push(&new).unwrap();
    assert_eq!(
        d.next_message(),
        Err(WireError::NotNegotiated {
            version: 2,
            negotiated: 1
        })
    );
    assert_eq!(d.next_message(), Err(WireError::Poisoned));
    let mut d = Decoder::speaking(2);
    d.push(&new).unwrap();
    assert_eq!(d.next_message(), Ok(Some(sized_snapshot())));
}

#[test]
fn a_message_is_not_encoded_for_a_peer_whose_version_lacks_it() {
    assert_eq!(
        encode_for(&sized_snapshot(), 1),
        Err(WireError::KindNotInVersion {
            kind: 20,
            version: 1
        })
    );
    assert_eq!(encode_for(&sized_snapshot(), 2), encode(&sized_snapshot()));
    let plain = Message::Flush {
        volume: VolumeName::new("v").unwrap(),
        generation: Generation(3),
        seq: 4,
    };
    assert_eq!(encode_for(&plain, 1), encode(&plain));
}

#[test]
fn alpn_names_map_to_versions_newest_first() {
    assert_eq!(alpn_version(b"tessera-repl/1"), Some(1));
    assert_eq!(alpn_version(b"tessera-repl/2"), Some(2));
    assert_eq!(alpn_version(b"tessera-repl/3"), None);
    assert_eq!(alpn_version(b"tessera-export/1"), None);
    assert_eq!(
        alpns_up_to(VERSION),
        [b"tessera-repl/2".to_vec(), b"tessera-repl/1".to_vec()]
    );
    assert_eq!(alpns_up_to(1), [b"tessera-repl/1".to_vec()]);
    assert_eq!(alpns_up_to(9), alpns_up_to(VERSION));
}

#[test]
fn every_truncation_of_every_message_is_a_typed_error() {
    for msg in every_message() {
        let frame = encode(&msg).unwrap();
        let body = &frame[4..];
        // Every cut of the small frames; a sample of the 4 MiB one.
        let step = if body.len() > 65536 { 4093 } else { 1 };
        for cut in (0..body.len()).step_by(step) {
            match decode_body(&body[..cut]) {
                Err(WireError::Truncated { .. }) => {}
                other => panic!("{msg:?} cut at {cut}: {other:?}"),
            }
        }
        // The streaming decoder just waits for the rest.
        let mut d = Decoder::new();
        d.push(&frame[..frame.len() - 1]).unwrap();
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(d.wants(), 1);
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let frame = encode(&Message::Fence {
        volume: vol(),
        generation: Generation(1),
    })
    .unwrap();
    let mut body = frame[4..].to_vec();
    body.push(0);
    assert_eq!(
        decode_body(&body),
        Err(WireError::TrailingBytes { extra: 1 })
    );
}

/// Encodes a Write without the encoder's checks, to hand the decoder what a buggy or
/// hostile peer could send.
fn raw_write(name: &[u8], offset: u64, fua: u8, data_len: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![VERSION, 2, name.len() as u8];
    b.extend_from_slice(name);
    b.extend_from_slice(&1u64.to_be_bytes());
    b.extend_from_slice(&1u64.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.push(fua);
    b.extend_from_slice(&data_len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn malformed_writes_are_refused() {
    let ok = raw_write(b"v", 512, 0, 512, &[0; 512]);
    assert!(decode_body(&ok).is_ok());
    assert_eq!(
        decode_body(&raw_write(b"v", 100, 0, 512, &[0; 512])),
        Err(WireError::Misaligned {
            field: "offset",
            value: 100,
            unit: 512
        })
    );
    assert!(matches!(
        decode_body(&raw_write(b"v", 0, 0, 100, &[0; 100])),
        Err(WireError::Misaligned {
            field: "data length",
            ..
        })
    ));
    assert!(matches!(
        decode_body(&raw_write(b"v", 0, 0, 0, &[])),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode_body(&raw_write(b"v", u64::MAX - 511, 0, 512, &[0; 512])),
        Err(WireError::BadLength { .. })
    ));
    assert_eq!(
        decode_body(&raw_write(b"v", 0, 2, 512, &[0; 512])),
        Err(WireError::BadValue {
            field: "fua",
            value: 2
        })
    );
    // A data length above MAX_DATA is refused before the bytes are looked for.
    assert!(matches!(
        decode_body(&raw_write(b"v", 0, 0, MAX_DATA as u32 + 512, &[])),
        Err(WireError::BadLength { .. })
    ));
    // A data length larger than what follows.
    assert!(matches!(
        decode_body(&raw_write(b"v", 0, 0, 1024, &[0; 512])),
        Err(WireError::Truncated { .. })
    ));
    for name in [
        &b""[..],
        b"-x",
        b".x",
        b"a/b",
        b"a@b",
        &[0xff, 0xfe],
        &[b'a'; 65],
    ] {
        assert_eq!(
            decode_body(&raw_write(name, 0, 0, 512, &[0; 512])),
            Err(WireError::BadVolumeName),
            "{name:?}"
        );
    }
}

#[test]
fn bad_ranges_are_refused_by_the_encoder_too() {
    let g = Generation(1);
    let bad = [
        Message::WriteZeroes {
            volume: vol(),
            generation: g,
            seq: 1,
            offset: 0,
            len: 0,
        },
        Message::Trim {
            volume: vol(),
            generation: g,
            seq: 1,
            offset: 0,
            len: 513,
        },
        Message::Trim {
            volume: vol(),
            generation: g,
            seq: 1,
            offset: u64::MAX - 511,
            len: 1024,
        },
        Message::Digests {
            volume: vol(),
            generation: g,
            request: 1,
            offset: 512,
            blocks: 1,
        },
        Message::Digests {
            volume: vol(),
            generation: g,
            request: 1,
            offset: 0,
            blocks: MAX_DIGEST_BLOCKS + 1,
        },
        Message::Digests {
            volume: vol(),
            generation: g,
            request: 1,
            offset: 0,
            blocks: 0,
        },
        Message::Read {
            volume: vol(),
            generation: g,
            request: 1,
            offset: 0,
            len: MAX_DATA as u32 + 512,
        },
        Message::Read {
            volume: vol(),
            generation: g,
            request: 1,
            offset: 0,
            len: 1000,
        },
        Message::Write {
            volume: vol(),
            generation: g,
            seq: 1,
            offset: 0,
            fua: false,
            data: vec![0; MAX_DATA + 512],
        },
        Message::ReadReply {
            request: 1,
            result: Ok(vec![0; 100]),
        },
        Message::Resize {
            volume: vol(),
            generation: g,
            seq: 1,
            size: 0,
        },
        Message::Resize {
            volume: vol(),
            generation: g,
            seq: 1,
            size: 4096 + 512,
        },
        Message::Snapshot {
            volume: vol(),
            generation: g,
            seq: 1,
            name: VolumeName::new("s1").unwrap(),
            size: Some(0),
        },
        Message::Snapshot {
            volume: vol(),
            generation: g,
            seq: 1,
            name: VolumeName::new("s1").unwrap(),
            size: Some(4096 + 512),
        },
        Message::UnsettledReply {
            request: 1,
            result: Ok(vec![(0, 512), (100, 512)]),
        },
        Message::UnsettledReply {
            request: 1,
            result: Ok(vec![(0, 0)]),
        },
        Message::UnsettledReply {
            request: 1,
            result: Ok(vec![(u64::MAX - 511, 1024)]),
        },
        Message::UnsettledReply {
            request: 1,
            result: Ok(vec![(0, 512); MAX_UNSETTLED_REGIONS as usize + 1]),
        },
    ];
    for msg in bad {
        let mut out = vec![9];
        assert!(encode_into(&msg, &mut out).is_err(), "{msg:?}");
        assert_eq!(out, vec![9], "a refused encode leaves the buffer alone");
    }
}
