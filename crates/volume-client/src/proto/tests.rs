use super::*;

fn req(kind: Kind, fua: bool, offset: u64, length: u64) -> Request {
    Request {
        kind,
        fua,
        forwarded: false,
        offset,
        length,
    }
}

#[test]
fn every_request_kind_round_trips() {
    for r in [
        req(Kind::Open, false, 0, 7),
        req(Kind::Read, false, 4096, MAX_DATA),
        req(Kind::Write, true, u64::MAX - 1, 1),
        req(Kind::Flush, false, 0, 0),
        req(Kind::Trim, true, 1 << 40, 1 << 41),
        req(Kind::BlockStatus, false, 0, u64::MAX),
        req(Kind::Digest, false, 8192, MAX_DATA),
        Request {
            forwarded: true,
            ..req(Kind::Open, false, 0, 7)
        },
    ] {
        assert_eq!(decode_request(&encode_request(&r)), Ok(r));
    }
}

#[test]
fn malformed_request_headers_are_refused_with_their_code() {
    let good = encode_request(&req(Kind::Write, false, 0, 512));
    let mut magic = good;
    magic[0] ^= 0xff;
    assert!(matches!(decode_request(&magic), Err(BadFrame::Magic(_))));
    let mut version = good;
    version[5] = 2;
    let e = decode_request(&version).unwrap_err();
    assert_eq!(
        (e.clone(), e.code()),
        (BadFrame::Version(2), ErrorCode::NotSupported)
    );
    let mut kind = good;
    kind[6] = 99;
    assert_eq!(
        decode_request(&kind).unwrap_err().code(),
        ErrorCode::NotSupported
    );
    let mut flags = good;
    flags[7] = 0x80;
    assert_eq!(
        decode_request(&flags).unwrap_err().code(),
        ErrorCode::Invalid
    );
    let fua_read = encode_request(&req(Kind::Read, true, 0, 512));
    assert!(matches!(
        decode_request(&fua_read),
        Err(BadFrame::Flags { .. })
    ));
    // Only an Open says it was forwarded.
    for kind in [Kind::Read, Kind::Write, Kind::Flush, Kind::Digest] {
        let mut forwarded = encode_request(&req(kind, false, 0, 512));
        forwarded[7] = FLAG_FORWARDED;
        assert!(
            matches!(decode_request(&forwarded), Err(BadFrame::Flags { .. })),
            "{kind:?}"
        );
    }
    for (kind, over) in [
        (Kind::Write, MAX_DATA + 1),
        (Kind::Read, MAX_DATA + 1),
        (Kind::Open, MAX_NAME + 1),
        (Kind::Digest, MAX_DATA + 1),
    ] {
        let e = decode_request(&encode_request(&req(kind, false, 0, over))).unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooLarge, "{kind:?}");
    }
}

#[test]
fn replies_round_trip_and_unknown_codes_read_as_io() {
    for code in [None, Some(ErrorCode::NotFound), Some(ErrorCode::TooLarge)] {
        assert_eq!(decode_reply(&encode_reply(code, 42)), Ok((code, 42)));
    }
    let mut odd = encode_reply(None, 0);
    odd[4..8].copy_from_slice(&1234u32.to_be_bytes());
    assert_eq!(decode_reply(&odd), Ok((Some(ErrorCode::Io), 0)));
    let mut magic = encode_reply(None, 0);
    magic[3] = 0;
    assert!(decode_reply(&magic).is_err());
}

#[test]
fn open_replies_and_extents_round_trip_and_refuse_bad_payloads() {
    assert_eq!(
        decode_open_reply(&encode_open_reply(1 << 30, true)),
        Some((1 << 30, true))
    );
    assert_eq!(decode_open_reply(&[0; 11]), None);
    let ex = vec![
        Extent {
            length: 4096,
            flags: 0,
        },
        Extent {
            length: 1 << 20,
            flags: EXTENT_HOLE | EXTENT_ZERO,
        },
    ];
    let b = encode_extents(&ex);
    assert_eq!(decode_extents(&b), Some(ex));
    assert_eq!(decode_extents(&b[..13]), None, "not whole extents");
    assert_eq!(decode_extents(&[0; EXTENT_LEN]), None, "an empty run");
    let too_many = encode_extents(&vec![
        Extent {
            length: 1,
            flags: 0
        };
        MAX_EXTENTS + 1
    ]);
    assert_eq!(decode_extents(&too_many), None);
}
