//! The live-migration stream, defined once for both ends (the source and the target are
//! the same program): a preamble with the format version, then messages, each a one-byte
//! tag and its fields, integers little-endian.
//!
//! ```text
//! source -> target   preamble "TESSERA-MIGRATE\0" + u32 version
//!                    Hello (JSON: token, spec, memory layout, disk)
//! target -> source   Accept | Refuse
//! source -> target   Pages / Zeroes (repeated: the pre-copy rounds, then the last dirty
//!                    pages), Scrollback, State (JSON: vCPUs, VM, devices)
//! target -> source   Loaded | Refuse        (the target holds everything, not running)
//! target -> source   Resumed                (the guest runs on the target)
//! ```
//!
//! Everything read is untrusted: lengths are bounded before anything is allocated, page
//! runs must be whole pages, and the decoder refuses unknown tags.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Format version; a target refuses a preamble with another.
pub const VERSION: u32 = 1;
/// What starts every stream.
pub const MAGIC: &[u8; 16] = b"TESSERA-MIGRATE\0";
/// A guest page.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `Pages` or `Zeroes` message (1 MiB of data).
pub const MAX_PAGES: u32 = 256;
/// Longest `Hello` or `Refuse` text.
pub const MAX_TEXT: u32 = 64 << 10;
/// Longest `State` document.
pub const MAX_STATE: u32 = 16 << 20;
/// Longest console scrollback carried over.
pub const MAX_SCROLLBACK: u32 = 256 << 10;

/// The VM's disk as the target needs to know it before it can open it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskInfo {
    /// Size in bytes (the guest has seen it; the target's disk must have the same).
    pub size: u64,
    /// Whether the guest sees it read-only.
    pub read_only: bool,
}

/// The source's first message: who it is for and what comes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The target's one-time token (it proves the stream is the migration the target was
    /// started for, not any node of the cluster).
    pub token: String,
    /// The VM's spec on the source.
    pub spec: VmConfig,
    /// Guest memory regions (guest-physical start, length).
    pub memory: Vec<(u64, u64)>,
    /// The disk, if the VM has one.
    pub disk: Option<DiskInfo>,
}

/// One message of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Source: what is migrated.
    Hello(Box<Hello>),
    /// Target: go on.
    Accept,
    /// Either side: why it stops; the stream ends.
    Refuse(String),
    /// Source: guest pages from `gpa`, whole pages.
    Pages {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// The pages' bytes.
        data: Vec<u8>,
    },
    /// Source: `pages` pages of zeroes from `gpa`.
    Zeroes {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// How many.
        pages: u32,
    },
    /// Source: the serial console's recent output, from absolute offset `start`.
    Scrollback {
        /// Offset of the first byte in the console's whole output.
        start: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Source: the paused VM's state (a [`crate::snapshot::Snapshot`] as JSON); the last
    /// message of the source's part.
    State(Vec<u8>),
    /// Target: it holds the whole VM and can run it when told.
    Loaded,
    /// Target: the guest runs there.
    Resumed,
}

/// Why a stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or ended.
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    /// Not a migration stream.
    #[error("not a Tessera migration stream")]
    Magic,
    /// Another format version.
    #[error("migration format version {0} (this VMM speaks {VERSION})")]
    Version(u32),
    /// A tag no message has.
    #[error("unknown migration message {0}")]
    UnknownTag(u8),
    /// A length beyond its bound, or pages that are not whole.
    #[error("migration message {what}: {len} is out of bounds")]
    Bounds {
        /// Which field.
        what: &'static str,
        /// Its value.
        len: u64,
    },
    /// A JSON part that does not parse.
    #[error("migration {what}: {error}")]
    Json {
        /// Which message.
        what: &'static str,
        /// Why.
        error: serde_json::Error,
    },
}

const HELLO: u8 = 1;
const ACCEPT: u8 = 2;
const REFUSE: u8 = 3;
const PAGES: u8 = 4;
const ZEROES: u8 = 5;
const SCROLLBACK: u8 = 6;
const STATE: u8 = 7;
const LOADED: u8 = 8;
const RESUMED: u8 = 9;

/// Writes the stream's preamble.
pub fn write_preamble<W: Write + ?Sized>(w: &mut W) -> Result<(), WireError> {
    w.write_all(MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    Ok(())
}

/// Reads and checks the stream's preamble.
pub fn read_preamble<R: Read + ?Sized>(r: &mut R) -> Result<(), WireError> {
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(WireError::Magic);
    }
    let v = u32_of(r)?;
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    Ok(())
}

