//! The streaming decoder: bytes in as they arrive, whole messages out.

use super::super::{Message, WireError, LENGTH_PREFIX, VERSION};
use super::{decode_body, frame_body_len};

/// A streaming decoder: push bytes as they arrive, take whole messages out.
///
/// Memory stays bounded by one frame when the caller pushes at most [`Decoder::wants`]
/// bytes at a time: a length prefix above [`MAX_FRAME_LEN`] fails as soon as its four bytes
/// are in, before the body is read. After an error the decoder refuses everything
/// ([`WireError::Poisoned`]): the stream is out of step and must be closed.
///
/// A caller may also push more than it wants (whole reads, so many small frames cost one
/// read): memory then stays bounded by one frame plus what one push adds, as long as it
/// takes every whole message out before the next push.
#[derive(Debug)]
pub struct Decoder {
    /// The newest protocol version a frame may be of (the connection's, once negotiated).
    negotiated: u8,
    buf: Vec<u8>,
    /// Where the undecoded bytes of `buf` start: decoded frames are not moved out one at
    /// a time (many small frames in one push would make that quadratic).
    start: usize,
    poisoned: bool,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new()
    }
}

impl Decoder {
    /// An empty decoder at a frame boundary, taking frames of every version this crate
    /// speaks.
    pub fn new() -> Decoder {
        Decoder::speaking(VERSION)
    }

    /// An empty decoder for a connection that negotiated protocol version `negotiated`:
    /// a frame of a newer version is refused ([`WireError::NotNegotiated`]), as a peer
    /// that speaks only that version would refuse it.
    pub fn speaking(negotiated: u8) -> Decoder {
        Decoder {
            negotiated,
            buf: Vec::new(),
            start: 0,
            poisoned: false,
        }
    }

    /// How many more bytes the next step needs: the rest of the length prefix, or the
    /// rest of the frame. Zero when a whole message is buffered (call `next_message`).
    pub fn wants(&self) -> usize {
        let have = self.buffered();
        if have < LENGTH_PREFIX {
            return LENGTH_PREFIX - have;
        }
        match self.prefix_len() {
            Ok(len) => (LENGTH_PREFIX + len).saturating_sub(have),
            Err(_) => 0,
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True when no partial frame is buffered (a clean place for the stream to end).
    pub fn at_boundary(&self) -> bool {
        self.buffered() == 0
    }

    /// Adds received bytes; fails at once on an oversize or too-short length prefix.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        if self.start > 0 {
            // What was decoded goes now, once per push, not once per frame.
            self.buf.drain(..self.start);
            self.start = 0;
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
        if self.buffered() < LENGTH_PREFIX {
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
        if self.buffered() < end {
            return Ok(None);
        }
        let body = &self.buf[self.start + LENGTH_PREFIX..self.start + end];
        let result = match body.first() {
            Some(&v) if v > self.negotiated && v <= VERSION => Err(WireError::NotNegotiated {
                version: v,
                negotiated: self.negotiated,
            }),
            _ => decode_body(body),
        };
        self.start += end;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
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
        prefix.copy_from_slice(&self.buf[self.start..self.start + LENGTH_PREFIX]);
        frame_body_len(prefix)
    }
}
