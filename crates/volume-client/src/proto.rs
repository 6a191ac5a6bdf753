//! The wire format of the QUIC volume export, version 1, free of I/O: both the store's
//! server and [`crate::client`] encode and decode with these functions.
//!
//! Every request is a 24-byte header, big-endian:
//! `magic u32 | version u16 | kind u8 | flags u8 | offset u64 | length u64`,
//! followed by `length` bytes for `Open` (the volume's name) and `Write` (the data).
//! Every reply is a 16-byte header `magic u32 | code u32 | length u64` followed by
//! `length` bytes: the data of a `Read`, the extents of a `BlockStatus`, the size and
//! flags of an `Open`, the 32-byte blake3 hash of a `Digest`, or an error's message when
//! `code` is not 0.

use thiserror::Error;

/// The ALPN name of the export (version 1). The replication endpoint's is different, so
/// neither side can mistake one protocol for the other.
pub const ALPN: &[u8] = b"tessera-export/1";
/// The protocol version every request carries.
pub const VERSION: u16 = 1;
/// First bytes of every request ("TXQ1").
pub const REQUEST_MAGIC: u32 = 0x5458_5131;
/// First bytes of every reply ("TXR1").
pub const REPLY_MAGIC: u32 = 0x5458_5231;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 24;
/// Bytes of a reply header.
pub const REPLY_LEN: usize = 16;
/// Largest `Read` or `Write` payload. With [`MAX_IN_FLIGHT`] it bounds what one
/// connection can make the server hold: 64 MiB, like the NBD server's default.
pub const MAX_DATA: u64 = 4 << 20;
/// Requests (streams) one connection may have open at once; QUIC's stream limit enforces
/// it, so a client simply waits for a stream.
pub const MAX_IN_FLIGHT: u32 = 16;
/// Longest volume name in an `Open`.
pub const MAX_NAME: u64 = 255;
/// Most extents in one `BlockStatus` reply (it may cover less than asked, never nothing).
pub const MAX_EXTENTS: usize = 16_384;
/// Longest error message in a reply.
pub const MAX_MESSAGE: u64 = 4096;
/// Bytes of an `Open` reply: size u64, flags u32.
pub const OPEN_REPLY_LEN: u64 = 12;
/// Bytes of one extent in a `BlockStatus` reply: length u64, flags u32.
pub const EXTENT_LEN: usize = 12;
/// Bytes of a `Digest` reply: one blake3 hash.
pub const DIGEST_LEN: u64 = 32;

/// Request flag: the write (or trim) is durable before the reply.
pub const FLAG_FUA: u8 = 1;
/// `Open` flag: the client is a store forwarding its own client (it holds no copy of the
/// volume): the server serves the volume from a copy it holds, never forwards it again.
pub const FLAG_FORWARDED: u8 = 2;
/// `Open` reply flag: the export refuses writes (a snapshot).
pub const OPEN_READ_ONLY: u32 = 1;
/// Extent flag: the range is a hole (not allocated).
pub const EXTENT_HOLE: u32 = 1;
/// Extent flag: the range reads as zeros.
pub const EXTENT_ZERO: u32 = 2;

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Opens the volume named by the payload; must be the connection's first request.
    Open = 1,
    /// Reads `length` bytes at `offset`.
    Read = 2,
    /// Writes the payload at `offset` (FUA allowed).
    Write = 3,
    /// Makes every completed write durable.
    Flush = 4,
    /// Discards a range; it reads as zeros afterwards (FUA allowed).
    Trim = 5,
    /// Allocation of a range, as extents from `offset`.
    BlockStatus = 6,
    /// The blake3 hash of the range's bytes (at most [`MAX_DATA`]), so a client can
    /// find what differs without reading it (`tessera volume cp --resume`).
    Digest = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Open,
            2 => Kind::Read,
            3 => Kind::Write,
            4 => Kind::Flush,
            5 => Kind::Trim,
            6 => Kind::BlockStatus,
            7 => Kind::Digest,
            _ => return None,
        })
    }
}

/// A reply's status; the numbers are the Linux errno values NBD uses too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Not permitted: a read-only export, or a volume whose writes belong elsewhere (a
    /// replica's copy, a volume a running VM uses on another node).
    NotPermitted = 1,
    /// No such volume.
    NotFound = 2,
    /// The disk or the replication failed.
    Io = 5,
    /// A request that makes no sense: out of range, before `Open`, unknown flags.
    Invalid = 22,
    /// The store is full.
    NoSpace = 28,
    /// A frame over the protocol's bounds.
    TooLarge = 75,
    /// An unknown protocol version or request kind.
    NotSupported = 95,
    /// The store is shutting down.
    Shutdown = 108,
}

impl ErrorCode {
    /// The code of a reply's status word (`None` for 0, success). An unknown number
    /// reads as `Io`: the request failed, whatever the reason.
    pub fn from_u32(v: u32) -> Option<ErrorCode> {
        Some(match v {
            0 => return None,
            1 => ErrorCode::NotPermitted,
            2 => ErrorCode::NotFound,
            22 => ErrorCode::Invalid,
            28 => ErrorCode::NoSpace,
            75 => ErrorCode::TooLarge,
            95 => ErrorCode::NotSupported,
            108 => ErrorCode::Shutdown,
            _ => ErrorCode::Io,
        })
    }
}

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub kind: Kind,
    /// Durable before the reply (`Write`, `Trim`).
    pub fua: bool,
    /// An `Open` from a store forwarding its own client ([`FLAG_FORWARDED`]).
    pub forwarded: bool,
    /// Where.
    pub offset: u64,
    /// How many bytes (of the range, or of the payload that follows).
    pub length: u64,
}

