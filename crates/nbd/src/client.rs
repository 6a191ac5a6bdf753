//! A small blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple replies, one request
//! at a time. Used by the VMM's NBD disk backend and by tests that need exact control.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

use thiserror::Error;

use crate::proto::{self, Request};

/// What can go wrong talking to a server.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
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
        let mut head = [0u8; 18];
        s.read_exact(&mut head)?;
        if u64::from_be_bytes(arr(&head[0..8])) != proto::NBD_MAGIC
            || u64::from_be_bytes(arr(&head[8..16])) != proto::IHAVEOPT
        {
            return Err(ClientError::Protocol("not a newstyle NBD server".into()));
        }
        let sflags = u16::from_be_bytes([head[16], head[17]]);
        if sflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol("server is not fixed-newstyle".into()));
        }
        let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
        if sflags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::CLIENT_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let mut rh = [0u8; 20];
            s.read_exact(&mut rh)?;
            if u64::from_be_bytes(arr(&rh[0..8])) != proto::OPT_REPLY_MAGIC {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            let kind = u32::from_be_bytes(arr4(&rh[12..16]));
            let len = u32::from_be_bytes(arr4(&rh[16..20]));
            if len > proto::MAX_OPTION_LEN {
                return Err(ClientError::Protocol("option reply too large".into()));
            }
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body)?;
            match kind {
                proto::REP_ACK => break,
                proto::REP_INFO
                    if body.len() >= 12 && body[0..2] == proto::INFO_EXPORT.to_be_bytes() =>
                {
                    size = Some(u64::from_be_bytes(arr(&body[2..10])));
                    flags = u16::from_be_bytes([body[10], body[11]]);
                }
                proto::REP_INFO => {}
                k if k & (1 << 31) != 0 => {
                    return Err(ClientError::Refused {
                        option: proto::OPT_GO,
                        reply: k,
                        message: String::from_utf8_lossy(&body).into_owned(),
                    })
                }
                k => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected option reply {k}"
                    )))
                }
            }
        }
        let size =
            size.ok_or_else(|| ClientError::Protocol("no NBD_INFO_EXPORT before ACK".into()))?;
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
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h)?;
        if u32::from_be_bytes(arr4(&h[0..4])) != proto::SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol("bad reply magic".into()));
        }
        if u64::from_be_bytes(arr(&h[8..16])) != self.cookie {
            return Err(ClientError::Protocol("reply for an unknown cookie".into()));
        }
        match u32::from_be_bytes(arr4(&h[4..8])) {
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

fn arr(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    a
}

fn arr4(s: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    a
}
