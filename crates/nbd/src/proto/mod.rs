//! NBD wire format: constants and pure encode/decode of handshake options, requests and
//! replies. No I/O here, so every byte layout is tested on its own and fuzzed.
//!
//! Follows the NBD protocol document (fixed newstyle negotiation, simple and structured
//! replies, `base:allocation` metadata context). Extended headers are not offered.

use thiserror::Error;

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
/// Unsupported option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
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

/// A header that cannot be a request: the stream is out of sync and must be closed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl Request {
    /// Decodes a request header.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(arr8(&b[8..16])),
            offset: u64::from_be_bytes(arr8(&b[16..24])),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encodes a request header (used by the client).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
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

fn arr8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    a
}

/// What the connection negotiated, as far as request checking needs to know.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    /// Export size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub allocation_context: bool,
    /// Largest READ/WRITE payload accepted.
    pub max_payload: u32,
}

/// A request that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write the payload at `offset`.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Discard a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Store zeroes as data instead of holes.
        no_hole: bool,
        /// Durable before the reply.
        fua: bool,
    },
    /// Report allocation.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Only one extent.
        req_one: bool,
    },
    /// Disconnect.
    Disconnect,
}

/// Checks a request against the session: the policy half of command handling.
pub fn check(req: &Request, s: &Session) -> Result<Command, Errno> {
    let flags = req.flags;
    let allowed = |extra: u16| -> Result<(), Errno> {
        // FUA is valid on every command once advertised.
        if flags & !(CMD_FLAG_FUA | extra) != 0 {
            Err(Errno::Inval)
        } else {
            Ok(())
        }
    };
    let fua = flags & CMD_FLAG_FUA != 0;
    let end = req.offset.checked_add(u64::from(req.length));
    let in_range = end.is_some_and(|e| e <= s.size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.read_only {
        // Still check flags first? The export's nature wins: nothing writes here.
        return Err(Errno::Perm);
    }
    match req.kind {
        CMD_READ => {
            allowed(if s.structured { CMD_FLAG_DF } else { 0 })?;
            if req.length == 0 || req.length > s.max_payload {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(Errno::Inval);
            }
            Ok(Command::Read {
                offset: req.offset,
                len: req.length,
            })
        }
        CMD_WRITE => {
            allowed(0)?;
            if req.length == 0 || req.length > s.max_payload {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(Errno::NoSpc);
            }
            Ok(Command::Write {
                offset: req.offset,
                len: req.length,
                fua,
            })
        }
        CMD_FLUSH => {
            allowed(0)?;
            if req.offset != 0 || req.length != 0 {
                return Err(Errno::Inval);
            }
            Ok(Command::Flush)
        }
        CMD_TRIM => {
            allowed(0)?;
            if req.length == 0 || !in_range {
                return Err(Errno::Inval);
            }
            Ok(Command::Trim {
                offset: req.offset,
                len: req.length,
                fua,
            })
        }
        CMD_WRITE_ZEROES => {
            allowed(CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
            if req.length == 0 {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(Errno::NoSpc);
            }
            // Zeroes stored as data are no faster than a write: FAST_ZERO asks us to say so.
            if flags & CMD_FLAG_FAST_ZERO != 0 && flags & CMD_FLAG_NO_HOLE != 0 {
                return Err(Errno::NotSup);
            }
            Ok(Command::WriteZeroes {
                offset: req.offset,
                len: req.length,
                no_hole: flags & CMD_FLAG_NO_HOLE != 0,
                fua,
            })
        }
        CMD_BLOCK_STATUS => {
            allowed(CMD_FLAG_REQ_ONE)?;
            if !s.structured || !s.allocation_context || req.length == 0 || !in_range {
                return Err(Errno::Inval);
            }
            Ok(Command::BlockStatus {
                offset: req.offset,
                len: req.length,
                req_one: flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        CMD_DISC => Ok(Command::Disconnect),
        _ => Err(Errno::Inval),
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A complete structured error chunk (with the DONE flag) carrying a message.
pub fn structured_error(cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut out = Vec::with_capacity(20 + 6 + msg.len());
    out.extend_from_slice(&chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Encodes an option reply header.
pub fn option_reply(option: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A malformed option payload.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptionError {
    /// Lengths inside the payload do not add up.
    #[error("malformed option payload: {0}")]
    Malformed(&'static str),
    /// A string longer than [`MAX_STRING`].
    #[error("string longer than {MAX_STRING} bytes")]
    TooLong,
    /// A name that is not UTF-8.
    #[error("name is not valid UTF-8")]
    NotUtf8,
}

/// A little cursor over an option payload that never reads out of bounds.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.0.len() < n {
            return Err(OptionError::Malformed("length runs past the payload"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn string(&mut self) -> Result<String, OptionError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(OptionError::TooLong);
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| OptionError::NotUtf8)
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name.
    pub name: String,
    /// Info types the client asked for.
    pub info: Vec<u16>,
}

/// Decodes an `NBD_OPT_INFO`/`NBD_OPT_GO` payload.
pub fn parse_go(data: &[u8]) -> Result<GoRequest, OptionError> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()? as usize;
    let mut info = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        info.push(c.u16()?);
    }
    if !c.0.is_empty() {
        return Err(OptionError::Malformed("trailing bytes"));
    }
    Ok(GoRequest { name, info })
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Query strings.
    pub queries: Vec<String>,
}

/// Decodes a metadata context option payload.
pub fn parse_meta(data: &[u8]) -> Result<MetaRequest, OptionError> {
    let mut c = Cursor(data);
    let export = c.string()?;
    let n = c.u32()? as usize;
    let mut queries = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        queries.push(c.string()?);
    }
    if !c.0.is_empty() {
        return Err(OptionError::Malformed("trailing bytes"));
    }
    Ok(MetaRequest { export, queries })
}

/// Which of our contexts a query selects: `base:allocation` by its name, and for LIST
/// also by the namespace `base:`.
pub fn query_matches(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            size: 1 << 20,
            read_only: false,
            structured: true,
            allocation_context: true,
            max_payload: 32 << 20,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trip() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 1 << 33, 4096);
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        let mut raw = r.encode();
        raw[0] ^= 1;
        assert!(Request::decode(&raw).is_err());
    }

    #[test]
    fn range_errors_follow_the_issue() {
        let s = session();
        assert_eq!(
            check(&req(CMD_READ, 0, (1 << 20) - 1, 2), &s),
            Err(Errno::Inval)
        );
        assert_eq!(check(&req(CMD_TRIM, 0, 1 << 20, 1), &s), Err(Errno::Inval));
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &s),
            Err(Errno::Inval)
        );
        assert_eq!(check(&req(CMD_WRITE, 0, 1 << 20, 1), &s), Err(Errno::NoSpc));
        assert_eq!(
            check(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &s),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            check(&req(CMD_READ, 0, u64::MAX, 4096), &s),
            Err(Errno::Inval)
        );
        assert_eq!(
            check(&req(CMD_WRITE, 0, u64::MAX - 1, 4096), &s),
            Err(Errno::NoSpc)
        );
    }

    #[test]
    fn flags_and_commands_are_checked() {
        let s = session();
        assert_eq!(check(&req(CMD_READ, 1 << 9, 0, 512), &s), Err(Errno::Inval));
        assert_eq!(
            check(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), &s),
            Err(Errno::Inval)
        );
        assert_eq!(check(&req(99, 0, 0, 512), &s), Err(Errno::Inval));
        assert_eq!(
            check(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &s),
            Ok(Command::Flush)
        );
        assert_eq!(
            check(&req(CMD_READ, 0, 0, (32 << 20) + 1), &s),
            Err(Errno::Inval)
        );
        let ro = Session {
            read_only: true,
            ..s
        };
        assert_eq!(check(&req(CMD_WRITE, 0, 0, 512), &ro), Err(Errno::Perm));
        let plain = Session {
            structured: false,
            ..s
        };
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, 0, 0, 512), &plain),
            Err(Errno::Inval)
        );
        assert_eq!(
            check(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &plain),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn option_payloads_are_bounded() {
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"vol");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_go(&go).unwrap(),
            GoRequest {
                name: "vol".into(),
                info: vec![INFO_BLOCK_SIZE]
            }
        );
        assert!(parse_go(&go[..go.len() - 1]).is_err());
        let mut lying = go.clone();
        lying[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_go(&lying).is_err());
        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&u32::MAX.to_be_bytes()); // claims 4 billion queries
        assert!(parse_meta(&meta).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_go(&data);
            let _ = parse_meta(&data);
            if data.len() >= REQUEST_LEN {
                let mut h = [0u8; REQUEST_LEN];
                h.copy_from_slice(&data[..REQUEST_LEN]);
                if let Ok(r) = Request::decode(&h) {
                    let _ = check(&r, &session());
                }
            }
        }
    }
}