/// One run of a `BlockStatus` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes.
    pub length: u64,
    /// [`EXTENT_HOLE`] / [`EXTENT_ZERO`] bits.
    pub flags: u32,
}

impl Extent {
    /// True when the range reads as zeros (nothing to copy).
    pub fn is_zero(&self) -> bool {
        self.flags & EXTENT_ZERO != 0
    }
}

/// A header that breaks the protocol; the server answers it with [`BadFrame::code`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BadFrame {
    /// Not a request/reply of this protocol.
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    /// A version this side does not speak.
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u16),
    /// An unknown request kind.
    #[error("unknown request kind {0}")]
    Kind(u8),
    /// Flags this protocol does not define, or one on a request that has no use for it
    /// (FUA but on `Write` and `Trim`, forwarded but on `Open`).
    #[error("flags {flags:#04x} are not valid on {kind:?}")]
    Flags {
        /// The request.
        kind: Kind,
        /// Its flags.
        flags: u8,
    },
    /// A payload or answer over the bounds.
    #[error("{what} of {length} bytes is over the limit of {max}")]
    TooLarge {
        /// Which frame.
        what: &'static str,
        /// Its length.
        length: u64,
        /// The limit.
        max: u64,
    },
}

impl BadFrame {
    /// The error code a server answers this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            BadFrame::Version(_) | BadFrame::Kind(_) => ErrorCode::NotSupported,
            BadFrame::TooLarge { .. } => ErrorCode::TooLarge,
            BadFrame::Magic(_) | BadFrame::Flags { .. } => ErrorCode::Invalid,
        }
    }
}

/// Encodes a request header.
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&VERSION.to_be_bytes());
    b[6] = r.kind as u8;
    b[7] = if r.fua { FLAG_FUA } else { 0 } | if r.forwarded { FLAG_FORWARDED } else { 0 };
    b[8..16].copy_from_slice(&r.offset.to_be_bytes());
    b[16..24].copy_from_slice(&r.length.to_be_bytes());
    b
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Decodes and checks a request header: magic, version, kind, flags and the payload
/// bounds (`Write`'s data and `Read`'s answer at most [`MAX_DATA`], a name at most
/// [`MAX_NAME`]). Ranges against the volume's size are the server's to check.
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<Request, BadFrame> {
    let magic = be_u32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(BadFrame::Magic(magic));
    }
    let version = u16::from_be_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(BadFrame::Version(version));
    }
    let kind = Kind::from_u8(b[6]).ok_or(BadFrame::Kind(b[6]))?;
    let flags = b[7];
    let allowed = match kind {
        Kind::Write | Kind::Trim => FLAG_FUA,
        Kind::Open => FLAG_FORWARDED,
        _ => 0,
    };
    if flags & !allowed != 0 {
        return Err(BadFrame::Flags { kind, flags });
    }
    let (offset, length) = (be_u64(&b[8..16]), be_u64(&b[16..24]));
    let bound = match kind {
        Kind::Open => Some(("a volume name", MAX_NAME)),
        Kind::Read => Some(("a read", MAX_DATA)),
        Kind::Write => Some(("a write", MAX_DATA)),
        Kind::Digest => Some(("a digest's range", MAX_DATA)),
        _ => None,
    };
    if let Some((what, max)) = bound {
        if length > max {
            return Err(BadFrame::TooLarge { what, length, max });
        }
    }
    Ok(Request {
        kind,
        fua: flags & FLAG_FUA != 0,
        forwarded: flags & FLAG_FORWARDED != 0,
        offset,
        length,
    })
}

/// Encodes a reply header: `code` `None` for success.
pub fn encode_reply(code: Option<ErrorCode>, length: u64) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&code.map_or(0, |c| c as u32).to_be_bytes());
    b[8..16].copy_from_slice(&length.to_be_bytes());
    b
}

/// Decodes a reply header: the error code (`None`: success) and the payload's length.
pub fn decode_reply(b: &[u8; REPLY_LEN]) -> Result<(Option<ErrorCode>, u64), BadFrame> {
    let magic = be_u32(&b[0..4]);
    if magic != REPLY_MAGIC {
        return Err(BadFrame::Magic(magic));
    }
    Ok((ErrorCode::from_u32(be_u32(&b[4..8])), be_u64(&b[8..16])))
}

/// The payload of an `Open` reply.
pub fn encode_open_reply(size: u64, read_only: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPEN_REPLY_LEN as usize);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&(if read_only { OPEN_READ_ONLY } else { 0 }).to_be_bytes());
    b
}

/// Decodes an `Open` reply's payload into (size, read-only).
pub fn decode_open_reply(b: &[u8]) -> Option<(u64, bool)> {
    (b.len() as u64 == OPEN_REPLY_LEN).then(|| (be_u64(b), be_u32(&b[8..]) & OPEN_READ_ONLY != 0))
}

/// The payload of a `BlockStatus` reply.
pub fn encode_extents(extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(extents.len() * EXTENT_LEN);
    for e in extents {
        b.extend_from_slice(&e.length.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

/// Decodes a `BlockStatus` reply's payload; `None` when it is not whole extents, holds
/// more than [`MAX_EXTENTS`], or has an empty run.
pub fn decode_extents(b: &[u8]) -> Option<Vec<Extent>> {
    if b.len() % EXTENT_LEN != 0 || b.len() / EXTENT_LEN > MAX_EXTENTS {
        return None;
    }
    let extents: Vec<Extent> = b
        .chunks_exact(EXTENT_LEN)
        .map(|c| Extent {
            length: be_u64(c),
            flags: be_u32(&c[8..]),
        })
        .collect();
    extents.iter().all(|e| e.length > 0).then_some(extents)
}

#[cfg(test)]
mod tests;
