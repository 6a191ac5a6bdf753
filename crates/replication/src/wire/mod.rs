//! The replication wire format: message types, framing, and a streaming decoder.
//!
//! A frame is `u32 length (big endian, of what follows) | u8 version | u8 kind | body`.
//! Integers are big endian. A volume name is `u8 length | bytes`; data and digest lists are
//! `u32 length | bytes`. Every decode of truncated, oversize or malformed input returns a
//! [`WireError`]; a frame longer than [`MAX_FRAME_LEN`] is refused from its 4-byte length
//! alone, before anything is allocated for its body.
//!
//! Who sends what: the primary sends [`Message::Fence`], [`Message::Write`],
//! [`Message::WriteZeroes`], [`Message::Trim`], [`Message::Flush`], [`Message::Digests`] and
//! [`Message::Read`], [`Message::Snapshot`], [`Message::Resize`],
//! [`Message::Unsettled`], [`Message::SnapshotList`], [`Message::SnapshotRead`] and
//! [`Message::Repair`]; a replica answers with [`Message::Reply`] (fence, writes, flushes,
//! snapshots, resizes, matched by `seq`; a fence is answered as seq 0),
//! [`Message::DigestsReply`], [`Message::ReadReply`] (also for `SnapshotRead`),
//! [`Message::UnsettledReply`], [`Message::SnapshotListReply`] and
//! [`Message::RepairReply`] (matched by `request`).
//!
//! The other way, for a repair of a replica's own copy: on a stream the replica opens on
//! its primary's connection, the replica sends [`Message::Read`] (or
//! [`Message::SnapshotRead`]) of a block in its generation, the primary answers
//! [`Message::ReadReply`], and the replica tells what it did with the bytes in a
//! [`Message::RepairReply`].

mod codec;
#[cfg(test)]
mod repair_tests;
#[cfg(test)]
mod tests;

use std::fmt;

pub use codec::{decode_body, encode, encode_for, encode_into, frame_body_len, Decoder};

/// The newest protocol version this crate speaks. A frame carries (in the byte after its
/// length prefix) the oldest version that has its message kind, so a peer that speaks
/// only an older version still reads every message it knows; a sender checks the version
/// the connection negotiated ([`ALPNS`]) before it sends a message of a newer one.
///
/// Version 1: kinds 1-19. Version 2 adds kind 20 (a `Snapshot` with a size).
pub const VERSION: u8 = 2;
/// The oldest protocol version this crate speaks.
pub const OLDEST_VERSION: u8 = 1;
/// The ALPN names of replication connections, newest version first: both ends offer every
/// version they speak, and TLS settles on the newest both know ([`alpn_version`]). A store
/// of an older release offers only `tessera-repl/1`.
pub const ALPNS: [&[u8]; 2] = [b"tessera-repl/2", b"tessera-repl/1"];

/// The protocol version an ALPN name stands for, if it is one of [`ALPNS`].
pub fn alpn_version(alpn: &[u8]) -> Option<u8> {
    let n = VERSION as usize;
    ALPNS.iter().position(|a| *a == alpn).map(|i| (n - i) as u8)
}

