//! Reading one frame's body: every field is bounded before anything is allocated for it.

use super::super::{
    Digest, Generation, Message, RepairOutcome, ReplyError, VolumeName, WireError, BLOCK_SIZE,
    LENGTH_PREFIX, MAX_DATA, MAX_DIGEST_BLOCKS, MAX_ERROR_TEXT, MAX_FRAME_LEN, MAX_SNAPSHOT_NAMES,
    MAX_UNSETTLED_REGIONS, OLDEST_VERSION, VERSION,
};
use super::{
    check, kind_version, ERR_IO, ERR_NOT_IN_SYNC, ERR_NOT_REPLICA, ERR_NO_SPACE, ERR_OUT_OF_RANGE,
    ERR_SEQ_GAP, ERR_STALE_GENERATION, ERR_UNKNOWN_VOLUME, KIND_DIGESTS, KIND_DIGESTS_REPLY,
    KIND_FENCE, KIND_FLUSH, KIND_READ, KIND_READ_REPLY, KIND_REPLY, KIND_RESIZE, KIND_SNAPSHOT,
    KIND_SNAPSHOT_LIST, KIND_SNAPSHOT_LIST_REPLY, KIND_TRIM, KIND_UNSETTLED, KIND_UNSETTLED_REPLY,
    KIND_WRITE, KIND_WRITE_ZEROES,
};
use super::{
    KIND_REPAIR, KIND_REPAIR_REPLY, KIND_SNAPSHOT_AT, KIND_SNAPSHOT_READ, REPAIR_MISMATCH,
    REPAIR_NOT_NEEDED, REPAIR_REWRITTEN,
};

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
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(WireError::UnknownVersion(version));
    }
    let kind = r.u8("kind")?;
    match kind_version(kind) {
        None => return Err(WireError::UnknownKind(kind)),
        Some(since) if since > version => {
            return Err(WireError::KindNotInVersion { kind, version })
        }
        Some(_) => {}
    }
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
        KIND_SNAPSHOT | KIND_SNAPSHOT_AT => {
            let (volume, generation) = r.target()?;
            let seq = r.u64("seq")?;
            let name = r.name("snapshot name length", "snapshot name")?;
            let size = if kind == KIND_SNAPSHOT_AT {
                Some(r.u64("size")?)
            } else {
                None
            };
            Message::Snapshot {
                volume,
                generation,
                seq,
                name,
                size,
            }
        }
        KIND_RESIZE => {
            let (volume, generation) = r.target()?;
            Message::Resize {
                volume,
                generation,
                seq: r.u64("seq")?,
                size: r.u64("size")?,
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
        KIND_SNAPSHOT_READ => {
            let (volume, generation) = r.target()?;
            Message::SnapshotRead {
                volume,
                generation,
                request: r.u64("request")?,
                snapshot: r.name("snapshot name length", "snapshot name")?,
                offset: r.u64("offset")?,
                len: r.u32("len")?,
            }
        }
        KIND_REPAIR => {
            let (volume, generation) = r.target()?;
            let request = r.u64("request")?;
            let snapshot = match r.u8("snapshot flag")? {
                0 => None,
                1 => Some(r.name("snapshot name length", "snapshot name")?),
                v => {
                    return Err(WireError::BadValue {
                        field: "snapshot flag",
                        value: u64::from(v),
                    })
                }
            };
            Message::Repair {
                volume,
                generation,
                request,
                snapshot,
                offset: r.u64("offset")?,
                data: r.bytes("data", BLOCK_SIZE as usize)?,
            }
        }
        KIND_REPAIR_REPLY => {
            let request = r.u64("request")?;
            let result = match r.status()? {
                None => Ok(match r.u8("repair outcome")? {
                    REPAIR_REWRITTEN => RepairOutcome::Rewritten,
                    REPAIR_NOT_NEEDED => RepairOutcome::NotNeeded,
                    REPAIR_MISMATCH => RepairOutcome::Mismatch,
                    v => {
                        return Err(WireError::BadValue {
                            field: "repair outcome",
                            value: u64::from(v),
                        })
                    }
                }),
                Some(e) => Err(e),
            };
            Message::RepairReply { request, result }
        }
        KIND_UNSETTLED => {
            let (volume, generation) = r.target()?;
            Message::Unsettled {
                volume,
                generation,
                request: r.u64("request")?,
            }
        }
        KIND_UNSETTLED_REPLY => {
            let request = r.u64("request")?;
            let result = match r.status()? {
                None => {
                    let count = r.u32("region count")?;
                    if count > MAX_UNSETTLED_REGIONS {
                        return Err(WireError::BadLength {
                            field: "region count",
                            value: u64::from(count),
                        });
                    }
                    // Checked against what is there before anything is allocated for it.
                    let raw = r.take("regions", count as usize * 16)?;
                    Ok(raw
                        .chunks_exact(16)
                        .map(|c| {
                            let mut o = [0; 8];
                            let mut l = [0; 8];
                            o.copy_from_slice(&c[..8]);
                            l.copy_from_slice(&c[8..]);
                            (u64::from_be_bytes(o), u64::from_be_bytes(l))
                        })
                        .collect())
                }
                Some(e) => Err(e),
            };
            Message::UnsettledReply { request, result }
        }
        KIND_SNAPSHOT_LIST => {
            let (volume, generation) = r.target()?;
            Message::SnapshotList {
                volume,
                generation,
                request: r.u64("request")?,
            }
        }
        KIND_SNAPSHOT_LIST_REPLY => {
            let request = r.u64("request")?;
            let result = match r.status()? {
                None => {
                    let count = r.u32("snapshot count")?;
                    if count > MAX_SNAPSHOT_NAMES {
                        return Err(WireError::BadLength {
                            field: "snapshot count",
                            value: u64::from(count),
                        });
                    }
                    // Each name is at least 2 bytes: a count the body cannot hold is
                    // refused before anything is allocated for it.
                    if r.rest.len() < count as usize * 2 {
                        return Err(WireError::Truncated {
                            field: "snapshot names",
                        });
                    }
                    let mut names = Vec::with_capacity(count as usize);
                    for _ in 0..count {
                        names.push(r.name("snapshot name length", "snapshot name")?);
                    }
                    Ok(names)
                }
                Some(e) => Err(e),
            };
            Message::SnapshotListReply { request, result }
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
