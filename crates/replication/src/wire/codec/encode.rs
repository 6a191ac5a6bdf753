//! Writing frames: every message is checked by the shared rules before a byte is written.

use super::super::{
    Generation, Message, RepairOutcome, ReplyError, VolumeName, WireError, LENGTH_PREFIX,
    MAX_ERROR_TEXT, MAX_FRAME_LEN,
};
use super::{
    check, ERR_IO, ERR_NOT_IN_SYNC, ERR_NOT_REPLICA, ERR_NO_SPACE, ERR_OUT_OF_RANGE, ERR_SEQ_GAP,
    ERR_STALE_GENERATION, ERR_UNKNOWN_VOLUME, KIND_DIGESTS, KIND_DIGESTS_REPLY, KIND_FENCE,
    KIND_FLUSH, KIND_READ, KIND_READ_REPLY, KIND_REPLY, KIND_RESIZE, KIND_SNAPSHOT,
    KIND_SNAPSHOT_LIST, KIND_SNAPSHOT_LIST_REPLY, KIND_TRIM, KIND_UNSETTLED, KIND_UNSETTLED_REPLY,
    KIND_WRITE, KIND_WRITE_ZEROES,
};
use super::{
    KIND_REPAIR, KIND_REPAIR_REPLY, KIND_SNAPSHOT_AT, KIND_SNAPSHOT_READ, REPAIR_MISMATCH,
    REPAIR_NOT_NEEDED, REPAIR_REWRITTEN,
};

/// Encodes `msg` as one frame. Refuses a message that breaks the format's rules (so a bad
/// message is caught at the sender, not only at the receiver).
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Like [`encode`] for a peer that negotiated protocol version `negotiated`: a message no
/// version up to it has is refused ([`WireError::KindNotInVersion`]) instead of sent.
pub fn encode_for(msg: &Message, negotiated: u8) -> Result<Vec<u8>, WireError> {
    if msg.version() > negotiated {
        return Err(WireError::KindNotInVersion {
            kind: kind_of(msg),
            version: negotiated,
        });
    }
    encode(msg)
}

/// The kind byte of `msg`'s frame, for an error naming it (0 if it cannot be encoded).
fn kind_of(msg: &Message) -> u8 {
    encode(msg)
        .ok()
        .and_then(|f| f.get(LENGTH_PREFIX + 1).copied())
        .unwrap_or(0)
}

