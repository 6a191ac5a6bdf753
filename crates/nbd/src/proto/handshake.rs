//! Negotiation-phase messages: the server's greeting, the client's options and the
//! server's option replies. The server decodes options and encodes replies; the client
//! encodes options and decodes replies, with the same functions.

use super::{
    expect_magic, put_string, Cursor, DecodeError, Put, BASE_ALLOCATION, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, NBD_MAGIC, OPT_REPLY_MAGIC, REP_FLAG_ERROR,
};

/// Size of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Size of an option header (the payload follows).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (the payload follows).
pub const OPTION_REPLY_LEN: usize = 20;
/// Size of the reply to `NBD_OPT_EXPORT_NAME`, without the optional 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;

/// The server's first message: `NBDMAGIC`, `IHAVEOPT` and its handshake flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// `FLAG_*` handshake flags.
    pub flags: u16,
}

impl Greeting {
    /// Encodes the greeting.
    pub fn encode(&self) -> [u8; GREETING_LEN] {
        Put::new()
            .u64(NBD_MAGIC)
            .u64(IHAVEOPT)
            .u16(self.flags)
            .done()
    }

    /// Decodes the greeting; anything else is not a newstyle NBD server.
    pub fn decode(b: &[u8; GREETING_LEN]) -> Result<Greeting, DecodeError> {
        let mut c = Cursor::new(b, "greeting");
        expect_magic("NBD greeting", c.u64()?, NBD_MAGIC)?;
        expect_magic("newstyle greeting", c.u64()?, IHAVEOPT)?;
        Ok(Greeting { flags: c.u16()? })
    }
}

/// The header of a client option; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// `OPT_*`.
    pub option: u32,
    /// Payload length.
    pub length: u32,
}

impl OptionHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        Put::new()
            .u64(IHAVEOPT)
            .u32(self.option)
            .u32(self.length)
            .done()
    }

    /// Decodes the header.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, DecodeError> {
        let mut c = Cursor::new(b, "option");
        expect_magic("option", c.u64()?, IHAVEOPT)?;
        Ok(OptionHeader {
            option: c.u32()?,
            length: c.u32()?,
        })
    }

    /// A whole option: header and payload.
    pub fn with_payload(option: u32, payload: &[u8]) -> Vec<u8> {
        let head = OptionHeader {
            option,
            length: payload.len() as u32,
        };
        let mut out = Vec::with_capacity(OPTION_HEADER_LEN + payload.len());
        out.extend_from_slice(&head.encode());
        out.extend_from_slice(payload);
        out
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name.
    pub name: String,
    /// Info types the client asked for.
    pub info: Vec<u16>,
}

impl GoRequest {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len() + 2 + 2 * self.info.len());
        put_string(&mut out, &self.name);
        out.extend_from_slice(&(self.info.len() as u16).to_be_bytes());
        for i in &self.info {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }

    /// Decodes the payload.
    pub fn decode(data: &[u8]) -> Result<GoRequest, DecodeError> {
        let mut c = Cursor::new(data, "option payload");
        let name = c.string()?;
        let n = c.u16()?;
        let info = c.repeat(n.into(), Cursor::u16)?;
        c.finish()?;
        Ok(GoRequest { name, info })
    }
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Query strings.
    pub queries: Vec<String>,
}

impl MetaRequest {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string(&mut out, q);
        }
        out
    }

    /// Decodes the payload.
    pub fn decode(data: &[u8]) -> Result<MetaRequest, DecodeError> {
        let mut c = Cursor::new(data, "option payload");
        let export = c.string()?;
        let n = c.u32()?;
        let queries = c.repeat(n as usize, Cursor::string)?;
        c.finish()?;
        Ok(MetaRequest { export, queries })
    }
}

/// Which of our contexts a query selects: `base:allocation` by its name, and for LIST
/// also by the namespace `base:`.
pub fn query_matches(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

/// The header of an option reply; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// `REP_*`.
    pub kind: u32,
    /// Payload length.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; OPTION_REPLY_LEN] {
        Put::new()
            .u64(OPT_REPLY_MAGIC)
            .u32(self.option)
            .u32(self.kind)
            .u32(self.length)
            .done()
    }

    /// Decodes the header.
    pub fn decode(b: &[u8; OPTION_REPLY_LEN]) -> Result<OptionReplyHeader, DecodeError> {
        let mut c = Cursor::new(b, "option reply");
        expect_magic("option reply", c.u64()?, OPT_REPLY_MAGIC)?;
        Ok(OptionReplyHeader {
            option: c.u32()?,
            kind: c.u32()?,
            length: c.u32()?,
        })
    }

    /// Whether the option was refused (the payload is then a message for humans).
    pub fn is_error(&self) -> bool {
        self.kind & REP_FLAG_ERROR != 0
    }
}

