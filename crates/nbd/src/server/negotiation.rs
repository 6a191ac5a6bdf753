//! The negotiation phase: our greeting, then the client's options until it picks an export
//! (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), aborts or breaks the protocol.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Handle;

use super::{drain, ServerConfig, ALLOCATION_CONTEXT_ID};
use crate::device::{Device, Exports, Peer};
use crate::export_name;
use crate::proto::{
    self, ExportNameReply, GoRequest, Greeting, Info, MetaContext, MetaRequest, OptionHeader,
    OptionReplyHeader, OPTION_HEADER_LEN,
};

/// Minimum and preferred block size we advertise. Any alignment works (the store merges
/// partial blocks); 4 KiB is preferred because that is the store's block.
const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;
/// Option payloads up to this are drained when refused as too big; larger, we hang up.
const MAX_DRAIN: u32 = 16 << 20;

/// What negotiation ended with.
pub(super) struct Negotiated<D> {
    pub(super) device: Arc<D>,
    pub(super) structured: bool,
    pub(super) allocation_context: bool,
}

/// Sends our greeting and reads the client's flags; returns whether the client asked for
/// no zeroes, or `None` when it must be hung up on.
async fn greet<R, W>(r: &mut R, w: &mut W) -> io::Result<Option<bool>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greeting = Greeting {
        flags: proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    };
    w.write_all(&greeting.encode()).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        tracing::info!(
            client_flags,
            "NBD client sent unknown handshake flags; closing"
        );
        return Ok(None);
    }
    Ok(Some(client_flags & proto::CLIENT_NO_ZEROES != 0))
}

/// The options of a server that requires TLS, up to the client's `NBD_OPT_STARTTLS`
/// (acknowledged here; the handshake follows): greeting, then every other option refused
/// with `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME` (which cannot be refused) and
/// `NBD_OPT_ABORT` ending the connection. Returns whether the client asked for no
/// zeroes, or `None` when the connection ends.
pub(super) async fn before_tls<R, W>(r: &mut R, w: &mut W, peer: &str) -> io::Result<Option<bool>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(no_zeroes) = greet(r, w).await? else {
        return Ok(None);
    };
    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut head).await?;
        let Ok(OptionHeader {
            option: opt,
            length: len,
        }) = OptionHeader::decode(&head)
        else {
            tracing::info!(%peer, "NBD client out of sync before TLS; closing");
            return Ok(None);
        };
        match opt {
            proto::OPT_STARTTLS if len == 0 => {
                reply(w, opt, proto::REP_ACK, &[]).await?;
                return Ok(Some(no_zeroes));
            }
            proto::OPT_ABORT => {
                if len == 0 {
                    reply(w, opt, proto::REP_ACK, &[]).await?;
                }
                return Ok(None);
            }
            proto::OPT_EXPORT_NAME => {
                tracing::info!(%peer, "NBD client asked for an export without TLS, which this server requires; closing");
                return Ok(None);
            }
            _ if len > proto::MAX_OPTION_LEN => {
                tracing::info!(%peer, len, "oversized NBD option before TLS; closing");
                return Ok(None);
            }
            _ => {
                drain(r, u64::from(len)).await?;
                let (kind, msg) = if opt == proto::OPT_STARTTLS {
                    (proto::REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                } else {
                    (
                        proto::REP_ERR_TLS_REQD,
                        "this server requires TLS (NBD_OPT_STARTTLS) first",
                    )
                };
                tracing::debug!(%peer, option = opt, "NBD option before TLS refused");
                reply_err(w, opt, kind, msg).await?;
            }
        }
    }
}