/// Writes the header of a `Pages` message whose `pages` pages the caller writes next
/// (straight from guest memory, without a copy into a message).
pub fn write_pages_header<W: Write + ?Sized>(
    w: &mut W,
    gpa: u64,
    pages: u32,
) -> Result<(), WireError> {
    if pages == 0 || pages > MAX_PAGES {
        return Err(WireError::Bounds {
            what: "page count",
            len: u64::from(pages),
        });
    }
    let mut h = [0u8; 13];
    h[0] = PAGES;
    h[1..9].copy_from_slice(&gpa.to_le_bytes());
    h[9..13].copy_from_slice(&pages.to_le_bytes());
    w.write_all(&h)?;
    Ok(())
}

fn bytes_field<W: Write + ?Sized>(
    w: &mut W,
    tag: u8,
    data: &[u8],
    max: u32,
) -> Result<(), WireError> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|l| *l <= max)
        .ok_or(WireError::Bounds {
            what: "length",
            len: data.len() as u64,
        })?;
    w.write_all(&[tag])?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(data)?;
    Ok(())
}

/// Writes one message.
pub fn write<W: Write + ?Sized>(w: &mut W, m: &Message) -> Result<(), WireError> {
    match m {
        Message::Hello(h) => {
            let text = serde_json::to_vec(h).map_err(|error| WireError::Json {
                what: "hello",
                error,
            })?;
            bytes_field(w, HELLO, &text, MAX_TEXT)
        }
        Message::Accept => Ok(w.write_all(&[ACCEPT])?),
        Message::Refuse(why) => {
            // A reason is for people: cut it rather than fail to say it.
            let mut end = why.len().min(MAX_TEXT as usize);
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            bytes_field(w, REFUSE, &why.as_bytes()[..end], MAX_TEXT)
        }
        Message::Pages { gpa, data } => {
            if data.is_empty() || data.len() % PAGE_SIZE != 0 {
                return Err(WireError::Bounds {
                    what: "page data",
                    len: data.len() as u64,
                });
            }
            let pages = u32::try_from(data.len() / PAGE_SIZE).unwrap_or(u32::MAX);
            write_pages_header(w, *gpa, pages)?;
            Ok(w.write_all(data)?)
        }
        Message::Zeroes { gpa, pages } => {
            if *pages == 0 || *pages > MAX_PAGES {
                return Err(WireError::Bounds {
                    what: "page count",
                    len: u64::from(*pages),
                });
            }
            let mut h = [0u8; 13];
            h[0] = ZEROES;
            h[1..9].copy_from_slice(&gpa.to_le_bytes());
            h[9..13].copy_from_slice(&pages.to_le_bytes());
            Ok(w.write_all(&h)?)
        }
        Message::Scrollback { start, data } => {
            w.write_all(&[SCROLLBACK])?;
            w.write_all(&start.to_le_bytes())?;
            let len = u32::try_from(data.len())
                .ok()
                .filter(|l| *l <= MAX_SCROLLBACK)
                .ok_or(WireError::Bounds {
                    what: "scrollback",
                    len: data.len() as u64,
                })?;
            w.write_all(&len.to_le_bytes())?;
            Ok(w.write_all(data)?)
        }
        Message::State(doc) => bytes_field(w, STATE, doc, MAX_STATE),
        Message::Loaded => Ok(w.write_all(&[LOADED])?),
        Message::Resumed => Ok(w.write_all(&[RESUMED])?),
    }
}

