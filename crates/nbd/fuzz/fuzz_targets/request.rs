//! Feeds arbitrary bytes to every decoder of the codec: what the server parses from
//! clients (request headers, the request policy under every session shape, option
//! payloads) and what the client parses from servers (option replies, reply chunks).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_nbd::proto::{self, Request, Session, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    let _ = proto::GoRequest::decode(data);
    let _ = proto::MetaRequest::decode(data);
    let _ = proto::Info::decode(data);
    let _ = proto::ExportEntry::decode(data);
    let _ = proto::MetaContext::decode(data);
    let _ = proto::ErrorChunk::decode(data);
    let _ = proto::BlockStatus::decode(data);
    let _ = proto::decode_offset_data(data);
    if data.len() < REQUEST_LEN + 1 {
        return;
    }
    // Fixed-size headers, from the start of the input.
    if let Ok(h) = data[..proto::GREETING_LEN].try_into() {
        let _ = proto::Greeting::decode(h);
    }
    if let Ok(h) = data[..proto::OPTION_HEADER_LEN].try_into() {
        let _ = proto::OptionHeader::decode(h);
    }
    if let Ok(h) = data[..proto::OPTION_REPLY_LEN].try_into() {
        let _ = proto::OptionReplyHeader::decode(h);
    }
    if let Ok(h) = data[..proto::SIMPLE_REPLY_LEN].try_into() {
        let _ = proto::SimpleReply::decode(h);
    }
    if let Ok(h) = data[..proto::CHUNK_HEADER_LEN].try_into() {
        let _ = proto::ChunkHeader::decode(h);
    }
    let mut head = [0u8; REQUEST_LEN];
    head.copy_from_slice(&data[..REQUEST_LEN]);
    let shape = data[REQUEST_LEN];
    let mut forced = head;
    forced[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    for raw in [head, forced] {
        let Ok(req) = Request::decode(&raw) else {
            continue;
        };
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
