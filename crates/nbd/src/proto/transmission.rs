//! Transmission-phase messages: request headers (client to server), simple replies and
//! structured reply chunks (server to client).

use super::{
    expect_magic, Cursor, DecodeError, Put, CMD_WRITE, REPLY_FLAG_DONE, REQUEST_LEN, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Longest message put in an error chunk; the errno is what counts, the rest is cut.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// A request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Decodes a request header. A bad magic means the stream is out of sync and must be
    /// closed.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, DecodeError> {
        let mut c = Cursor::new(b, "request");
        expect_magic("request", c.u32()?.into(), REQUEST_MAGIC.into())?;
        Ok(Request {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u32()?,
        })
    }

    /// Encodes a request header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        Put::new()
            .u32(REQUEST_MAGIC)
            .u16(self.flags)
            .u16(self.kind)
            .u64(self.cookie)
            .u64(self.offset)
            .u32(self.length)
            .done()
    }

    /// Bytes of payload that follow this header on the wire, whatever we think of it:
    /// they must be consumed to stay in sync even when the request is refused.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A simple reply header; read data follows it on success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// The request's cookie.
    pub cookie: u64,
    /// 0, or the errno of a failed request.
    pub error: u32,
}

impl SimpleReply {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        Put::new()
            .u32(SIMPLE_REPLY_MAGIC)
            .u32(self.error)
            .u64(self.cookie)
            .done()
    }

    /// Decodes the header.
    pub fn decode(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, DecodeError> {
        let mut c = Cursor::new(b, "simple reply");
        expect_magic("simple reply", c.u32()?.into(), SIMPLE_REPLY_MAGIC.into())?;
        Ok(SimpleReply {
            error: c.u32()?,
            cookie: c.u64()?,
        })
    }
}

/// The header of a structured reply chunk; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        Put::new()
            .u32(STRUCTURED_REPLY_MAGIC)
            .u16(self.flags)
            .u16(self.kind)
            .u64(self.cookie)
            .u32(self.length)
            .done()
    }

    /// Decodes the header.
    pub fn decode(b: &[u8; CHUNK_HEADER_LEN]) -> Result<ChunkHeader, DecodeError> {
        let mut c = Cursor::new(b, "reply chunk");
        expect_magic(
            "reply chunk",
            c.u32()?.into(),
            STRUCTURED_REPLY_MAGIC.into(),
        )?;
        Ok(ChunkHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            length: c.u32()?,
        })
    }

    /// Whether this is the request's last chunk.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// A complete last chunk of a reply: header with `NBD_REPLY_FLAG_DONE`, then `payload`.
pub fn done_chunk(cookie: u64, kind: u16, payload: &[u8]) -> Vec<u8> {
    let head = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind,
        cookie,
        length: payload.len() as u32,
    };
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&head.encode());
    out.extend_from_slice(payload);
    out
}

/// Header and offset of a last `NBD_REPLY_TYPE_OFFSET_DATA` chunk; the `data_len` bytes
/// of data follow (written apart, so a read's buffer is never copied).
pub fn offset_data_head(cookie: u64, offset: u64, data_len: u32) -> [u8; CHUNK_HEADER_LEN + 8] {
    let head = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: super::REPLY_TYPE_OFFSET_DATA,
        cookie,
        length: data_len.saturating_add(8),
    };
    Put::new().bytes(&head.encode()).u64(offset).done()
}

/// Splits an `NBD_REPLY_TYPE_OFFSET_DATA` payload into its offset and data.
pub fn decode_offset_data(payload: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    let mut c = Cursor::new(payload, "offset data chunk");
    let offset = c.u64()?;
    Ok((offset, c.rest))
}

/// Payload of an `NBD_REPLY_TYPE_ERROR` chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorChunk {
    /// The errno.
    pub errno: u32,
    /// Why, for a human; cut to [`MAX_ERROR_MESSAGE`] bytes when encoded.
    pub message: String,
}

