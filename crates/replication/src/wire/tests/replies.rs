//! Decoding of replies and the stream after an error: bounds, malformed replies, poisoning.

use super::*;

#[test]
fn an_unsettled_reply_claiming_too_many_regions_is_refused_before_reading_them() {
    let mut body = vec![VERSION, 14];
    body.extend_from_slice(&1u64.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&(MAX_UNSETTLED_REGIONS + 1).to_be_bytes());
    assert!(matches!(
        decode_body(&body),
        Err(WireError::BadLength {
            field: "region count",
            ..
        })
    ));
    // A count the body does not hold: truncated, not a huge allocation.
    let mut short = vec![VERSION, 14];
    short.extend_from_slice(&1u64.to_be_bytes());
    short.push(0);
    short.extend_from_slice(&3u32.to_be_bytes());
    short.extend_from_slice(&[0; 16]);
    assert!(matches!(
        decode_body(&short),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn a_snapshot_list_reply_with_too_many_or_bad_names_is_refused() {
    let too_many = Message::SnapshotListReply {
        request: 1,
        result: Ok(vec![vol(); MAX_SNAPSHOT_NAMES as usize + 1]),
    };
    assert!(encode(&too_many).is_err());
    let mut body = vec![VERSION, 16];
    body.extend_from_slice(&1u64.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&(MAX_SNAPSHOT_NAMES + 1).to_be_bytes());
    assert!(matches!(
        decode_body(&body),
        Err(WireError::BadLength {
            field: "snapshot count",
            ..
        })
    ));
    // A count the body cannot hold: truncated before anything is allocated for it.
    let mut short = vec![VERSION, 16];
    short.extend_from_slice(&1u64.to_be_bytes());
    short.push(0);
    short.extend_from_slice(&MAX_SNAPSHOT_NAMES.to_be_bytes());
    short.extend_from_slice(&[1, b'a']);
    assert!(matches!(
        decode_body(&short),
        Err(WireError::Truncated { .. })
    ));
    // A name that breaks the naming rule.
    let mut bad = vec![VERSION, 16];
    bad.extend_from_slice(&1u64.to_be_bytes());
    bad.push(0);
    bad.extend_from_slice(&1u32.to_be_bytes());
    bad.extend_from_slice(&[2, b'.', b'a']);
    assert_eq!(decode_body(&bad), Err(WireError::BadVolumeName));
}

#[test]
fn malformed_replies_are_refused() {
    // status byte 2
    let mut body = vec![VERSION, 10];
    body.extend_from_slice(&1u64.to_be_bytes());
    body.push(2);
    assert!(matches!(
        decode_body(&body),
        Err(WireError::BadValue {
            field: "status",
            ..
        })
    ));
    // unknown error code
    body.pop();
    body.extend_from_slice(&[1, 99]);
    assert!(matches!(
        decode_body(&body),
        Err(WireError::BadValue {
            field: "error code",
            ..
        })
    ));
    // I/O error text that is not UTF-8, and one longer than allowed
    body.truncate(body.len() - 1);
    let mut not_utf8 = body.clone();
    not_utf8.extend_from_slice(&[5, 0, 2, 0xff, 0xff]);
    assert!(matches!(
        decode_body(&not_utf8),
        Err(WireError::BadValue { .. })
    ));
    let mut too_long = body.clone();
    too_long.push(5);
    too_long.extend_from_slice(&((MAX_ERROR_TEXT + 1) as u16).to_be_bytes());
    too_long.extend_from_slice(&vec![b'a'; MAX_ERROR_TEXT + 1]);
    assert!(matches!(
        decode_body(&too_long),
        Err(WireError::BadLength { .. })
    ));
    // a digest count above the cap, with nothing behind it
    let mut digests = vec![VERSION, 7];
    digests.extend_from_slice(&1u64.to_be_bytes());
    digests.push(0);
    digests.extend_from_slice(&(MAX_DIGEST_BLOCKS + 1).to_be_bytes());
    assert!(matches!(
        decode_body(&digests),
        Err(WireError::BadLength { .. })
    ));
}

#[test]
fn long_io_error_text_is_cut_at_a_character_boundary() {
    let text = "é".repeat(MAX_ERROR_TEXT);
    let frame = encode(&Message::Reply {
        seq: 1,
        result: Err(ReplyError::Io(text)),
    })
    .unwrap();
    match decode_body(&frame[4..]).unwrap() {
        Message::Reply {
            result: Err(ReplyError::Io(t)),
            ..
        } => {
            assert!(t.len() <= MAX_ERROR_TEXT);
            assert!(t.chars().all(|c| c == 'é'));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_decoder_error_poisons_the_stream() {
    let mut d = Decoder::new();
    let mut frame = encode(&Message::Reply {
        seq: 1,
        result: Ok(()),
    })
    .unwrap();
    frame[5] = 200;
    d.push(&frame).unwrap();
    assert_eq!(d.next_message(), Err(WireError::UnknownKind(200)));
    let good = encode(&Message::Reply {
        seq: 2,
        result: Ok(()),
    })
    .unwrap();
    assert_eq!(d.push(&good), Err(WireError::Poisoned));
    assert_eq!(d.next_message(), Err(WireError::Poisoned));
}
