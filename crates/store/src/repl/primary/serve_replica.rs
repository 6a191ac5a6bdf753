//! The primary's answer to a replica that found a bad block on its own copy (issue #8;
//! the replica's side is `replica/from_primary.rs`): on the connection the primary's link
//! opened to the replica, the replica opens a stream and asks `Read` (or `SnapshotRead`)
//! of the block in its generation; the primary answers `ReadReply` from its own copy,
//! then reads the replica's `RepairReply` and lists a rewritten block among its repairs
//! (the cluster's `volume.repaired` event, naming the node whose copy was repaired).
//!
//! Refused, with nothing read: another volume, a node that is not one of this primary's
//! replicas, and any generation but this primary's own (an older one: the replica is
//! told the current one; a newer one: this primary is fenced and its copy may be behind).
//! The bytes are read as every read is, checked against this copy's checksums; a block
//! bad here too is first repaired from the in-sync replicas (`repair.rs`), and with no
//! good copy anywhere the answer is an error. The replica checks the bytes against its
//! own checksum anyway (`Export::repair_block`), so a wrong answer writes nothing.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tessera_blockstore::{Store, StoreError, BLOCK};
use tessera_replication::wire::{
    self, Decoder, Generation, Message, RepairOutcome, ReplyError, VolumeName,
};

use super::super::replica::{code, reply_error};
use super::PrimaryHandle;

/// A replica's repair stream ends after this long, answered or not.
const STREAM_WAIT: Duration = Duration::from_secs(30);
/// Most requests one repair stream may carry.
const MOST_REQUESTS: usize = 64;

/// What a link needs to answer its replica's repair streams.
pub(in crate::repl) struct ServeReplicas {
    pub(super) store: Store,
    pub(super) volume: VolumeName,
    /// The running primary, once started (links start before it exists).
    pub(super) handle: OnceLock<Weak<PrimaryHandle>>,
}

impl ServeReplicas {
    pub(super) fn new(store: Store, volume: VolumeName) -> Arc<ServeReplicas> {
        Arc::new(ServeReplicas {
            store,
            volume,
            handle: OnceLock::new(),
        })
    }
}

/// Answers one repair stream the replica on node `node` opened (module comment).
pub(super) async fn serve(
    ctx: Arc<ServeReplicas>,
    node: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let served = tokio::time::timeout(STREAM_WAIT, async {
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 64 << 10];
        // Requests answered with bytes: (offset, len, snapshot), for the repair reports.
        let mut answered = Answered::new();
        for _ in 0..MOST_REQUESTS {
            let msg = loop {
                match decoder.next_message() {
                    Ok(Some(m)) => break m,
                    Ok(None) => {}
                    Err(e) => return Err(format!("bad frame: {e}")),
                }
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => decoder.push(&buf[..n]).map_err(|e| format!("bad frame: {e}"))?,
                    Ok(None) if decoder.at_boundary() => return Ok(()),
                    Ok(None) => return Err("the stream ended inside a frame".into()),
                    Err(e) => return Err(e.to_string()),
                }
            };
            match msg {
                Message::Read { volume, generation, request, offset, len } => {
                    let asked = Asked { volume, generation, request, snapshot: None, offset, len };
                    reply(&ctx, &node, asked, &mut answered, &mut send).await?;
                }
                Message::SnapshotRead { volume, generation, request, snapshot, offset, len } => {
                    let asked = Asked { volume, generation, request, snapshot: Some(snapshot), offset, len };
                    reply(&ctx, &node, asked, &mut answered, &mut send).await?;
                }
                Message::RepairReply { request, result } => {
                    let Some((offset, len, snapshot)) = answered.remove(&request) else {
                        return Err(format!("a repair report for request {request}, which it was not given bytes for"));
                    };
                    reported(&ctx, &node, offset, len, snapshot.as_deref(), result);
                }
                _ => return Err("a message a replica's repair stream does not carry".into()),
            }
        }
        Err(format!("more than {MOST_REQUESTS} requests on one repair stream"))
    })
    .await
    .unwrap_or_else(|_| Err(format!("not ended within {STREAM_WAIT:?}")));
    match served {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(why) => {
            tracing::warn!(volume = %ctx.volume, node = %node, reason = %why,
                "a replica's repair stream refused");
            let _ = send.reset(code::PROTOCOL.into());
            let _ = recv.stop(code::PROTOCOL.into());
        }
    }
}

/// A replica's `Read` or `SnapshotRead`.
struct Asked {
    volume: VolumeName,
    generation: Generation,
    request: u64,
    snapshot: Option<VolumeName>,
    offset: u64,
    len: u32,
}

