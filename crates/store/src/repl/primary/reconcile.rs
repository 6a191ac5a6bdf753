//! Reconciliation when a primary starts (a failover, or any new primary): the copies in
//! sync may differ on the requests the previous primary sent to some of them and never
//! completed (issue #8, finding 1 of the fault schedule). Before it takes any client
//! request, the new primary asks every in-sync replica for the regions of its last
//! changes (`Unsettled`, which also fences it in the new generation, so it takes nothing
//! more from the old primary), adds its own (`recent.rs`), compares those regions block
//! by block (blake3 digests, as a catch-up does) and writes its content of every block
//! where some copy differs through the ordinary write path, ahead of every client
//! request: every copy ends equal to the new primary's. A replica that cannot be asked
//! is recorded as missing the whole volume, so if the cluster takes it out (it will:
//! the first write to it times out) its catch-up compares everything.

use std::sync::Arc;
use std::time::Duration;

use tessera_blockstore::Export;
use tessera_replication::catchup::CatchUpPlan;
use tessera_replication::primary::{PrimaryInput, ReplicaId, RequestId};
use tessera_replication::regions::{Region, RegionSet};
use tessera_replication::replica::Op;
use tessera_replication::wire::{self, Decoder, Generation, Message, ReplyError, VolumeName};

use super::super::quic::ReplEndpoint;
use super::super::replica::digests;
use super::driver::Driver;
use super::missed::append_synced;
use super::Peer;

/// How long a replica that answers "not a replica" (a previous primary not yet told its
/// new role) is asked again before it counts as missing the whole volume.
const NOT_REPLICA_WAIT: Duration = Duration::from_secs(2);
/// How soon it is asked again (the guest waits for this primary's first write).
const NOT_REPLICA_AGAIN: Duration = Duration::from_millis(2);

/// What one replica said: the blocks where it differs from this copy, or why it could
/// not say.
type Answer = Result<RegionSet, String>;

/// What [`Asker`] says when the other end ended the stream.
const ENDED: &str = "the other end ended the stream";

/// One side stream to a replica for the questions (also the repair's, `repair.rs`),
/// or, opened by a replica on its primary's connection, to the primary for a repair of
/// the replica's copy (`replica/from_primary.rs`).
pub(in crate::repl) struct Asker {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl Asker {
    pub(super) async fn open(ep: &ReplEndpoint, peer: &Peer) -> Result<Asker, String> {
        let conn = ep
            .connect(&peer.node, peer.addr)
            .await
            .map_err(|e| e.to_string())?;
        Asker::over(conn).await
    }

    /// A new stream on `conn`, a connection already open.
    pub(in crate::repl) async fn over(conn: quinn::Connection) -> Result<Asker, String> {
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(Asker {
            conn,
            send,
            recv,
            decoder: Decoder::new(),
            buf: vec![0u8; 256 << 10],
        })
    }

    pub(in crate::repl) async fn ask(&mut self, msg: &Message) -> Result<Message, String> {
        let frame = wire::encode(msg).map_err(|e| e.to_string())?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| e.to_string())?;
        self.next().await
    }