/// The ALPN names of versions `OLDEST_VERSION..=max`, newest first (what a store offers;
/// `max` above [`VERSION`] counts as [`VERSION`]).
pub fn alpns_up_to(max: u8) -> Vec<Vec<u8>> {
    ALPNS
        .iter()
        .filter(|a| alpn_version(a).is_some_and(|v| v <= max))
        .map(|a| a.to_vec())
        .collect()
}
/// Offsets and lengths are multiples of this.
pub const SECTOR: u64 = 512;
/// The unit a digest covers (the block store's block).
pub const BLOCK_SIZE: u64 = 4096;
/// Most data bytes one `Write` or `ReadReply` carries.
pub const MAX_DATA: usize = 4 << 20;
/// Most blocks one `Digests` request asks for (4 MiB of digests, 512 MiB of volume).
pub const MAX_DIGEST_BLOCKS: u32 = (MAX_DATA / 32) as u32;
/// Longest volume name (the block store's rule: 1-64 of `[A-Za-z0-9._-]`).
pub const MAX_VOLUME_NAME: usize = 64;
/// Most regions one `UnsettledReply` carries (16 bytes each: 1 MiB of regions).
pub const MAX_UNSETTLED_REGIONS: u32 = 1 << 16;
/// Most snapshot names one `SnapshotListReply` carries (65 bytes each at most: 266 KiB).
pub const MAX_SNAPSHOT_NAMES: u32 = 4096;
/// Longest I/O error text in a reply; longer text is cut when encoding.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Largest frame, counted after the 4-byte length: the largest data frame plus headers.
pub const MAX_FRAME_LEN: usize = MAX_DATA + 4096;
/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// A volume's generation: raised through the cluster whenever the primary or the in-sync
/// set changes. A replica refuses anything older than the highest it has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation after this one.
    pub fn next(self) -> Generation {
        Generation(self.0.saturating_add(1))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A volume name as the block store accepts it: 1-64 of `[A-Za-z0-9._-]`, not starting
/// with `.` or `-`. Checked on construction and on decode.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    /// Checks `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<VolumeName, WireError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= MAX_VOLUME_NAME
            && !name.starts_with('.')
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(VolumeName(name))
        } else {
            Err(WireError::BadVolumeName)
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A blake3 digest of one 4 KiB block.
pub type Digest = [u8; 32];

/// Every replication message. Offsets and lengths are bytes, multiples of [`SECTOR`]
/// (digest requests: of [`BLOCK_SIZE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Primary → replica: "I write this volume in `generation`". The replica persists a
    /// higher generation before answering `Reply { seq: 0 }`, and refuses an older one.
    Fence {
        volume: VolumeName,
        generation: Generation,
    },
    /// Primary → replica: write `data` at `offset`; `fua`: durable before the reply.
    Write {
        volume: VolumeName,
        generation: Generation,
        seq: u64,
        offset: u64,
        fua: bool,
        data: Vec<u8>,
    },
    /// Primary → replica: make `len` bytes at `offset` read as zeroes.
    WriteZeroes {
        volume: VolumeName,
        generation: Generation,
        seq: u64,
        offset: u64,
        len: u64,
    },
    /// Primary → replica: discard `len` bytes at `offset` (they read as zeroes after).
    Trim {
        volume: VolumeName,
        generation: Generation,
        seq: u64,
        offset: u64,
        len: u64,
    },
    /// Primary → replica: make every write with a lower seq durable before the reply.
    Flush {
        volume: VolumeName,
        generation: Generation,
        seq: u64,
    },
    /// Primary → replica: the blake3 digests of `blocks` 4 KiB blocks from `offset`.
    Digests {
        volume: VolumeName,
        generation: Generation,
        request: u64,
        offset: u64,
        blocks: u32,
    },
    /// Replica → primary: the answer to `Digests` number `request`.
    DigestsReply {
        request: u64,
        result: Result<Vec<Digest>, ReplyError>,
    },
    /// Primary → replica: `len` bytes from `offset` (repair and catch-up source); also
    /// replica → primary on a stream of the replica's, for a repair of its own copy.
    Read {
        volume: VolumeName,
        generation: Generation,
        request: u64,
        offset: u64,
        len: u32,
    },
    /// Replica → primary: the answer to `Read` number `request`.
    ReadReply {
        request: u64,
        result: Result<Vec<u8>, ReplyError>,
    },
    /// Primary → replica: take snapshot `name` of the volume at this point of the write
    /// stream (after every lower seq, before every higher one). Sequenced like a write,
    /// so every copy freezes the same writes; answered with `Reply { seq }`.
    Snapshot {
        volume: VolumeName,
        generation: Generation,
        seq: u64,
        /// The snapshot's name (the block store's naming rule, as for volumes).
        name: VolumeName,
        /// `None`: at the copy's size (kind 11). `Some`: at this size, smaller than the
        /// copy (kind 20, only from a catch-up carrying a snapshot taken before the
        /// volume grew to a copy larger already): the copy's bytes past it are discarded
        /// first (a catch-up rewrites the copy's head after it). A positive multiple of
        /// [`BLOCK_SIZE`].
        size: Option<u64>,
    },
    /// Primary → replica: grow the volume to `size` bytes at this point of the write
    /// stream (after every lower seq, before every higher one, so writes past the old end
    /// come after it on every copy). Sequenced like a write; a copy already at least that
    /// large takes it as done. Answered with `Reply { seq }`.
    Resize {
        volume: VolumeName,
        generation: Generation,
        seq: u64,
        /// The new size in bytes: a positive multiple of [`BLOCK_SIZE`].
        size: u64,
    },
    /// Primary → replica (a new primary, before it takes client I/O): "which regions did
    /// your latest changes touch". The replica answers with the regions of the last
    /// writes, zeroes and trims it applied (a bounded window, see `docs/replication.md`,
    /// "Reconciliation after a failover"): there the copies may differ on writes the old
    /// primary sent to some copies and never completed. Carries the new generation, so it
    /// fences the replica before it answers.
    Unsettled {
        volume: VolumeName,
        generation: Generation,
        request: u64,
    },
    /// Replica → primary: the answer to `Unsettled` number `request`: (offset, len)
    /// regions, sector-aligned, at most [`MAX_UNSETTLED_REGIONS`].
    UnsettledReply {
        request: u64,
        result: Result<Vec<(u64, u64)>, ReplyError>,
    },
    /// Primary → replica (a catch-up): "which snapshots of this volume do you hold", so
    /// the snapshots a copy missed while out of sync are brought to it, each at its point
    /// (see `docs/replication.md`, "Catch-up carries snapshots").
    SnapshotList {
        volume: VolumeName,
        generation: Generation,
        request: u64,
    },
    /// Replica → primary: the answer to `SnapshotList` number `request`: the names of the
    /// snapshots the copy holds, at most [`MAX_SNAPSHOT_NAMES`].
    SnapshotListReply {
        request: u64,
        result: Result<Vec<VolumeName>, ReplyError>,
    },
    /// Primary → replica: `len` bytes from `offset` of the volume's snapshot `snapshot`
    /// (the source of a repair of that snapshot's block), answered with `ReadReply`.
    SnapshotRead {
        volume: VolumeName,
        generation: Generation,
        request: u64,
        snapshot: VolumeName,
        offset: u64,
        len: u32,
    },
    /// Primary → replica: the good bytes of the one block at `offset` of the volume (or of
    /// its snapshot `snapshot`), which failed its checksum on some copy. The replica
    /// writes them only where its own block fails its checksum and only when they hash
    /// to the checksum its own table holds (so stale or wrong bytes change nothing);
    /// answered with `RepairReply`.
    Repair {
        volume: VolumeName,
        generation: Generation,
        request: u64,
        snapshot: Option<VolumeName>,
        offset: u64,
        /// Exactly one block ([`BLOCK_SIZE`] bytes).
        data: Vec<u8>,
    },
    /// Replica → primary: what `Repair` number `request` did.
    RepairReply {
        request: u64,
        result: Result<RepairOutcome, ReplyError>,
    },
    /// Replica → primary: the outcome of the fence (seq 0), write, flush, snapshot or
    /// resize `seq`.
    Reply {
        seq: u64,
        result: Result<(), ReplyError>,
    },
}

