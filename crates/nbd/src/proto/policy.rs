//! The request policy: which requests a negotiated session accepts, and the errno the
//! protocol prescribes for each one it refuses. Pure, so every rule is a unit test.

use super::{
    Errno, Request, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{REQUEST_LEN, REQUEST_MAGIC};

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

    proptest::proptest! {
        #[test]
        fn policy_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, REQUEST_LEN)) {
            let mut h = [0u8; REQUEST_LEN];
            h.copy_from_slice(&data);
            h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            if let Ok(r) = Request::decode(&h) {
                if let Ok(cmd) = check(&r, &session()) {
                    let (offset, len) = match cmd {
                        Command::Read { offset, len }
                        | Command::Write { offset, len, .. }
                        | Command::Trim { offset, len, .. }
                        | Command::WriteZeroes { offset, len, .. }
                        | Command::BlockStatus { offset, len, .. } => (offset, u64::from(len)),
                        Command::Flush | Command::Disconnect => (0, 0),
                    };
                    proptest::prop_assert!(offset + len <= session().size);
                }
            }
        }
    }
}
