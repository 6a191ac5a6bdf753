//! Encoding and decoding of replication frames, with every field checked on both paths.

use super::{
    Digest, Generation, Message, ReplyError, VolumeName, WireError, BLOCK_SIZE, LENGTH_PREFIX,
    MAX_DATA, MAX_DIGEST_BLOCKS, MAX_ERROR_TEXT, MAX_FRAME_LEN, SECTOR, VERSION,
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

const ERR_STALE_GENERATION: u8 = 1;
const ERR_UNKNOWN_VOLUME: u8 = 2;
const ERR_OUT_OF_RANGE: u8 = 3;
const ERR_NO_SPACE: u8 = 4;
const ERR_IO: u8 = 5;
const ERR_NOT_REPLICA: u8 = 6;
const ERR_SEQ_GAP: u8 = 7;
const ERR_NOT_IN_SYNC: u8 = 8;

/// Encodes `msg` as one frame. Refuses a message that breaks the format's rules (so a bad
/// message is caught at the sender, not only at the receiver).
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends the frame of `msg` to `out`; on error `out` is left as it was.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    check(msg)?;
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX]);
    out.push(VERSION);
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
        } => {
            out.push(KIND_SNAPSHOT);
            put_target(out, volume, *generation);
            put_u64(out, *seq);
            put_name(out, name);
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

/// The length of the frame that follows a 4-byte length prefix, refused if it is larger
/// than [`MAX_FRAME_LEN`] or too short to hold a version and a kind.
pub fn frame_body_len(prefix: [u8; LENGTH_PREFIX]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::Oversize {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if len < 2 {
        return Err(WireError::TooShort { len });
    }
    Ok(len)
}

/// Decodes one frame's body (what follows the length prefix: version, kind, fields).
pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(WireError::Oversize {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut r = Reader { rest: body };
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    let kind = r.u8("kind")?;
    let msg = match kind {
        KIND_FENCE => {
            let (volume, generation) = r.target()?;
            Message::Fence { volume, generation }
        }
        KIND_WRITE => {
            let (volume, generation) = r.target()?;
            let seq = r.u64("seq")?;
            let offset = r.u64("offset")?;
            let fua = match r.u8("fua")? {
                0 => false,
                1 => true,
                v => {
                    return Err(WireError::BadValue {
                        field: "fua",
                        value: u64::from(v),
                    })
                }
            };
            let data = r.bytes("data", MAX_DATA)?;
            Message::Write {
                volume,
                generation,
                seq,
                offset,
                fua,
                data,
            }
        }
        KIND_WRITE_ZEROES | KIND_TRIM => {
            let (volume, generation) = r.target()?;
            let seq = r.u64("seq")?;
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            if kind == KIND_TRIM {
                Message::Trim {
                    volume,
                    generation,
                    seq,
                    offset,
                    len,
                }
            } else {
                Message::WriteZeroes {
                    volume,
                    generation,
                    seq,
                    offset,
                    len,
                }
            }
        }
        KIND_FLUSH => {
            let (volume, generation) = r.target()?;
            let seq = r.u64("seq")?;
            Message::Flush {
                volume,
                generation,
                seq,
            }
        }
        KIND_SNAPSHOT => {
            let (volume, generation) = r.target()?;
            let seq = r.u64("seq")?;
            let name = r.name("snapshot name length", "snapshot name")?;
            Message::Snapshot {
                volume,
                generation,
                seq,
                name,
            }
        }
        KIND_DIGESTS => {
            let (volume, generation) = r.target()?;
            Message::Digests {
                volume,
                generation,
                request: r.u64("request")?,
                offset: r.u64("offset")?,
                blocks: r.u32("blocks")?,
            }
        }
        KIND_DIGESTS_REPLY => {
            let request = r.u64("request")?;
            let result = match r.status()? {
                None => {
                    let count = r.u32("digest count")?;
                    if count > MAX_DIGEST_BLOCKS {
                        return Err(WireError::BadLength {
                            field: "digest count",
                            value: u64::from(count),
                        });
                    }
                    let raw = r.take("digests", count as usize * 32)?;
                    Ok(raw
                        .chunks_exact(32)
                        .map(|c| {
                            let mut d: Digest = [0; 32];
                            d.copy_from_slice(c);
                            d
                        })
                        .collect())
                }
                Some(e) => Err(e),
            };
            Message::DigestsReply { request, result }
        }
        KIND_READ => {
            let (volume, generation) = r.target()?;
            Message::Read {
                volume,
                generation,
                request: r.u64("request")?,
                offset: r.u64("offset")?,
                len: r.u32("len")?,
            }
        }
        KIND_READ_REPLY => {
            let request = r.u64("request")?;
            let result = match r.status()? {
                None => Ok(r.bytes("data", MAX_DATA)?),
                Some(e) => Err(e),
            };
            Message::ReadReply { request, result }
        }
        KIND_REPLY => {
            let seq = r.u64("seq")?;
            let result = match r.status()? {
                None => Ok(()),
                Some(e) => Err(e),
            };
            Message::Reply { seq, result }
        }
        other => return Err(WireError::UnknownKind(other)),
    };
    if !r.rest.is_empty() {
        return Err(WireError::TrailingBytes {
            extra: r.rest.len(),
        });
    }
    check(&msg)?;
    Ok(msg)
}

/// A streaming decoder: push bytes as they arrive, take whole messages out.
///
/// Memory stays bounded by one frame when the caller pushes at most [`Decoder::wants`]
/// bytes at a time: a length prefix above [`MAX_FRAME_LEN`] fails as soon as its four bytes
/// are in, before the body is read. After an error the decoder refuses everything
/// ([`WireError::Poisoned`]): the stream is out of step and must be closed.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    poisoned: bool,
}

impl Decoder {
    /// An empty decoder at a frame boundary.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// How many more bytes the next step needs: the rest of the length prefix, or the
    /// rest of the frame. Zero when a whole message is buffered (call `next_message`).
    pub fn wants(&self) -> usize {
        if self.buf.len() < LENGTH_PREFIX {
            return LENGTH_PREFIX - self.buf.len();
        }
        match self.prefix_len() {
            Ok(len) => (LENGTH_PREFIX + len).saturating_sub(self.buf.len()),
            Err(_) => 0,
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True when no partial frame is buffered (a clean place for the stream to end).
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty()
    }

    /// Adds received bytes; fails at once on an oversize or too-short length prefix.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= LENGTH_PREFIX {
            if let Err(e) = self.prefix_len() {
                self.poisoned = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// The next whole message, or `None` if more bytes are needed ([`Decoder::wants`]).
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        if self.buf.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let len = match self.prefix_len() {
            Ok(len) => len,
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        };
        let end = LENGTH_PREFIX + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let result = decode_body(&self.buf[LENGTH_PREFIX..end]);
        self.buf.drain(..end);
        match result {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    fn prefix_len(&self) -> Result<usize, WireError> {
        let mut prefix = [0; LENGTH_PREFIX];
        prefix.copy_from_slice(&self.buf[..LENGTH_PREFIX]);
        frame_body_len(prefix)
    }
}

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
        Message::Read { offset, len, .. } => {
            if *len as usize > MAX_DATA {
                return Err(WireError::BadLength {
                    field: "len",
                    value: u64::from(*len),
                });
            }
            check_range(*offset, u64::from(*len), SECTOR, "len")
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

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated { field });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(field, 1)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(field, 4)?);
        Ok(u32::from_be_bytes(a))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(field, 8)?);
        Ok(u64::from_be_bytes(a))
    }

    /// A `u32 length | bytes` field, the length checked against `max` before copying.
    fn bytes(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, WireError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(WireError::BadLength {
                field,
                value: len as u64,
            });
        }
        Ok(self.take(field, len)?.to_vec())
    }

    fn target(&mut self) -> Result<(VolumeName, Generation), WireError> {
        let volume = self.name("volume name length", "volume name")?;
        let generation = Generation(self.u64("generation")?);
        Ok((volume, generation))
    }

    /// `u8 length | bytes`, checked by the volume naming rule.
    fn name(
        &mut self,
        len_field: &'static str,
        field: &'static str,
    ) -> Result<VolumeName, WireError> {
        let len = self.u8(len_field)? as usize;
        let raw = self.take(field, len)?;
        let name = std::str::from_utf8(raw).map_err(|_| WireError::BadVolumeName)?;
        VolumeName::new(name)
    }

    /// `0` for success (payload follows), or `1 | error`.
    fn status(&mut self) -> Result<Option<ReplyError>, WireError> {
        match self.u8("status")? {
            0 => Ok(None),
            1 => Ok(Some(self.error()?)),
            v => Err(WireError::BadValue {
                field: "status",
                value: u64::from(v),
            }),
        }
    }

    fn error(&mut self) -> Result<ReplyError, WireError> {
        Ok(match self.u8("error code")? {
            ERR_STALE_GENERATION => ReplyError::StaleGeneration {
                current: Generation(self.u64("current generation")?),
            },
            ERR_UNKNOWN_VOLUME => ReplyError::UnknownVolume,
            ERR_OUT_OF_RANGE => ReplyError::OutOfRange,
            ERR_NO_SPACE => ReplyError::NoSpace,
            ERR_IO => {
                let len = usize::from(self.u16("error text length")?);
                if len > MAX_ERROR_TEXT {
                    return Err(WireError::BadLength {
                        field: "error text length",
                        value: len as u64,
                    });
                }
                let raw = self.take("error text", len)?;
                let text = std::str::from_utf8(raw).map_err(|_| WireError::BadValue {
                    field: "error text (not UTF-8)",
                    value: len as u64,
                })?;
                ReplyError::Io(text.to_owned())
            }
            ERR_NOT_REPLICA => ReplyError::NotReplica,
            ERR_SEQ_GAP => ReplyError::SeqGap {
                expected: self.u64("expected seq")?,
            },
            ERR_NOT_IN_SYNC => ReplyError::NotInSync,
            v => {
                return Err(WireError::BadValue {
                    field: "error code",
                    value: u64::from(v),
                })
            }
        })
    }
}