/// Requests answered with bytes: (offset, len, snapshot) by request number.
type Answered = HashMap<u64, (u64, u64, Option<String>)>;

/// Answers `asked` on `send`, noting in `answered` what was given.
async fn reply(
    ctx: &Arc<ServeReplicas>,
    node: &str,
    asked: Asked,
    answered: &mut Answered,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    let (reply, given) = answer(ctx, node, asked).await;
    if let Some((request, what)) = given {
        answered.insert(request, what);
    }
    let frame = wire::encode(&reply).map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())
}

/// The `ReadReply` to `asked`, and, when bytes were given, its request number and what
/// was read.
async fn answer(
    ctx: &Arc<ServeReplicas>,
    node: &str,
    asked: Asked,
) -> (Message, Option<(u64, (u64, u64, Option<String>))>) {
    let Asked {
        volume,
        generation,
        request,
        snapshot,
        offset,
        len,
    } = asked;
    let refuse = |e: ReplyError| Message::ReadReply {
        request,
        result: Err(e),
    };
    if volume != ctx.volume {
        return (
            refuse(ReplyError::Io(format!(
                "this stream is {}'s, not {volume}'s",
                ctx.volume
            ))),
            None,
        );
    }
    let Some(p) = ctx.handle.get().and_then(Weak::upgrade) else {
        return (
            refuse(ReplyError::Io(
                "this store is no longer the volume's primary".into(),
            )),
            None,
        );
    };
    if p.replica_of(node).is_none() {
        return (refuse(ReplyError::NotReplica), None);
    }
    let current = p.generation();
    if generation < current {
        tracing::warn!(volume = %volume, node, %generation, %current,
            "a replica asked for a block in an older generation: refused");
        return (refuse(ReplyError::StaleGeneration { current }), None);
    }
    if generation > current {
        tracing::warn!(volume = %volume, node, %generation, %current,
            "a replica asked for a block in a newer generation than this primary's: refused (this primary is fenced)");
        return (
            refuse(ReplyError::Io(format!(
                "this primary is at generation {current}, older than the request's {generation}: it is fenced"
            ))),
            None,
        );
    }
    let name = match &snapshot {
        Some(s) => format!("{volume}@{s}"),
        None => volume.to_string(),
    };
    let store = ctx.store.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ReplyError> {
        let export = store.open_export(&name).map_err(|e| reply_error(&e))?;
        let mut buf = vec![0u8; len as usize];
        match export.read_at(offset, &mut buf) {
            Ok(()) => Ok(buf),
            // Bad here too: repaired from the in-sync replicas first, if one has it.
            Err(StoreError::Corrupt { .. }) => p
                .read_repaired(&export, offset, &mut buf)
                .map(|()| buf)
                .map_err(|e| {
                    ReplyError::Io(format!(
                        "the primary's copy fails its checksum there too: {e}"
                    ))
                }),
            Err(e) => Err(reply_error(&e)),
        }
    })
    .await
    .unwrap_or_else(|e| Err(ReplyError::Io(e.to_string())));
    match read {
        Ok(data) => (
            Message::ReadReply {
                request,
                result: Ok(data),
            },
            Some((
                request,
                (
                    offset,
                    u64::from(len),
                    snapshot.map(|s| s.as_str().to_string()),
                ),
            )),
        ),
        Err(e) => (refuse(e), None),
    }
}

/// What the replica on `node` did with the bytes of `len` bytes at `offset`.
fn reported(
    ctx: &ServeReplicas,
    node: &str,
    offset: u64,
    len: u64,
    snapshot: Option<&str>,
    result: Result<RepairOutcome, ReplyError>,
) {
    match result {
        Ok(RepairOutcome::Rewritten) => {
            tracing::warn!(volume = %ctx.volume, offset, len, node,
                "a block of a replica's copy failed its checksum there: the replica repaired it with this copy's bytes");
            if let Some(p) = ctx.handle.get().and_then(Weak::upgrade) {
                p.repairs
                    .note(offset, len.div_ceil(BLOCK), "primary", Some(node), snapshot);
            }
        }
        Ok(RepairOutcome::NotNeeded) => {
            tracing::info!(volume = %ctx.volume, offset, node,
                "a replica's block that failed its checksum was written meanwhile: nothing to repair");
        }
        Ok(RepairOutcome::Mismatch) => {
            tracing::warn!(volume = %ctx.volume, offset, node,
                "this copy's bytes did not match a replica's checksum for a block (it changed meanwhile): nothing written there");
        }
        Err(e) => {
            tracing::warn!(volume = %ctx.volume, offset, node, error = %e,
                "a replica could not repair a block with this copy's bytes");
        }
    }
}