/// Payload of `NBD_REP_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// `TF_*` transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest payload.
        max: u32,
    },
    /// A type this codec does not know; clients ignore it.
    Other {
        /// The info type.
        kind: u16,
        /// Its payload after the type.
        data: Vec<u8>,
    },
}

impl Info {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(14);
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(name) => {
                out.extend_from_slice(&INFO_NAME.to_be_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            Info::Description(d) => {
                out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                out.extend_from_slice(d.as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                for v in [min, preferred, max] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Info::Other { kind, data } => {
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(data);
            }
        }
        out
    }

    /// Decodes the payload; known types must have their exact layout.
    pub fn decode(payload: &[u8]) -> Result<Info, DecodeError> {
        let mut c = Cursor::new(payload, "export information");
        let info = match c.u16()? {
            INFO_EXPORT => Info::Export {
                size: c.u64()?,
                flags: c.u16()?,
            },
            INFO_NAME => Info::Name(c.rest_utf8("export name")?),
            INFO_DESCRIPTION => Info::Description(c.rest_utf8("export description")?),
            INFO_BLOCK_SIZE => Info::BlockSize {
                min: c.u32()?,
                preferred: c.u32()?,
                max: c.u32()?,
            },
            kind => Info::Other {
                kind,
                data: std::mem::take(&mut c.rest).to_vec(),
            },
        };
        c.finish()?;
        Ok(info)
    }
}

/// Payload of `NBD_REP_SERVER`: one export in reply to `NBD_OPT_LIST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportEntry {
    /// Name clients ask for.
    pub name: String,
    /// Free text shown by `nbdinfo --list`.
    pub description: String,
}

impl ExportEntry {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len() + self.description.len());
        put_string(&mut out, &self.name);
        out.extend_from_slice(self.description.as_bytes());
        out
    }

    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<ExportEntry, DecodeError> {
        let mut c = Cursor::new(payload, "export list entry");
        let name = c.string()?;
        let description = c.rest_utf8("export description")?;
        Ok(ExportEntry { name, description })
    }
}

/// Payload of `NBD_REP_META_CONTEXT`: a context and the id the server gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContext {
    /// Id used in block status replies.
    pub id: u32,
    /// Context name, e.g. `base:allocation`.
    pub name: String,
}

