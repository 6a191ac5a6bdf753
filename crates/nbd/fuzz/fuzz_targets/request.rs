//! Feeds arbitrary bytes to everything that parses client input: request headers, the
//! request policy under every session shape, and the option payload parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_nbd::proto::{self, Request, Session, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    let _ = proto::parse_go(data);
    let _ = proto::parse_meta(data);
    if data.len() < REQUEST_LEN + 1 {
        return;
    }
    let mut head = [0u8; REQUEST_LEN];
    head.copy_from_slice(&data[..REQUEST_LEN]);
    let shape = data[REQUEST_LEN];
    let mut forced = head;
    forced[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    for raw in [head, forced] {
        let Ok(req) = Request::decode(&raw) else { continue };
        assert_eq!(Request::decode(&req.encode()), Ok(req));
        let session = Session {
            size: u64::from_le_bytes([shape, 0, 0, 0, 0, 0, 1, 0]),
            read_only: shape & 1 != 0,
            structured: shape & 2 != 0,
            allocation_context: shape & 4 != 0,
            max_payload: 32 << 20,
        };
        if let Ok(cmd) = proto::check(&req, &session) {
            // Whatever passes the policy must be inside the export.
            let (off, len) = match cmd {
                proto::Command::Read { offset, len }
                | proto::Command::Write { offset, len, .. }
                | proto::Command::Trim { offset, len, .. }
                | proto::Command::WriteZeroes { offset, len, .. }
                | proto::Command::BlockStatus { offset, len, .. } => (offset, u64::from(len)),
                proto::Command::Flush | proto::Command::Disconnect => (0, 0),
            };
            assert!(off.checked_add(len).is_some_and(|end| end <= session.size));
        }
    }
});
