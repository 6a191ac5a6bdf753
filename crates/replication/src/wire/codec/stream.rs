//! The streaming decoder: bytes in as they arrive, whole messages out.

use super::super::{Message, WireError, LENGTH_PREFIX};
use super::{decode_body, frame_body_len};

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