/// Appends the frame of `msg` to `out`; on error `out` is left as it was.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    check(msg)?;
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX]);
    out.push(msg.version());
    match msg {
        Message::Fence { volume, generation } => {
            out.push(KIND_FENCE);
            put_target(out, volume, *generation);
        }
        Message::Write {
            volume,
            generation,
            seq,
            offset,
            fua,
            data,
        } => {
            out.push(KIND_WRITE);
            put_target(out, volume, *generation);
            put_u64(out, *seq);
            put_u64(out, *offset);
            out.push(u8::from(*fua));
            put_bytes(out, data);
        }
        Message::WriteZeroes {
            volume,
            generation,
            seq,
            offset,
            len,
        }
        | Message::Trim {
            volume,
            generation,
            seq,
            offset,
            len,
        } => {
            out.push(if matches!(msg, Message::Trim { .. }) {
                KIND_TRIM
            } else {
                KIND_WRITE_ZEROES
            });
            put_target(out, volume, *generation);
            put_u64(out, *seq);
            put_u64(out, *offset);
            put_u64(out, *len);
        }
        Message::Flush {
            volume,
            generation,
            seq,
        } => {
            out.push(KIND_FLUSH);
            put_target(out, volume, *generation);
            put_u64(out, *seq);
        }
        Message::Snapshot {
            volume,
            generation,
            seq,
            name,
            size,
        } => {
            out.push(if size.is_some() {
                KIND_SNAPSHOT_AT
            } else {
                KIND_SNAPSHOT
            });
            put_target(out, volume, *generation);
            put_u64(out, *seq);
            put_name(out, name);
            if let Some(size) = size {
                put_u64(out, *size);
            }
        }
        Message::Resize {
            volume,
            generation,
            seq,
            size,
        } => {
            out.push(KIND_RESIZE);
            put_target(out, volume, *generation);
            put_u64(out, *seq);
            put_u64(out, *size);
        }
        Message::Digests {
            volume,
            generation,
            request,
            offset,
            blocks,
        } => {
            out.push(KIND_DIGESTS);
            put_target(out, volume, *generation);
            put_u64(out, *request);
            put_u64(out, *offset);
            put_u32(out, *blocks);
        }
        Message::DigestsReply { request, result } => {
            out.push(KIND_DIGESTS_REPLY);
            put_u64(out, *request);
            match result {
                Ok(digests) => {
                    out.push(0);
                    put_u32(out, len_u32(digests.len()));
                    for d in digests {
                        out.extend_from_slice(d);
                    }
                }
                Err(e) => put_error(out, e),
            }
        }
        Message::Read {
            volume,
            generation,
            request,
            offset,
            len,
        } => {
            out.push(KIND_READ);
            put_target(out, volume, *generation);
            put_u64(out, *request);
            put_u64(out, *offset);
            put_u32(out, *len);
        }
        Message::ReadReply { request, result } => {
            out.push(KIND_READ_REPLY);
            put_u64(out, *request);
            match result {
                Ok(data) => {
                    out.push(0);
                    put_bytes(out, data);
                }
                Err(e) => put_error(out, e),
            }
        }
        Message::Unsettled {
            volume,
            generation,
            request,
        } => {
            out.push(KIND_UNSETTLED);
            put_target(out, volume, *generation);
            put_u64(out, *request);
        }
        Message::UnsettledReply { request, result } => {
            out.push(KIND_UNSETTLED_REPLY);
            put_u64(out, *request);
            match result {
                Ok(regions) => {
                    out.push(0);
                    put_u32(out, len_u32(regions.len()));
                    for (offset, len) in regions {
                        put_u64(out, *offset);
                        put_u64(out, *len);
                    }
                }
                Err(e) => put_error(out, e),
            }
        }
        Message::SnapshotList {
            volume,
            generation,
            request,
        } => {
            out.push(KIND_SNAPSHOT_LIST);
            put_target(out, volume, *generation);
            put_u64(out, *request);
        }
        Message::SnapshotListReply { request, result } => {
            out.push(KIND_SNAPSHOT_LIST_REPLY);
            put_u64(out, *request);
            match result {
                Ok(names) => {
                    out.push(0);
                    put_u32(out, len_u32(names.len()));
                    for name in names {
                        put_name(out, name);
                    }
                }
                Err(e) => put_error(out, e),
            }
        }
        Message::SnapshotRead {
            volume,
            generation,
            request,
            snapshot,
            offset,
            len,
        } => {
            out.push(KIND_SNAPSHOT_READ);
            put_target(out, volume, *generation);
            put_u64(out, *request);
            put_name(out, snapshot);
            put_u64(out, *offset);
            put_u32(out, *len);
        }
        Message::Repair {
            volume,
            generation,
            request,
            snapshot,
            offset,
            data,
        } => {
            out.push(KIND_REPAIR);
            put_target(out, volume, *generation);
            put_u64(out, *request);
            match snapshot {
                None => out.push(0),
                Some(s) => {
                    out.push(1);
                    put_name(out, s);
                }
            }
            put_u64(out, *offset);
            put_bytes(out, data);
        }
        Message::RepairReply { request, result } => {
            out.push(KIND_REPAIR_REPLY);
            put_u64(out, *request);
            match result {
                Ok(o) => {
                    out.push(0);
                    out.push(match o {
                        RepairOutcome::Rewritten => REPAIR_REWRITTEN,
                        RepairOutcome::NotNeeded => REPAIR_NOT_NEEDED,
                        RepairOutcome::Mismatch => REPAIR_MISMATCH,
                    });
                }
                Err(e) => put_error(out, e),
            }
        }
        Message::Reply { seq, result } => {
            out.push(KIND_REPLY);
            put_u64(out, *seq);
            match result {
                Ok(()) => out.push(0),
                Err(e) => put_error(out, e),
            }
        }
    }
    let body_len = out.len() - start - LENGTH_PREFIX;
    if body_len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(WireError::Oversize {
            len: body_len,
            max: MAX_FRAME_LEN,
        });
    }
    out[start..start + LENGTH_PREFIX].copy_from_slice(&len_u32(body_len).to_be_bytes());
    Ok(())
}

fn len_u32(len: usize) -> u32 {
    // Every length written is checked against MAX_DATA / MAX_FRAME_LEN first, far below
    // u32::MAX; saturate rather than wrap should that ever change.
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, data: &[u8]) {
    put_u32(out, len_u32(data.len()));
    out.extend_from_slice(data);
}

fn put_target(out: &mut Vec<u8>, volume: &VolumeName, generation: Generation) {
    put_name(out, volume);
    put_u64(out, generation.0);
}

fn put_name(out: &mut Vec<u8>, name: &VolumeName) {
    let name = name.as_str().as_bytes();
    // VolumeName guarantees 1..=64 bytes.
    out.push(name.len() as u8);
    out.extend_from_slice(name);
}

fn put_error(out: &mut Vec<u8>, e: &ReplyError) {
    out.push(1);
    match e {
        ReplyError::StaleGeneration { current } => {
            out.push(ERR_STALE_GENERATION);
            put_u64(out, current.0);
        }
        ReplyError::UnknownVolume => out.push(ERR_UNKNOWN_VOLUME),
        ReplyError::OutOfRange => out.push(ERR_OUT_OF_RANGE),
        ReplyError::NoSpace => out.push(ERR_NO_SPACE),
        ReplyError::Io(text) => {
            out.push(ERR_IO);
            let mut cut = text.len().min(MAX_ERROR_TEXT);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let text = &text.as_bytes()[..cut];
            // cut <= MAX_ERROR_TEXT < u16::MAX
            out.extend_from_slice(&(text.len() as u16).to_be_bytes());
            out.extend_from_slice(text);
        }
        ReplyError::NotReplica => out.push(ERR_NOT_REPLICA),
        ReplyError::SeqGap { expected } => {
            out.push(ERR_SEQ_GAP);
            put_u64(out, *expected);
        }
        ReplyError::NotInSync => out.push(ERR_NOT_IN_SYNC),
    }
}