impl ErrorChunk {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut cut = self.message.len().min(MAX_ERROR_MESSAGE);
        // Cut on a character boundary so the message stays UTF-8.
        while !self.message.is_char_boundary(cut) {
            cut -= 1;
        }
        let msg = &self.message.as_bytes()[..cut];
        let mut out = Vec::with_capacity(6 + msg.len());
        out.extend_from_slice(&self.errno.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
        out
    }

    /// Decodes the payload. The message is for humans: bytes that are not UTF-8 are
    /// replaced rather than failing the reply.
    pub fn decode(payload: &[u8]) -> Result<ErrorChunk, DecodeError> {
        let mut c = Cursor::new(payload, "error chunk");
        let errno = c.u32()?;
        let len = c.u16()?;
        let message = String::from_utf8_lossy(c.take(usize::from(len))?).into_owned();
        c.finish()?;
        Ok(ErrorChunk { errno, message })
    }
}

/// One run of a metadata context in a block status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Length in bytes.
    pub length: u32,
    /// Context flags (`STATE_HOLE`, `STATE_ZERO` for `base:allocation`).
    pub flags: u32,
}

/// Payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// The metadata context id the server gave in `NBD_REP_META_CONTEXT`.
    pub context: u32,
    /// Runs from the requested offset.
    pub extents: Vec<BlockDescriptor>,
}