fn u32_of<R: Read + ?Sized>(r: &mut R) -> Result<u32, WireError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_of<R: Read + ?Sized>(r: &mut R) -> Result<u64, WireError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn bounded<R: Read + ?Sized>(
    r: &mut R,
    what: &'static str,
    max: u32,
) -> Result<Vec<u8>, WireError> {
    let len = u32_of(r)?;
    if len > max {
        return Err(WireError::Bounds {
            what,
            len: u64::from(len),
        });
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn page_count<R: Read + ?Sized>(r: &mut R) -> Result<u32, WireError> {
    let pages = u32_of(r)?;
    if pages == 0 || pages > MAX_PAGES {
        return Err(WireError::Bounds {
            what: "page count",
            len: u64::from(pages),
        });
    }
    Ok(pages)
}

/// Reads one message.
pub fn read<R: Read + ?Sized>(r: &mut R) -> Result<Message, WireError> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag)?;
    Ok(match tag[0] {
        HELLO => {
            let text = bounded(r, "hello", MAX_TEXT)?;
            let h: Hello = serde_json::from_slice(&text).map_err(|error| WireError::Json {
                what: "hello",
                error,
            })?;
            Message::Hello(Box::new(h))
        }
        ACCEPT => Message::Accept,
        REFUSE => {
            let text = bounded(r, "refusal", MAX_TEXT)?;
            Message::Refuse(String::from_utf8_lossy(&text).into_owned())
        }
        PAGES => {
            let gpa = u64_of(r)?;
            let pages = page_count(r)?;
            let mut data = vec![0u8; pages as usize * PAGE_SIZE];
            r.read_exact(&mut data)?;
            Message::Pages { gpa, data }
        }
        ZEROES => {
            let gpa = u64_of(r)?;
            let pages = page_count(r)?;
            Message::Zeroes { gpa, pages }
        }
        SCROLLBACK => {
            let start = u64_of(r)?;
            let data = bounded(r, "scrollback", MAX_SCROLLBACK)?;
            Message::Scrollback { start, data }
        }
        STATE => Message::State(bounded(r, "state", MAX_STATE)?),
        LOADED => Message::Loaded,
        RESUMED => Message::Resumed,
        other => return Err(WireError::UnknownTag(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmConfig {
        serde_json::from_value(serde_json::json!({"kernel": "k", "memory_mib": 64})).unwrap()
    }

    fn round_trip(m: Message) {
        let mut buf = Vec::new();
        write(&mut buf, &m).unwrap();
        let mut r = &buf[..];
        assert_eq!(read(&mut r).unwrap(), m);
        assert!(r.is_empty(), "{m:?} left bytes behind");
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Message::Hello(Box::new(Hello {
            token: "t0k3n".into(),
            spec: spec(),
            memory: vec![(0, 64 << 20)],
            disk: Some(DiskInfo {
                size: 16 << 20,
                read_only: false,
            }),
        })));
        round_trip(Message::Accept);
        round_trip(Message::Refuse("wrong token".into()));
        round_trip(Message::Pages {
            gpa: 0x1000,
            data: vec![7u8; 2 * PAGE_SIZE],
        });
        round_trip(Message::Zeroes {
            gpa: 1 << 32,
            pages: MAX_PAGES,
        });
        round_trip(Message::Scrollback {
            start: 99,
            data: b"count 1\n".to_vec(),
        });
        round_trip(Message::State(b"{}".to_vec()));
        round_trip(Message::Loaded);
        round_trip(Message::Resumed);
        let mut buf = Vec::new();
        write_preamble(&mut buf).unwrap();
        read_preamble(&mut &buf[..]).unwrap();
    }

    #[test]
    fn malformed_streams_are_refused_before_allocating() {
        let err = |bytes: &[u8]| read(&mut &bytes[..]).unwrap_err().to_string();
        assert!(err(&[42]).contains("unknown migration message 42"));
        // A state of 4 GiB is refused from its length alone.
        assert!(err(&[STATE, 0xff, 0xff, 0xff, 0xff]).contains("out of bounds"));
        let mut pages = vec![PAGES];
        pages.extend_from_slice(&0u64.to_le_bytes());
        pages.extend_from_slice(&(MAX_PAGES + 1).to_le_bytes());
        assert!(err(&pages).contains("page count"));
        let mut none = vec![ZEROES];
        none.extend_from_slice(&0u64.to_le_bytes());
        none.extend_from_slice(&0u32.to_le_bytes());
        assert!(err(&none).contains("page count"));
        // Cut short: an I/O error, not a message.
        let mut short = vec![PAGES];
        short.extend_from_slice(&0u64.to_le_bytes());
        short.extend_from_slice(&1u32.to_le_bytes());
        short.extend_from_slice(&[0u8; 100]);
        assert!(matches!(
            read(&mut &short[..]),
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
        let mut hello = vec![HELLO];
        hello.extend_from_slice(&2u32.to_le_bytes());
        hello.extend_from_slice(b"{}");
        assert!(err(&hello).contains("migration hello"));
        assert!(matches!(
            read_preamble(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]),
            Err(WireError::Magic)
        ));
        let mut v2 = MAGIC.to_vec();
        v2.extend_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            read_preamble(&mut &v2[..]),
            Err(WireError::Version(2))
        ));
    }

    #[test]
    fn writers_refuse_what_a_reader_would() {
        let mut sink = Vec::new();
        assert!(write(
            &mut sink,
            &Message::Pages {
                gpa: 0,
                data: vec![0; 100]
            }
        )
        .is_err());
        assert!(write(&mut sink, &Message::Zeroes { gpa: 0, pages: 0 }).is_err());
        assert!(write_pages_header(&mut sink, 0, MAX_PAGES + 1).is_err());
        // A long refusal is cut, not refused.
        let long = "é".repeat(MAX_TEXT as usize);
        write(&mut sink, &Message::Refuse(long)).unwrap();
    }
}
