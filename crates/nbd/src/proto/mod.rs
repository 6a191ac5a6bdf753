//! NBD wire format, defined once for both ends: constants, pure encode/decode of every
//! message, and the server's request policy. No I/O here, so every byte layout is tested
//! on its own (round trip and malformed input) and fuzzed.
//!
//! The server decodes what clients send and encodes its replies; the client
//! ([`crate::client`]) does the opposite with the same functions, so the two cannot drift.
//! Follows the NBD protocol document (fixed newstyle negotiation, simple and structured
//! replies, `base:allocation` metadata context). Extended headers are not offered.
//!
//! - [`handshake`]: the greeting, options and option replies of the negotiation phase;
//! - [`transmission`]: requests, simple replies and structured reply chunks;
//! - [`policy`]: which requests a negotiated session accepts.

use thiserror::Error;

mod handshake;
mod policy;
mod transmission;

pub use handshake::{
    query_matches, ExportEntry, ExportNameReply, GoRequest, Greeting, Info, MetaContext,
    MetaRequest, OptionHeader, OptionReplyHeader, EXPORT_NAME_REPLY_LEN, GREETING_LEN,
    OPTION_HEADER_LEN, OPTION_REPLY_LEN,
};
pub use policy::{check, Command, Session};
pub use transmission::{
    decode_offset_data, done_chunk, offset_data_head, BlockDescriptor, BlockStatus, ChunkHeader,
    ErrorChunk, Request, SimpleReply, CHUNK_HEADER_LEN, MAX_ERROR_MESSAGE, SIMPLE_REPLY_LEN,
};

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, after the NBD magic, and before every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: the server may omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Ask about an export.
pub const OPT_INFO: u32 = 6;
/// Choose an export and start transmission.
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// An export in reply to `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Information about an export.
pub const REP_INFO: u32 = 3;
/// A metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unsupported option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// The server requires TLS first (`NBD_OPT_STARTTLS`).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Info types in `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// The export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Read-only export.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// FLUSH is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// FUA is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// TRIM is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The DF flag is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// A FLUSH on one connection covers writes of all.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// FAST_ZERO is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes without punching holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Don't fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// One extent only in a block status reply.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Fail write-zeroes rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk types.
pub const REPLY_FLAG_DONE: u16 = 1;
/// No payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
/// Reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, query) we accept, as the protocol document recommends.
pub const MAX_STRING: usize = 4096;
/// Longest option payload we read; larger ones are refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// Error numbers carried in replies (Linux values, as the protocol prescribes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// I/O error.
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument.
    Inval = 22,
    /// No space left.
    NoSpc = 28,
    /// Value too large.
    Overflow = 75,
    /// Operation not supported.
    NotSup = 95,
    /// Server shutting down.
    Shutdown = 108,
}

/// Bytes that are not the message they should be. The server hangs up or answers
/// `NBD_REP_ERR_INVALID`; the client reports a protocol violation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// A header that does not start with its magic: the stream is out of sync.
    #[error("bad {what} magic {found:#010x}")]
    BadMagic {
        /// Which message was expected.
        what: &'static str,
        /// The magic found instead.
        found: u64,
    },
    /// Lengths inside a payload do not add up.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which payload.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A string longer than [`MAX_STRING`].
    #[error("string longer than {MAX_STRING} bytes")]
    TooLong,
    /// Text that is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
}

/// Checks a magic number read from the wire.
fn expect_magic(what: &'static str, found: u64, want: u64) -> Result<(), DecodeError> {
    if found == want {
        Ok(())
    } else {
        Err(DecodeError::BadMagic { what, found })
    }
}

/// A cursor over a payload that never reads out of bounds; `what` names the payload in
/// its errors.
struct Cursor<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Cursor<'a> {
        Cursor { rest: data, what }
    }
    fn malformed(&self, why: &'static str) -> DecodeError {
        DecodeError::Malformed {
            what: self.what,
            why,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(self.malformed("length runs past the payload"));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }
    /// A string with a 32-bit length prefix, as names and queries are sent.
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(DecodeError::TooLong);
        }
        utf8(self.take(n)?, "name")
    }
    /// `n` items read by `item`. The count comes from the peer, so it reserves little
    /// up front: a lying count fails when the payload runs out, not in the allocator.
    fn repeat<T>(
        &mut self,
        n: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let mut out = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }
    /// Everything left, as text (strings that end a payload carry no length).
    fn rest_utf8(&mut self, what: &'static str) -> Result<String, DecodeError> {
        utf8(std::mem::take(&mut self.rest), what)
    }
    /// The payload must be used up.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }
}

fn utf8(b: &[u8], what: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8(what))
}

/// Fills a fixed-size header field by field; the sizes are constants, checked by the
/// round-trip tests.
struct Put<const N: usize> {
    buf: [u8; N],
    at: usize,
}

impl<const N: usize> Put<N> {
    fn new() -> Self {
        Put {
            buf: [0u8; N],
            at: 0,
        }
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
        self
    }
    fn u16(self, v: u16) -> Self {
        self.bytes(&v.to_be_bytes())
    }
    fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_be_bytes())
    }
    fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_be_bytes())
    }
    fn done(self) -> [u8; N] {
        debug_assert_eq!(self.at, N, "header not filled");
        self.buf
    }
}

/// Appends a string with its 32-bit length prefix.
fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_stops_at_the_end_and_names_the_payload() {
        let mut c = Cursor::new(&[0, 1, 2], "test payload");
        assert_eq!(c.u16(), Ok(1));
        assert_eq!(
            c.u32(),
            Err(DecodeError::Malformed {
                what: "test payload",
                why: "length runs past the payload"
            })
        );
        assert!(c.finish().is_err());
        assert_eq!(
            c.rest_utf8("x").unwrap(),
            "\u{2}",
            "a failed read consumes nothing"
        );
        assert!(c.finish().is_ok());
    }

    #[test]
    fn strings_are_bounded_and_utf8() {
        let mut long = Vec::new();
        put_string(&mut long, &"x".repeat(MAX_STRING + 1));
        assert_eq!(Cursor::new(&long, "p").string(), Err(DecodeError::TooLong));
        let bad = [0, 0, 0, 1, 0xff];
        assert_eq!(
            Cursor::new(&bad, "p").string(),
            Err(DecodeError::NotUtf8("name"))
        );
        let mut ok = Vec::new();
        put_string(&mut ok, "vol");
        assert_eq!(Cursor::new(&ok, "p").string().unwrap(), "vol");
    }

    #[test]
    fn messages_name_what_was_wrong() {
        let e = DecodeError::BadMagic {
            what: "request",
            found: 0xdede_dede,
        };
        assert_eq!(e.to_string(), "bad request magic 0xdededede");
        let e = DecodeError::Malformed {
            what: "option payload",
            why: "trailing bytes",
        };
        assert_eq!(e.to_string(), "malformed option payload: trailing bytes");
        assert_eq!(
            DecodeError::NotUtf8("name").to_string(),
            "name is not valid UTF-8"
        );
    }
}