/// What a replica did with a [`Message::Repair`]. Travels on the wire as one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairOutcome {
    /// Its block failed its checksum and the bytes matched it: rewritten, synced.
    Rewritten,
    /// Its block reads well (never bad, or rewritten since): nothing written.
    NotNeeded,
    /// The bytes do not hash to the checksum its copy holds for the block (a stale or
    /// wrong copy, or the block changed since): nothing written.
    Mismatch,
}

/// Why a replica refused a request. Travels on the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The replica has seen a newer generation: the sender is fenced.
    #[error("stale generation: the replica is at generation {current}")]
    StaleGeneration { current: Generation },
    /// The replica does not hold this volume.
    #[error("unknown volume")]
    UnknownVolume,
    /// The range lies past the end of the volume.
    #[error("out of range")]
    OutOfRange,
    /// The replica's store is full.
    #[error("no space")]
    NoSpace,
    /// The replica's store failed.
    #[error("I/O error: {0}")]
    Io(String),
    /// This node is not a replica of the volume.
    #[error("not a replica of this volume")]
    NotReplica,
    /// A seq arrived before the one the replica expects next (a gap): nothing was applied.
    #[error("sequence gap: expected seq {expected}")]
    SeqGap { expected: u64 },
    /// The replica restarted within this generation and may have lost unflushed writes:
    /// it accepts no more writes of this generation and must be caught up.
    #[error("lost its place in this generation (restarted); needs catch-up")]
    NotInSync,
}

/// Why bytes could not be decoded into a message, or a message not encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame length exceeds [`MAX_FRAME_LEN`] (checked before reading the body).
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize { len: usize, max: usize },
    /// The frame is too short to hold a version and a kind.
    #[error("frame of {len} bytes is too short")]
    TooShort { len: usize },
    /// The frame's version is not one this crate speaks.
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// The frame's version is newer than the one the connection negotiated.
    #[error(
        "frame of protocol version {version} on a connection that negotiated version {negotiated}"
    )]
    NotNegotiated { version: u8, negotiated: u8 },
    /// The frame's kind does not exist in the version the frame says it is of (or the
    /// message is not one the peer's version knows, when encoding for it).
    #[error("message kind {kind} does not exist in protocol version {version}")]
    KindNotInVersion { kind: u8, version: u8 },
    /// The frame's kind is not a known message.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The body ended before a field it declares.
    #[error("truncated body: {field} needs more bytes")]
    Truncated { field: &'static str },
    /// The body has bytes after its last field.
    #[error("{extra} bytes after the end of the message")]
    TrailingBytes { extra: usize },
    /// A volume name breaks the naming rule.
    #[error("bad volume name")]
    BadVolumeName,
    /// An offset or length is not a multiple of what it must be.
    #[error("{field} {value} is not a multiple of {unit}")]
    Misaligned {
        field: &'static str,
        value: u64,
        unit: u64,
    },
    /// A length is zero, too large, or offset + length overflows.
    #[error("bad {field}: {value}")]
    BadLength { field: &'static str, value: u64 },
    /// A flag or code byte has a value no message of the frame's version uses.
    #[error("bad {field} value {value}")]
    BadValue { field: &'static str, value: u64 },
    /// The decoder already failed; the stream must be closed.
    #[error("decoder failed earlier; the stream must be closed")]
    Poisoned,
}
