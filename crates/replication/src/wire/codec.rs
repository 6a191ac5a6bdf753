//! Encoding and decoding of replication frames, with every field checked on both paths:
//! `encode` writes frames, `decode` reads one frame's body, `stream` cuts a byte stream
//! into frames. The kind and error codes and the rules on offsets and lengths, which
//! both directions share, are here.

mod decode;
mod encode;
mod stream;

pub use decode::{decode_body, frame_body_len};
pub use encode::{encode, encode_for, encode_into};
pub use stream::Decoder;

use super::{
    Message, WireError, BLOCK_SIZE, MAX_DATA, MAX_DIGEST_BLOCKS, MAX_SNAPSHOT_NAMES,
    MAX_UNSETTLED_REGIONS, SECTOR,
};

const KIND_FENCE: u8 = 1;
const KIND_WRITE: u8 = 2;
const KIND_WRITE_ZEROES: u8 = 3;
const KIND_TRIM: u8 = 4;
const KIND_FLUSH: u8 = 5;
const KIND_DIGESTS: u8 = 6;
const KIND_DIGESTS_REPLY: u8 = 7;
const KIND_READ: u8 = 8;
const KIND_READ_REPLY: u8 = 9;
const KIND_REPLY: u8 = 10;
const KIND_SNAPSHOT: u8 = 11;
const KIND_RESIZE: u8 = 12;
const KIND_UNSETTLED: u8 = 13;
const KIND_UNSETTLED_REPLY: u8 = 14;
const KIND_SNAPSHOT_LIST: u8 = 15;
const KIND_SNAPSHOT_LIST_REPLY: u8 = 16;
const KIND_SNAPSHOT_READ: u8 = 17;
const KIND_REPAIR: u8 = 18;
const KIND_REPAIR_REPLY: u8 = 19;
/// A `Snapshot` with a size (`size: Some`).
const KIND_SNAPSHOT_AT: u8 = 20;

/// The oldest protocol version that has message kind `kind` (`None`: no version has it).
fn kind_version(kind: u8) -> Option<u8> {
    match kind {
        KIND_FENCE..=KIND_REPAIR_REPLY => Some(1),
        KIND_SNAPSHOT_AT => Some(2),
        _ => None,
    }
}

impl Message {
    /// The oldest protocol version that has this message: the version its frame carries,
    /// and the one a connection must have negotiated for it to be sent.
    pub fn version(&self) -> u8 {
        match self {
            Message::Snapshot { size: Some(_), .. } => 2,
            _ => 1,
        }
    }
}

const REPAIR_REWRITTEN: u8 = 0;
const REPAIR_NOT_NEEDED: u8 = 1;
const REPAIR_MISMATCH: u8 = 2;

const ERR_STALE_GENERATION: u8 = 1;
const ERR_UNKNOWN_VOLUME: u8 = 2;
const ERR_OUT_OF_RANGE: u8 = 3;
const ERR_NO_SPACE: u8 = 4;
const ERR_IO: u8 = 5;
const ERR_NOT_REPLICA: u8 = 6;
const ERR_SEQ_GAP: u8 = 7;
const ERR_NOT_IN_SYNC: u8 = 8;

/// The rules on offsets and lengths, the same for encode and decode.
fn check(msg: &Message) -> Result<(), WireError> {
    match msg {
        Message::Write { offset, data, .. } => {
            if data.len() > MAX_DATA {
                return Err(WireError::BadLength {
                    field: "data length",
                    value: data.len() as u64,
                });
            }
            check_range(*offset, data.len() as u64, SECTOR, "data length")
        }
        Message::WriteZeroes { offset, len, .. } | Message::Trim { offset, len, .. } => {
            check_range(*offset, *len, SECTOR, "len")
        }
        Message::Digests { offset, blocks, .. } => {
            if *blocks > MAX_DIGEST_BLOCKS {
                return Err(WireError::BadLength {
                    field: "blocks",
                    value: u64::from(*blocks),
                });
            }
            check_range(
                *offset,
                u64::from(*blocks) * BLOCK_SIZE,
                BLOCK_SIZE,
                "blocks",
            )
        }
        Message::Resize { size, .. }
        | Message::Snapshot {
            size: Some(size), ..
        } => {
            if *size == 0 {
                return Err(WireError::BadLength {
                    field: "size",
                    value: 0,
                });
            }
            check_aligned("size", *size, BLOCK_SIZE)
        }
        Message::Read { offset, len, .. } | Message::SnapshotRead { offset, len, .. } => {
            if *len as usize > MAX_DATA {
                return Err(WireError::BadLength {
                    field: "len",
                    value: u64::from(*len),
                });
            }
            check_range(*offset, u64::from(*len), SECTOR, "len")
        }
        Message::Repair { offset, data, .. } => {
            if data.len() as u64 != BLOCK_SIZE {
                return Err(WireError::BadLength {
                    field: "repair data length",
                    value: data.len() as u64,
                });
            }
            check_range(*offset, BLOCK_SIZE, BLOCK_SIZE, "repair data length")
        }
        Message::ReadReply {
            result: Ok(data), ..
        } => {
            if data.len() > MAX_DATA {
                return Err(WireError::BadLength {
                    field: "data length",
                    value: data.len() as u64,
                });
            }
            check_aligned("data length", data.len() as u64, SECTOR)
        }
        Message::DigestsReply {
            result: Ok(digests),
            ..
        } => {
            if digests.len() > MAX_DIGEST_BLOCKS as usize {
                return Err(WireError::BadLength {
                    field: "digest count",
                    value: digests.len() as u64,
                });
            }
            Ok(())
        }
        Message::UnsettledReply {
            result: Ok(regions),
            ..
        } => {
            if regions.len() > MAX_UNSETTLED_REGIONS as usize {
                return Err(WireError::BadLength {
                    field: "region count",
                    value: regions.len() as u64,
                });
            }
            for (offset, len) in regions {
                check_range(*offset, *len, SECTOR, "region length")?;
            }
            Ok(())
        }
        Message::SnapshotListReply {
            result: Ok(names), ..
        } => {
            if names.len() > MAX_SNAPSHOT_NAMES as usize {
                return Err(WireError::BadLength {
                    field: "snapshot count",
                    value: names.len() as u64,
                });
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `offset` aligned to `unit`, `len` a positive multiple of `unit`, no overflow.
fn check_range(offset: u64, len: u64, unit: u64, len_field: &'static str) -> Result<(), WireError> {
    check_aligned("offset", offset, unit)?;
    if len == 0 {
        return Err(WireError::BadLength {
            field: len_field,
            value: 0,
        });
    }
    check_aligned(len_field, len, unit)?;
    if offset.checked_add(len).is_none() {
        return Err(WireError::BadLength {
            field: len_field,
            value: len,
        });
    }
    Ok(())
}

fn check_aligned(field: &'static str, value: u64, unit: u64) -> Result<(), WireError> {
    if value % unit == 0 {
        Ok(())
    } else {
        Err(WireError::Misaligned { field, value, unit })
    }
}
