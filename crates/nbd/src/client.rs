//! A small blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple replies, one request
//! at a time. Used by tests that need exact control; the VMM's disks use the pipelined,
//! reconnecting [`crate::client_pipelined`].
//! Every message goes through [`crate::proto`], the codec the server uses.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

use thiserror::Error;

use crate::client_negotiation::{client_flags, reply_body_len, GoReplies, Opened};
use crate::proto::{
    self, DecodeError, GoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply,
    GREETING_LEN, OPTION_REPLY_LEN, SIMPLE_REPLY_LEN,
};

/// What can go wrong talking to a server.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server sent bytes that are not the message expected.
    #[error("NBD protocol violation: {0}")]
    Malformed(#[from] DecodeError),
    /// The server refused an option (e.g. unknown export).
    #[error("NBD server refused option {option}: reply {reply:#x}: {message}")]
    Refused {
        /// The option.
        option: u32,
        /// The error reply type.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// A request failed with this errno.
    #[error("NBD request failed with errno {0}")]
    Errno(u32),
    /// No reply within the request's deadline (reconnections included).
    #[error("NBD request timed out")]
    Timeout,
    /// TLS could not be set up (credentials, handshake, or a server that requires it).
    #[error("NBD TLS: {0}")]
    Tls(String),
    /// The client is shutting down.
    #[error("NBD client closed")]
    Closed,
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A connected client in the transmission phase.
pub struct Client {
    stream: Box<dyn Stream>,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl Client {
    /// Connects over TCP to `addr` and opens `export`.
    pub fn connect_tcp(addr: &str, export: &str) -> Result<Client, ClientError> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Self::handshake(Box::new(s), export)
    }

    /// Connects over a Unix socket and opens `export`.
    pub fn connect_unix(path: &Path, export: &str) -> Result<Client, ClientError> {
        Self::handshake(Box::new(UnixStream::connect(path)?), export)
    }

    fn handshake(mut s: Box<dyn Stream>, export: &str) -> Result<Client, ClientError> {
        let mut head = [0u8; GREETING_LEN];
        s.read_exact(&mut head)?;
        s.write_all(&client_flags(&head)?.to_be_bytes())?;
        let go = GoRequest {
            name: export.to_string(),
            info: Vec::new(),
        };
        s.write_all(&OptionHeader::with_payload(proto::OPT_GO, &go.encode()))?;
        let mut replies = GoReplies::default();
        let Opened { size, flags } = loop {
            let mut rh = [0u8; OPTION_REPLY_LEN];
            s.read_exact(&mut rh)?;
            let reply = OptionReplyHeader::decode(&rh)?;
            let mut body = vec![0u8; reply_body_len(&reply)?];
            s.read_exact(&mut body)?;
            if let Some(opened) = replies.on_reply(&reply, &body)? {
                break opened;
            }
        };
        Ok(Client {
            stream: s,
            size,
            flags,
            cookie: 0,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.cookie += 1;
        let req = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            length,
        };
        self.stream.write_all(&req.encode())?;
        self.stream.write_all(payload)?;
        self.stream.flush()?;
        Ok(())
    }

    fn reply(&mut self) -> Result<(), ClientError> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut h)?;
        let reply = SimpleReply::decode(&h)?;
        if reply.cookie != self.cookie {
            return Err(ClientError::Protocol("reply for an unknown cookie".into()));
        }
        match reply.error {
            0 => Ok(()),
            e => Err(ClientError::Errno(e)),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.request(proto::CMD_READ, 0, offset, len32(buf.len())?, &[])?;
        self.reply()?;
        self.stream.read_exact(buf)?;
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        self.request(proto::CMD_WRITE, flags, offset, len32(data.len())?, data)?;
        self.reply()
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.request(proto::CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply()
    }

    /// Discards a range.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(proto::CMD_TRIM, 0, offset, len, &[])?;
        self.reply()
    }

    /// Zeroes a range.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        let flags = if no_hole { proto::CMD_FLAG_NO_HOLE } else { 0 };
        self.request(proto::CMD_WRITE_ZEROES, flags, offset, len, &[])?;
        self.reply()
    }

    /// Says goodbye.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.request(proto::CMD_DISC, 0, 0, 0, &[])
    }
}

fn len32(n: usize) -> Result<u32, ClientError> {
    u32::try_from(n).map_err(|_| ClientError::Protocol("request longer than 4 GiB".into()))
}
