//! The client side of fixed-newstyle negotiation as pure steps, shared by the blocking
//! [`crate::client`] and the pipelined [`crate::client_pipelined`]: each reads and writes
//! its own way (blocking or async) and hands the bytes here, so the rules live once.

use crate::client::ClientError;
use crate::proto::{self, Greeting, Info, OptionReplyHeader, GREETING_LEN};

/// Checks the server's greeting and gives the client flags to answer with.
pub(crate) fn client_flags(greeting: &[u8; GREETING_LEN]) -> Result<u32, ClientError> {
    let greeting = Greeting::decode(greeting)?;
    if greeting.flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server is not fixed-newstyle".into()));
    }
    let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
    if greeting.flags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::CLIENT_NO_ZEROES;
    }
    Ok(cflags)
}

/// The length of an option reply's body, refused when over the protocol's cap so a server
/// cannot make the client allocate at will.
pub(crate) fn reply_body_len(reply: &OptionReplyHeader) -> Result<usize, ClientError> {
    if reply.length > proto::MAX_OPTION_LEN {
        return Err(ClientError::Protocol("option reply too large".into()));
    }
    usize::try_from(reply.length)
        .map_err(|_| ClientError::Protocol("option reply too large".into()))
}

/// The opened export: its size and transmission flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    pub size: u64,
    pub flags: u16,
}

/// The replies to `NBD_OPT_GO`, folded one at a time until the server's ACK.
#[derive(Debug, Default)]
pub(crate) struct GoReplies {
    size: Option<u64>,
    flags: u16,
}

impl GoReplies {
    /// Takes one reply; `Some` once the export is open.
    pub(crate) fn on_reply(
        &mut self,
        reply: &OptionReplyHeader,
        body: &[u8],
    ) -> Result<Option<Opened>, ClientError> {
        if reply.kind == proto::REP_ERR_TLS_REQD {
            return Err(ClientError::Tls(
                "the server requires TLS (use an nbds:// URI with credentials)".into(),
            ));
        }
        if reply.is_error() {
            return Err(ClientError::Refused {
                option: proto::OPT_GO,
                reply: reply.kind,
                message: String::from_utf8_lossy(body).into_owned(),
            });
        }
        match reply.kind {
            proto::REP_ACK => {
                let size = self
                    .size
                    .ok_or_else(|| ClientError::Protocol("no NBD_INFO_EXPORT before ACK".into()))?;
                Ok(Some(Opened {
                    size,
                    flags: self.flags,
                }))
            }
            proto::REP_INFO => {
                // Other information (block sizes, name) is not needed by our clients.
                if let Info::Export { size, flags } = Info::decode(body)? {
                    self.size = Some(size);
                    self.flags = flags;
                }
                Ok(None)
            }
            k => Err(ClientError::Protocol(format!(
                "unexpected option reply {k}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: u32, body: &[u8]) -> OptionReplyHeader {
        OptionReplyHeader {
            option: proto::OPT_GO,
            kind,
            length: body.len() as u32,
        }
    }

    #[test]
    fn an_old_style_server_is_refused_and_no_zeroes_is_echoed() {
        let old = Greeting { flags: 0 }.encode();
        assert!(matches!(client_flags(&old), Err(ClientError::Protocol(_))));
        let both = Greeting {
            flags: proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        }
        .encode();
        assert_eq!(
            client_flags(&both).unwrap(),
            proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES
        );
    }

    #[test]
    fn go_opens_only_after_the_export_info_and_the_ack() {
        let mut go = GoReplies::default();
        let name = Info::Name("v".into()).encode();
        assert_eq!(
            go.on_reply(&reply(proto::REP_INFO, &name), &name).unwrap(),
            None
        );
        let ack = reply(proto::REP_ACK, &[]);
        assert!(matches!(
            GoReplies::default().on_reply(&ack, &[]),
            Err(ClientError::Protocol(_))
        ));
        let info = Info::Export {
            size: 1 << 20,
            flags: 3,
        }
        .encode();
        assert_eq!(
            go.on_reply(&reply(proto::REP_INFO, &info), &info).unwrap(),
            None
        );
        assert_eq!(
            go.on_reply(&ack, &[]).unwrap(),
            Some(Opened {
                size: 1 << 20,
                flags: 3
            })
        );
    }

    #[test]
    fn refusals_say_what_the_server_said() {
        let msg = b"no such export";
        let err = GoReplies::default()
            .on_reply(&reply(proto::REP_ERR_UNKNOWN, msg), msg)
            .unwrap_err();
        assert!(err.to_string().contains("no such export"), "{err}");
        let tls = GoReplies::default()
            .on_reply(&reply(proto::REP_ERR_TLS_REQD, &[]), &[])
            .unwrap_err();
        assert!(matches!(tls, ClientError::Tls(_)));
        let big = OptionReplyHeader {
            option: proto::OPT_GO,
            kind: proto::REP_INFO,
            length: proto::MAX_OPTION_LEN + 1,
        };
        assert!(reply_body_len(&big).is_err());
    }
}