    /// Sends `msg` as the stream's last message and waits for the other end to end its
    /// side too: then `msg` was read (the other end reads to the end before it ends).
    pub(in crate::repl) async fn tell_last(&mut self, msg: &Message) -> Result<(), String> {
        let frame = wire::encode(msg).map_err(|e| e.to_string())?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| e.to_string())?;
        self.send.finish().map_err(|e| e.to_string())?;
        match self.next().await {
            Err(e) if e == ENDED => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err("it answered a message that takes no answer".into()),
        }
    }

    /// The next message the other end sent.
    async fn next(&mut self) -> Result<Message, String> {
        loop {
            if let Some(m) = self.decoder.next_message().map_err(|e| e.to_string())? {
                return Ok(m);
            }
            let want = self.decoder.wants().clamp(1, self.buf.len());
            match self.recv.read(&mut self.buf[..want]).await {
                Ok(Some(n)) => self
                    .decoder
                    .push(&self.buf[..n])
                    .map_err(|e| e.to_string())?,
                Ok(None) => return Err(ENDED.into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Asks `peer` for its last changes and compares them, and `own`, with this copy.
async fn differing(
    ep: Arc<ReplEndpoint>,
    peer: Peer,
    volume: VolumeName,
    generation: Generation,
    export: Arc<Export>,
    own: RegionSet,
) -> Answer {
    let mut a = Asker::open(&ep, &peer).await?;
    let asked = tokio::time::Instant::now();
    let mut refused = 0u32;
    let theirs = loop {
        match a
            .ask(&Message::Unsettled {
                volume: volume.clone(),
                generation,
                request: 1,
            })
            .await?
        {
            Message::UnsettledReply {
                request: 1,
                result: Ok(regions),
            } => break regions,
            // The previous primary's store, still serving as primary for a moment: a live
            // migration's switch-over tells both stores their new roles at once, and
            // that one becomes a replica of this generation within milliseconds. Asked
            // again until then, the copy stays in sync (failing it would cost a
            // catch-up and more generations for one move).
            Message::UnsettledReply {
                result: Err(ReplyError::NotReplica),
                ..
            } if asked.elapsed() < NOT_REPLICA_WAIT => {
                refused += 1;
                tokio::time::sleep(NOT_REPLICA_AGAIN).await;
            }
            Message::UnsettledReply { result: Err(e), .. } => {
                return Err(format!("it refused: {e}"))
            }
            other => return Err(format!("unexpected answer: {other:?}")),
        }
    };
    if refused > 0 {
        tracing::info!(volume = %volume.as_str(), node = %peer.node, refused, waited_ms = asked.elapsed().as_millis() as u64,
            "the previous primary's store became a replica of this generation");
    }
    let mut union = own;
    for (offset, len) in theirs {
        union.insert(Region { offset, len });
    }
    let mut plan = CatchUpPlan::new(&union, export.size());
    let mut out = RegionSet::new();
    for (request, batch) in (2u64..).zip(plan.batches()) {
        let e = export.clone();
        let local = tokio::task::spawn_blocking(move || digests(&e, batch.offset, batch.blocks))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading this copy: {e}"))?;
        let remote = match a
            .ask(&Message::Digests {
                volume: volume.clone(),
                generation,
                request,
                offset: batch.offset,
                blocks: batch.blocks,
            })
            .await?
        {
            Message::DigestsReply {
                request: r,
                result: Ok(d),
            } if r == request => d,
            other => return Err(format!("unexpected answer to a digest request: {other:?}")),
        };
        for run in plan
            .compare(batch, &local, &remote)
            .map_err(|e| e.to_string())?
        {
            out.insert(run);
        }
    }
    a.conn.close(0u32.into(), b"reconciled");
    Ok(out)
}

impl Driver {
    /// Runs before the driver takes its first input (see the module's comment).
    pub(super) async fn reconcile(&mut self, in_sync: Vec<(ReplicaId, Peer)>, wait: Duration) {
        if in_sync.is_empty() {
            return;
        }
        let own = self.recent.regions(&self.volume);
        let generation = self.machine.generation();
        let asks: Vec<_> = in_sync
            .iter()
            .map(|(r, p)| {
                let job = differing(
                    self.ep.clone(),
                    p.clone(),
                    self.name.clone(),
                    generation,
                    self.export.clone(),
                    own.clone(),
                );
                (
                    *r,
                    p.node.clone(),
                    tokio::spawn(tokio::time::timeout(wait, job)),
                )
            })
            .collect();
        let mut fix = RegionSet::new();
        for (r, node, task) in asks {
            let answer: Answer = match task.await {
                Ok(Ok(a)) => a,
                Ok(Err(_)) => Err(format!("no answer within {wait:?}")),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(runs) => {
                    if !runs.is_empty() {
                        tracing::warn!(volume = %self.volume, %node, bytes = runs.total_bytes(),
                            "after the primary changed, a copy differed from the new primary's on the last changes: made equal");
                    }
                    for run in runs.iter() {
                        fix.insert(run);
                    }
                }
                Err(why) => {
                    tracing::error!(volume = %self.volume, %node, reason = %why,
                        "could not compare a replica's last changes with this copy: it is recorded as missing the whole volume");
                    let file = self.missed_file(r);
                    let line = format!("0 {}\n", self.export.size());
                    let dir = self.missed_dir.clone();
                    let _ = tokio::task::spawn_blocking(move || append_synced(&dir, &file, &line))
                        .await;
                    self.shared
                        .missed
                        .lock()
                        .entry(r)
                        .or_default()
                        .recorded
                        .insert(Region {
                            offset: 0,
                            len: self.export.size(),
                        });
                }
            }
        }
        if fix.is_empty() {
            return;
        }
        // This copy's content of every differing block, sent as writes ahead of any
        // client request (they get the first seqs; completion is in seq order).
        for run in fix.iter() {
            let mut at = run.offset;
            while at < run.end() {
                let len = (run.end() - at).min(wire::MAX_DATA as u64);
                let e = self.export.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    e.read_at(at, &mut buf).map(|()| buf)
                })
                .await;
                let op = match read {
                    Ok(Ok(data)) => Op::Write {
                        offset: at,
                        fua: false,
                        data,
                    },
                    _ => {
                        // Cannot happen short of a failing local disk; the copies stay as
                        // they were, which is what the primary did before this existed.
                        tracing::error!(volume = %self.volume, offset = at, len,
                            "could not read this copy to reconcile the replicas");
                        at += len;
                        continue;
                    }
                };
                self.submit_unanswered(op).await;
                at += len;
            }
        }
        self.submit_unanswered(Op::Flush).await;
    }

    /// Gives the machine `op` as a request nobody waits for (its completion is dropped).
    async fn submit_unanswered(&mut self, op: Op) {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let actions = self
            .machine
            .handle(self.start.elapsed(), PrimaryInput::Request { id, op });
        self.perform(actions).await;
    }
}