impl MetaContext {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.id.to_be_bytes().to_vec();
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<MetaContext, DecodeError> {
        let mut c = Cursor::new(payload, "metadata context");
        let id = c.u32()?;
        let name = c.rest_utf8("context name")?;
        Ok(MetaContext { id, name })
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME` (the old way into transmission).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Size in bytes.
    pub size: u64,
    /// `TF_*` transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Encodes the reply, with the 124 zero bytes unless both sides agreed to omit them.
    pub fn encode(&self, zeroes: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(EXPORT_NAME_REPLY_LEN + 124);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        if zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        out
    }

    /// Decodes the reply without the zero bytes (a client that asked for them skips them).
    pub fn decode(b: &[u8; EXPORT_NAME_REPLY_LEN]) -> Result<ExportNameReply, DecodeError> {
        let mut c = Cursor::new(b, "export name reply");
        Ok(ExportNameReply {
            size: c.u64()?,
            flags: c.u16()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT_GO, REP_ERR_UNKNOWN, REP_INFO};
    use proptest::prelude::*;

    #[test]
    fn option_payloads_are_bounded() {
        let go = GoRequest {
            name: "vol".into(),
            info: vec![INFO_BLOCK_SIZE],
        }
        .encode();
        assert_eq!(&go[..7], b"\0\0\0\x03vol");
        assert_eq!(
            GoRequest::decode(&go).unwrap(),
            GoRequest {
                name: "vol".into(),
                info: vec![INFO_BLOCK_SIZE]
            }
        );
        assert!(GoRequest::decode(&go[..go.len() - 1]).is_err());
        let mut lying = go.clone();
        lying[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(GoRequest::decode(&lying), Err(DecodeError::TooLong));
        let mut trailing = go.clone();
        trailing.push(0);
        assert_eq!(
            GoRequest::decode(&trailing).map_err(|e| e.to_string()),
            Err("malformed option payload: trailing bytes".to_string())
        );
        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&u32::MAX.to_be_bytes()); // claims 4 billion queries
        assert!(MetaRequest::decode(&meta).is_err());
    }

    #[test]
    fn headers_refuse_a_wrong_magic() {
        let g = Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        let mut raw = g.encode();
        assert_eq!(&raw[..16], b"NBDMAGICIHAVEOPT");
        raw[8] = b'X';
        assert!(matches!(
            Greeting::decode(&raw),
            Err(DecodeError::BadMagic {
                what: "newstyle greeting",
                ..
            })
        ));
        let mut o = OptionHeader {
            option: OPT_GO,
            length: 9,
        }
        .encode();
        o[0] = 0;
        assert!(OptionHeader::decode(&o).is_err());
        let mut r = OptionReplyHeader {
            option: OPT_GO,
            kind: REP_INFO,
            length: 12,
        }
        .encode();
        r[7] ^= 0xff;
        assert!(OptionReplyHeader::decode(&r).is_err());
    }

    #[test]
    fn malformed_replies_are_refused() {
        let export = Info::Export {
            size: 1 << 30,
            flags: 3,
        }
        .encode();
        assert_eq!(export.len(), 12);
        assert!(Info::decode(&export[..11]).is_err(), "short export info");
        let mut long = export.clone();
        long.push(0);
        assert!(Info::decode(&long).is_err(), "trailing bytes");
        assert!(Info::decode(&[0]).is_err(), "no type");
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.push(0xff);
        assert_eq!(
            Info::decode(&name),
            Err(DecodeError::NotUtf8("export name"))
        );
        assert!(
            ExportEntry::decode(&[0, 0, 0, 9, b'v']).is_err(),
            "name runs past"
        );
        assert!(MetaContext::decode(&[0, 0, 1]).is_err(), "short id");
        assert!(OptionReplyHeader {
            option: OPT_GO,
            kind: REP_ERR_UNKNOWN,
            length: 0
        }
        .is_error());
    }

    #[test]
    fn export_name_reply_has_zeroes_only_when_asked() {
        let r = ExportNameReply {
            size: 4096,
            flags: 1,
        };
        assert_eq!(r.encode(true).len(), EXPORT_NAME_REPLY_LEN + 124);
        let short = r.encode(false);
        let mut b = [0u8; EXPORT_NAME_REPLY_LEN];
        b.copy_from_slice(&short);
        assert_eq!(ExportNameReply::decode(&b), Ok(r));
    }

    fn name() -> impl Strategy<Value = String> {
        "\\PC{0,40}"
    }

    proptest! {
        #[test]
        fn options_round_trip(
            option: u32,
            name in name(),
            info in proptest::collection::vec(any::<u16>(), 0..8),
            queries in proptest::collection::vec(name(), 0..8),
        ) {
            let h = OptionHeader { option, length: 3 };
            prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
            let whole = OptionHeader::with_payload(option, b"abc");
            prop_assert_eq!(&whole[..OPTION_HEADER_LEN], &h.encode()[..]);
            prop_assert_eq!(&whole[OPTION_HEADER_LEN..], b"abc");
            let go = GoRequest { name: name.clone(), info };
            prop_assert_eq!(GoRequest::decode(&go.encode()), Ok(go));
            let meta = MetaRequest { export: name, queries };
            prop_assert_eq!(MetaRequest::decode(&meta.encode()), Ok(meta));
        }

        #[test]
        fn replies_round_trip(
            flags: u16,
            option: u32,
            kind: u32,
            length: u32,
            size: u64,
            sizes: (u32, u32, u32),
            other_kind in 4u16..,
            text in name(),
            data in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let g = Greeting { flags };
            prop_assert_eq!(Greeting::decode(&g.encode()), Ok(g));
            let r = OptionReplyHeader { option, kind, length };
            prop_assert_eq!(OptionReplyHeader::decode(&r.encode()), Ok(r));
            let infos = [
                Info::Export { size, flags },
                Info::Name(text.clone()),
                Info::Description(text.clone()),
                Info::BlockSize { min: sizes.0, preferred: sizes.1, max: sizes.2 },
                Info::Other { kind: other_kind, data },
            ];
            for info in infos {
                prop_assert_eq!(Info::decode(&info.encode()), Ok(info));
            }
            let e = ExportEntry { name: text.clone(), description: text.clone() };
            prop_assert_eq!(ExportEntry::decode(&e.encode()), Ok(e));
            let m = MetaContext { id: option, name: text };
            prop_assert_eq!(MetaContext::decode(&m.encode()), Ok(m));
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = GoRequest::decode(&data);
            let _ = MetaRequest::decode(&data);
            let _ = Info::decode(&data);
            let _ = ExportEntry::decode(&data);
            let _ = MetaContext::decode(&data);
            if data.len() >= OPTION_REPLY_LEN {
                let mut g = [0u8; GREETING_LEN];
                g.copy_from_slice(&data[..GREETING_LEN]);
                let _ = Greeting::decode(&g);
                let mut o = [0u8; OPTION_HEADER_LEN];
                o.copy_from_slice(&data[..OPTION_HEADER_LEN]);
                let _ = OptionHeader::decode(&o);
                let mut r = [0u8; OPTION_REPLY_LEN];
                r.copy_from_slice(&data[..OPTION_REPLY_LEN]);
                let _ = OptionReplyHeader::decode(&r);
            }
        }
    }
}