/// Runs the negotiation; `None` when the client left or must be hung up on. `greeted`
/// is `Some(no_zeroes)` when the greeting and TLS were done already ([`before_tls`]).
pub(super) async fn negotiate<R, W, E>(
    r: &mut R,
    w: &mut W,
    exports: &Arc<E>,
    pool: &Handle,
    cfg: &ServerConfig,
    greeted: Option<bool>,
    peer: &Peer,
) -> io::Result<Option<Negotiated<E::Device>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Exports,
{
    let tls = greeted.is_some();
    let no_zeroes = match greeted {
        Some(no_zeroes) => no_zeroes,
        None => match greet(r, w).await? {
            Some(no_zeroes) => no_zeroes,
            None => return Ok(None),
        },
    };
    let mut structured = false;
    let mut context: Option<String> = None; // export the allocation context was set for

    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut head).await?;
        let OptionHeader {
            option: opt,
            length: len,
        } = match OptionHeader::decode(&head) {
            Ok(h) => h,
            Err(e) => {
                tracing::info!(error = %e, "NBD client out of sync in negotiation; closing");
                return Ok(None);
            }
        };
        if len > proto::MAX_OPTION_LEN {
            if len > MAX_DRAIN {
                tracing::info!(len, "oversized NBD option; closing");
                return Ok(None);
            }
            drain(r, u64::from(len)).await?;
            reply_err(w, opt, proto::REP_ERR_TOO_BIG, "option payload too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            proto::OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else {
                    return Ok(None);
                };
                let device = match open(exports, pool, &name, peer).await {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        let export = export_name::shown(&name);
                        tracing::info!(export, "NBD client asked for an unknown export; closing");
                        return Ok(None);
                    }
                    // This old option has no way to say why: the log does.
                    Err(msg) => {
                        let export = export_name::shown(&name);
                        tracing::info!(export, reason = %msg, "NBD export refused; closing");
                        return Ok(None);
                    }
                };
                let answer = ExportNameReply {
                    size: device.size(),
                    flags: transmission_flags(&*device),
                };
                w.write_all(&answer.encode(!no_zeroes)).await?;
                w.flush().await?;
                let allocation_context = context.as_deref() == Some(name.as_str());
                return Ok(Some(Negotiated {
                    device,
                    structured,
                    allocation_context,
                }));
            }
            proto::OPT_ABORT => {
                reply(w, opt, proto::REP_ACK, &[]).await?;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    reply_err(w, opt, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for e in exports.list() {
                    reply(w, opt, proto::REP_SERVER, &e.encode()).await?;
                }
                reply(w, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_STARTTLS if tls => {
                reply_err(w, opt, proto::REP_ERR_INVALID, "TLS is already on").await?;
            }
            proto::OPT_STARTTLS => {
                reply_err(
                    w,
                    opt,
                    proto::REP_ERR_POLICY,
                    "TLS is not configured on this server",
                )
                .await?;
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                reply(w, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let req = match GoRequest::decode(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        reply_err(w, opt, proto::REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                // An unknown name, or the export's own words (a refusal with a reason).
                let device = match open_named(exports, pool, &req.name, peer).await {
                    Ok(d) => d,
                    Err(msg) => {
                        reply_err(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                        continue;
                    }
                };
                send_info(w, opt, &**exports, &req, &*device, cfg).await?;
                reply(w, opt, proto::REP_ACK, &[]).await?;
                if opt == proto::OPT_GO {
                    let allocation_context = context.as_deref() == Some(req.name.as_str());
                    return Ok(Some(Negotiated {
                        device,
                        structured,
                        allocation_context,
                    }));
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                if set && !structured {
                    reply_err(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "structured replies must be negotiated first",
                    )
                    .await?;
                    continue;
                }
                let req = match MetaRequest::decode(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        reply_err(w, opt, proto::REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                if let Err(msg) = open_named(exports, pool, &req.export, peer).await {
                    reply_err(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                }
                let selected = if req.queries.is_empty() {
                    !set
                } else {
                    req.queries.iter().any(|q| proto::query_matches(q, !set))
                };
                if set {
                    context = selected.then(|| req.export.clone());
                }
                if selected {
                    let ctx = MetaContext {
                        id: ALLOCATION_CONTEXT_ID,
                        name: proto::BASE_ALLOCATION.to_string(),
                    };
                    reply(w, opt, proto::REP_META_CONTEXT, &ctx.encode()).await?;
                }
                reply(w, opt, proto::REP_ACK, &[]).await?;
            }
            _ => {
                reply_err(w, opt, proto::REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

/// The `NBD_REP_INFO` replies to `NBD_OPT_INFO`/`NBD_OPT_GO`: size and flags, block sizes,
/// and the name and description when asked.
async fn send_info<W, E>(
    w: &mut W,
    opt: u32,
    exports: &E,
    req: &GoRequest,
    device: &E::Device,
    cfg: &ServerConfig,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    E: Exports,
{
    let export = Info::Export {
        size: device.size(),
        flags: transmission_flags(device),
    };
    reply(w, opt, proto::REP_INFO, &export.encode()).await?;
    // Our constraints are permissive, so sending them unasked binds no one.
    let block_size = Info::BlockSize {
        min: MIN_BLOCK,
        preferred: PREFERRED_BLOCK,
        max: cfg.max_payload,
    };
    reply(w, opt, proto::REP_INFO, &block_size.encode()).await?;
    if req.info.contains(&proto::INFO_NAME) {
        let name = Info::Name(req.name.clone());
        reply(w, opt, proto::REP_INFO, &name.encode()).await?;
    }
    if req.info.contains(&proto::INFO_DESCRIPTION) {
        if let Some(d) = exports.describe(&req.name) {
            reply(w, opt, proto::REP_INFO, &Info::Description(d).encode()).await?;
        }
    }
    Ok(())
}

/// Opens an export; a refusal is the message the client gets. Opened on `pool`'s
/// blocking threads: opening may wait (on the cluster), and a device that starts tasks
/// of its own (a forwarded volume) must start them on the store's runtime, not on the
/// connection's, which ends with the connection.
async fn open<E: Exports>(
    exports: &Arc<E>,
    pool: &Handle,
    name: &str,
    peer: &Peer,
) -> Result<Option<Arc<E::Device>>, String> {
    let (ex, n, p) = (exports.clone(), name.to_string(), peer.clone());
    pool.spawn_blocking(move || ex.open_for(&n, &p))
        .await
        .map_err(|e| format!("opening export {}: {e}", export_name::shown(name)))?
        .map_err(|e| format!("opening export {}: {}", export_name::shown(name), e.message))
}

/// Opens an export that must exist; an unknown name is refused like any other failure.
async fn open_named<E: Exports>(
    exports: &Arc<E>,
    pool: &Handle,
    name: &str,
    peer: &Peer,
) -> Result<Arc<E::Device>, String> {
    open(exports, pool, name, peer)
        .await?
        .ok_or_else(|| format!("no export named {:?}", export_name::shown(name)))
}

fn transmission_flags<D: Device>(d: &D) -> u16 {
    let mut f = proto::TF_HAS_FLAGS
        | proto::TF_SEND_FLUSH
        | proto::TF_SEND_FUA
        | proto::TF_SEND_DF
        | proto::TF_CAN_MULTI_CONN;
    if d.read_only() {
        f |= proto::TF_READ_ONLY;
    } else {
        f |= proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES | proto::TF_SEND_FAST_ZERO;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let head = OptionReplyHeader {
        option: opt,
        kind,
        length: data.len() as u32,
    };
    w.write_all(&head.encode()).await?;
    w.write_all(data).await?;
    w.flush().await
}

async fn reply_err<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> io::Result<()> {
    reply(w, opt, kind, msg.as_bytes()).await
}