impl BlockStatus {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.extents.len() * 8);
        out.extend_from_slice(&self.context.to_be_bytes());
        for e in &self.extents {
            out.extend_from_slice(&e.length.to_be_bytes());
            out.extend_from_slice(&e.flags.to_be_bytes());
        }
        out
    }

    /// Decodes the payload; it must hold at least one run.
    pub fn decode(payload: &[u8]) -> Result<BlockStatus, DecodeError> {
        let mut c = Cursor::new(payload, "block status chunk");
        let context = c.u32()?;
        let mut extents = Vec::with_capacity(c.rest.len() / 8);
        while !c.rest.is_empty() {
            extents.push(BlockDescriptor {
                length: c.u32()?,
                flags: c.u32()?,
            });
        }
        if extents.is_empty() {
            return Err(c.malformed("no extents"));
        }
        Ok(BlockStatus { context, extents })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CMD_FLAG_FUA, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_OFFSET_DATA};
    use proptest::prelude::*;

    fn bad_magic(found: u64, what: &'static str) -> DecodeError {
        DecodeError::BadMagic { what, found }
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 1 << 33,
            length: 4096,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut raw = r.encode();
        raw[0] ^= 1;
        assert_eq!(
            Request::decode(&raw),
            Err(bad_magic(u64::from(REQUEST_MAGIC ^ (1 << 24)), "request"))
        );
    }

    #[test]
    fn reply_headers_refuse_each_others_magic() {
        let simple = SimpleReply {
            cookie: 9,
            error: 22,
        };
        let chunk = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_BLOCK_STATUS,
            cookie: 9,
            length: 12,
        };
        let mut as_simple = [0u8; SIMPLE_REPLY_LEN];
        as_simple.copy_from_slice(&chunk.encode()[..SIMPLE_REPLY_LEN]);
        assert_eq!(
            SimpleReply::decode(&as_simple),
            Err(bad_magic(STRUCTURED_REPLY_MAGIC.into(), "simple reply"))
        );
        let mut as_chunk = [0u8; CHUNK_HEADER_LEN];
        as_chunk[..SIMPLE_REPLY_LEN].copy_from_slice(&simple.encode());
        assert_eq!(
            ChunkHeader::decode(&as_chunk),
            Err(bad_magic(SIMPLE_REPLY_MAGIC.into(), "reply chunk"))
        );
    }

    #[test]
    fn offset_data_round_trip_and_truncation() {
        let head = offset_data_head(5, 1 << 40, 3);
        let mut h = [0u8; CHUNK_HEADER_LEN];
        h.copy_from_slice(&head[..CHUNK_HEADER_LEN]);
        let h = ChunkHeader::decode(&h).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_DATA,
                cookie: 5,
                length: 11,
            }
        );
        assert!(h.is_done());
        let mut payload = head[CHUNK_HEADER_LEN..].to_vec();
        payload.extend_from_slice(b"abc");
        assert_eq!(decode_offset_data(&payload), Ok((1 << 40, &b"abc"[..])));
        assert!(decode_offset_data(&payload[..7]).is_err());
    }

    #[test]
    fn error_chunk_is_cut_on_a_character_boundary() {
        // "é" takes two bytes, so the limit falls in the middle of one.
        let e = ErrorChunk {
            errno: 5,
            message: format!("a{}", "é".repeat(MAX_ERROR_MESSAGE)),
        };
        let decoded = ErrorChunk::decode(&e.encode()).unwrap();
        assert_eq!(decoded.errno, 5);
        assert_eq!(
            decoded.message,
            format!("a{}", "é".repeat(MAX_ERROR_MESSAGE / 2 - 1))
        );
    }

    #[test]
    fn malformed_chunk_payloads_are_refused() {
        let e = ErrorChunk {
            errno: 28,
            message: "full".into(),
        }
        .encode();
        assert!(
            ErrorChunk::decode(&e[..e.len() - 1]).is_err(),
            "short message"
        );
        let mut long = e.clone();
        long.push(0);
        assert!(ErrorChunk::decode(&long).is_err(), "trailing bytes");
        assert!(ErrorChunk::decode(&e[..5]).is_err(), "no length");
        assert!(BlockStatus::decode(&1u32.to_be_bytes()).is_err(), "no runs");
        assert!(
            BlockStatus::decode(&[0, 0, 0, 1, 0, 0, 0, 1]).is_err(),
            "half a run"
        );
        assert!(BlockStatus::decode(&[]).is_err());
    }

    #[test]
    fn done_chunk_carries_its_payload() {
        let status = BlockStatus {
            context: 1,
            extents: vec![BlockDescriptor {
                length: 4096,
                flags: 3,
            }],
        };
        let raw = done_chunk(77, REPLY_TYPE_BLOCK_STATUS, &status.encode());
        let mut h = [0u8; CHUNK_HEADER_LEN];
        h.copy_from_slice(&raw[..CHUNK_HEADER_LEN]);
        let h = ChunkHeader::decode(&h).unwrap();
        assert_eq!(h.length as usize, raw.len() - CHUNK_HEADER_LEN);
        assert_eq!(h.kind, REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(
            BlockStatus::decode(&raw[CHUNK_HEADER_LEN..]).unwrap(),
            status
        );
    }

    proptest! {
        #[test]
        fn headers_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32, error: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
            let s = SimpleReply { cookie, error };
            prop_assert_eq!(SimpleReply::decode(&s.encode()), Ok(s));
            let c = ChunkHeader { flags, kind, cookie, length };
            prop_assert_eq!(ChunkHeader::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn payloads_round_trip(
            errno: u32,
            message in "\\PC{0,250}",
            context: u32,
            runs in proptest::collection::vec((any::<u32>(), any::<u32>()), 1..50),
        ) {
            let e = ErrorChunk { errno, message };
            prop_assert_eq!(ErrorChunk::decode(&e.encode()), Ok(e));
            let extents = runs.into_iter().map(|(length, flags)| BlockDescriptor { length, flags }).collect();
            let b = BlockStatus { context, extents };
            prop_assert_eq!(BlockStatus::decode(&b.encode()), Ok(b));
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ErrorChunk::decode(&data);
            let _ = BlockStatus::decode(&data);
            let _ = decode_offset_data(&data);
            if data.len() >= REQUEST_LEN {
                let mut h = [0u8; REQUEST_LEN];
                h.copy_from_slice(&data[..REQUEST_LEN]);
                let _ = Request::decode(&h);
                let mut s = [0u8; SIMPLE_REPLY_LEN];
                s.copy_from_slice(&data[..SIMPLE_REPLY_LEN]);
                let _ = SimpleReply::decode(&s);
                let mut c = [0u8; CHUNK_HEADER_LEN];
                c.copy_from_slice(&data[..CHUNK_HEADER_LEN]);
                let _ = ChunkHeader::decode(&c);
            }
        }
    }
}
