//! Catch-up of one out-of-sync replica by its primary, in the background (issue #8).
//!
//! The primary's driver records every region a replica out of the in-sync set misses
//! (durably, and in [`Missed::recorded`]). While the cluster lists the replica in
//! `catching_up`, this task repeatedly takes what is recorded, plans it with
//! `tessera-replication`'s [`CatchUpPlan`] (blake3 digests of both copies compared per
//! 4 KiB block; only differing blocks travel), writes those blocks on its own stream
//! in the primary's generation and ends each pass with a flush. When a pass leaves
//! nothing recorded it reports `caught_up`; new writes keep being recorded and caught up
//! in later passes. When the cluster puts the replica back in sync (a newer generation),
//! the driver stops taking requests and asks for a final pass ([`Final`]), so nothing
//! written before the new configuration is missing on the replica when it rejoins.
//!
//! One write of at most 4 MiB is in flight at a time, and an optional rate bounds the
//! bytes per second. A replica that restarted meanwhile answers with a seq gap or
//! `NotInSync`: the pass starts again (what it had not flushed was lost with it).
//!
//! Snapshots: each new stream first asks the replica which snapshots it holds and brings
//! it those of the primary's it lacks, each at its point ([`snapshots`]).
//!
//! A block the replica reports failing its checksum is rewritten in the layer holding it
//! (a snapshot's included) before the pass sends the volume's bytes ([`layers`]).

mod layers;
mod snapshots;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tessera_blockstore::{Export, Store};
use tessera_replication::catchup::CatchUpPlan;
use tessera_replication::primary::ReplicaId;
use tessera_replication::regions::{Region, RegionSet};
use tessera_replication::wire::{self, Decoder, Generation, Message, ReplyError, VolumeName};
use tessera_store_admin::ReplicaState;
use tokio::sync::{mpsc, oneshot};

use super::primary::Peer;
use super::quic::ReplEndpoint;

/// Longest wait for one reply from the replica before the stream is given up.
const REPLY_WAIT: Duration = Duration::from_secs(10);
/// Pause before trying a replica again.
const RETRY: Duration = Duration::from_millis(300);
/// How often a caught-up replica's new misses are looked for.
const IDLE: Duration = Duration::from_millis(100);
/// After a pass, a replica with at most this much newly recorded is reported caught up:
/// under a writer that never pauses, a pass almost never ends with nothing new (each
/// pass takes several round trips, the writer one), so waiting for zero left the
/// rejoin to chance (replication_rebuild took 2 to 30+ s). What is left goes in the
/// rejoin's last pass, which holds requests and so always finishes.
const NEAR: u64 = 4 << 20;

/// What a replica missed: recorded and not yet taken, and taken by the running pass.
#[derive(Debug, Default)]
pub struct Missed {
    /// Recorded (mirrors the durable record, minus what passes completed).
    pub recorded: RegionSet,
    /// Taken by the pass in progress; back into `recorded` if it fails.
    pub in_pass: RegionSet,
}

impl Missed {
    /// Bytes still to examine.
    pub fn bytes(&self) -> u64 {
        self.recorded.total_bytes() + self.in_pass.total_bytes()
    }

    /// Puts what the pass took back (the pass failed or was stopped).
    pub fn give_back(&mut self) {
        for r in self.in_pass.iter() {
            self.recorded.insert(r);
        }
        self.in_pass = RegionSet::new();
    }
}

/// The state every catch-up of one primary shares with its driver and its status.
#[derive(Clone, Default)]
pub struct Shared {
    /// What each replica missed.
    pub missed: Arc<Mutex<HashMap<ReplicaId, Missed>>>,
    /// Each replica's state.
    pub states: Arc<Mutex<HashMap<ReplicaId, ReplicaState>>>,
    /// Per replica: catch-up data bytes sent, and UDP bytes of the catch-up connections.
    pub counters: Arc<Mutex<HashMap<ReplicaId, (u64, u64)>>>,
    /// Blocks repaired, on this copy from a replica or on a replica's copy (by a read's
    /// repair or by a catch-up), for `replication_status` and its events.
    pub repairs: super::primary::Repairs,
}

/// The driver's request for a last pass before the replica rejoins; answered once the
/// replica holds everything recorded (the driver takes no requests meanwhile).
pub struct Final {
    /// The outcome.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// One replica's catch-up task.
pub struct CatchUp {
    pub ep: Arc<ReplEndpoint>,
    pub replica: ReplicaId,
    pub peer: Peer,
    pub volume: VolumeName,
    pub generation: u64,
    pub export: Arc<Export>,
    pub shared: Shared,
    pub rate: Option<u64>,
    /// The store, for the primary's snapshots of the volume.
    pub store: Store,
    /// The replica's durable missed-region record: (directory, file).
    pub record: (PathBuf, PathBuf),
}

/// Why a pass stopped.
enum PassError {
    /// The stream broke or the replica refused; try again after a pause.
    Retry(String),
    /// A newer generation exists: this catch-up is over.
    Stale(Generation),
}

/// One stream to the replica, with its seq count.
struct Stream {
    conn: quinn::Connection,
    /// The protocol version the connection settled on: no message of a newer one is sent.
    version: u8,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
    buf: Vec<u8>,
    /// UDP bytes counted from this connection already.
    counted: u64,
    /// The snapshots the replica holds that this copy holds too, oldest first (known once
    /// [`CatchUp::carry_snapshots`] ran): where a bad block of its copy may be repaired.
    held: Vec<String>,
    /// The last `Repair` request number used on this stream.
    repairs: u64,
}

impl Stream {
    async fn send(&mut self, msg: &Message) -> Result<(), PassError> {
        let frame =
            wire::encode_for(msg, self.version).map_err(|e| PassError::Retry(e.to_string()))?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| PassError::Retry(e.to_string()))
    }

    async fn recv(&mut self) -> Result<Message, PassError> {
        let read = async {
            loop {
                match self.decoder.next_message() {
                    Ok(Some(m)) => return Ok(m),
                    Ok(None) => {}
                    Err(e) => return Err(PassError::Retry(format!("bad frame: {e}"))),
                }
                let want = self.decoder.wants().clamp(1, self.buf.len());
                match self.recv.read(&mut self.buf[..want]).await {
                    Ok(Some(n)) => self
                        .decoder
                        .push(&self.buf[..n])
                        .map_err(|e| PassError::Retry(format!("bad frame: {e}")))?,
                    Ok(None) => {
                        return Err(PassError::Retry("the replica ended the stream".into()))
                    }
                    Err(e) => return Err(PassError::Retry(e.to_string())),
                }
            }
        };
        tokio::time::timeout(REPLY_WAIT, read)
            .await
            .map_err(|_| PassError::Retry(format!("no reply within {REPLY_WAIT:?}")))?
    }
}

/// A refusal from the replica as the pass's outcome.
fn refused(e: ReplyError) -> PassError {
    match e {
        ReplyError::StaleGeneration { current } => PassError::Stale(current),
        other => PassError::Retry(format!("the replica refused: {other}")),
    }
}

impl CatchUp {
    /// Runs until stopped (aborted), a newer generation shows up, or a [`Final`] pass
    /// succeeded.
    pub async fn run(self, mut ctl: mpsc::UnboundedReceiver<Final>) {
        let mut stream: Option<Stream> = None;
        let mut seq = 0u64;
        let mut last_pass: Option<Final> = None;
        let mut told = String::new();
        // Reported caught up while what is recorded stays within `NEAR` of none.
        let mut near = false;
        loop {
            if last_pass.is_none() {
                last_pass = ctl.try_recv().ok();
            }
            let taken = {
                let mut missed = self.shared.missed.lock();
                let m = missed.entry(self.replica).or_default();
                m.give_back();
                std::mem::take(&mut m.recorded)
            };
            // Caught up means reached: a replica this task never reached in its
            // generation may refuse every write (a store that restarted holds its copy
            // lost until its node configures it, which that node does only once the
            // store holds this generation, learned from this fence). Reported caught up
            // unreached, with nothing recorded, it rejoined, refused the primary's first
            // write, left the in-sync set and came back, over and over: the volume's
            // generation ran away (issue #8, volume_rebuild).
            if taken.is_empty() && stream.is_none() {
                match self.open(&mut seq).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        if self.failed(e, "could not reach the replica", &mut last_pass, &mut told)
                        {
                            return;
                        }
                        near = false;
                        tokio::time::sleep(RETRY).await;
                    }
                }
                // Round again: bringing snapshots may have recorded the whole volume.
                continue;
            }
            if taken.is_empty() {
                if let Some(f) = last_pass.take() {
                    let _ = f.done.send(Ok(()));
                    return;
                }
                near = true;
                self.set_state(ReplicaState::CaughtUp {});
                tokio::select! {
                    f = ctl.recv() => last_pass = f,
                    _ = tokio::time::sleep(IDLE) => {}
                }
                continue;
            }
            self.shared
                .missed
                .lock()
                .entry(self.replica)
                .or_default()
                .in_pass = taken.clone();
            near = near && taken.total_bytes() <= NEAR;
            let outcome = match stream.as_mut() {
                Some(s) => self.pass(s, &mut seq, &taken, near).await,
                None => match self.open(&mut seq).await {
                    Ok(s) => {
                        let s = stream.insert(s);
                        self.pass(s, &mut seq, &taken, near).await
                    }
                    Err(e) => Err(e),
                },
            };
            self.count_wire(stream.as_mut());
            let failed = {
                let mut missed = self.shared.missed.lock();
                let m = missed.entry(self.replica).or_default();
                match &outcome {
                    Ok(()) => m.in_pass = RegionSet::new(),
                    Err(_) => m.give_back(),
                }
                outcome.err()
            };
            match failed {
                None => {
                    told.clear();
                    let left = self
                        .shared
                        .missed
                        .lock()
                        .get(&self.replica)
                        .map_or(0, Missed::bytes);
                    if left <= NEAR && last_pass.is_none() {
                        near = true;
                        self.set_state(ReplicaState::CaughtUp {});
                    }
                }
                Some(e) => {
                    if self.failed(e, "pass interrupted", &mut last_pass, &mut told) {
                        return;
                    }
                    near = false;
                    if let Some(s) = stream.take() {
                        s.conn.close(0u32.into(), b"catch-up retry");
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// What a failed open or pass means, the same for both: `true` when this catch-up is
    /// over (the replica is at a newer generation); otherwise the reason is logged (once
    /// while it stays the same) and the caller tries again after [`RETRY`]. Either way a
    /// waiting last pass is answered with the failure.
    fn failed(
        &self,
        e: PassError,
        what: &str,
        last_pass: &mut Option<Final>,
        told: &mut String,
    ) -> bool {
        let (over, answer) = match e {
            PassError::Stale(current) => {
                tracing::warn!(volume = %self.volume, node = %self.peer.node, %current,
                    "catch-up stopped: the replica is at a newer generation");
                self.set_state(ReplicaState::OutOfSync {});
                (true, format!(
                    "replica {} is at generation {current} already (the primary must get its configuration before the replica)",
                    self.peer.node
                ))
            }
            PassError::Retry(why) => {
                if why != *told {
                    tracing::warn!(volume = %self.volume, node = %self.peer.node, reason = %why,
                        "catch-up {what}; trying again");
                    told.clone_from(&why);
                }
                (
                    false,
                    format!(
                        "replica {} could not be brought up to date: {why}",
                        self.peer.node
                    ),
                )
            }
        };
        if let Some(f) = last_pass.take() {
            let _ = f.done.send(Err(answer));
        }
        over
    }

    fn set_state(&self, state: ReplicaState) {
        self.shared.states.lock().insert(self.replica, state);
    }

    fn count_wire(&self, stream: Option<&mut Stream>) {
        if let Some(s) = stream {
            let now = s.conn.stats().udp_tx.bytes;
            let delta = now.saturating_sub(s.counted);
            s.counted = now;
            self.shared
                .counters
                .lock()
                .entry(self.replica)
                .or_default()
                .1 += delta;
        }
    }

    /// Connects and fences the replica in this generation.
    async fn open(&self, seq: &mut u64) -> Result<Stream, PassError> {
        let conn = self
            .ep
            .connect(&self.peer.node, self.peer.addr)
            .await
            .map_err(|e| PassError::Retry(e.to_string()))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| PassError::Retry(e.to_string()))?;
        let mut s = Stream {
            version: super::quic::negotiated_version(&conn),
            conn,
            send,
            recv,
            decoder: Decoder::new(),
            buf: vec![0u8; 256 << 10],
            counted: 0,
            held: Vec::new(),
            repairs: 0,
        };
        s.send(&Message::Fence {
            volume: self.volume.clone(),
            generation: Generation(self.generation),
        })
        .await?;
        match s.recv().await? {
            Message::Reply { seq: 0, result } => result.map_err(refused)?,
            other => {
                return Err(PassError::Retry(format!(
                    "unexpected answer to the fence: {other:?}"
                )))
            }
        }
        // Where the replica's count stands in this generation (an earlier stream or an
        // earlier primary of the same generation may have moved it): a seq far ahead is
        // refused with the one it expects, and nothing is applied. Starting below it
        // would have writes acknowledged as resends without being applied.
        s.send(&Message::Flush {
            volume: self.volume.clone(),
            generation: Generation(self.generation),
            seq: u64::MAX,
        })
        .await?;
        match s.recv().await? {
            Message::Reply {
                result: Err(ReplyError::SeqGap { expected }),
                ..
            } => *seq = expected.saturating_sub(1),
            Message::Reply { result: Err(e), .. } => return Err(refused(e)),
            other => {
                return Err(PassError::Retry(format!(
                    "unexpected answer to the position probe: {other:?}"
                )))
            }
        }
        self.carry_snapshots(&mut s, seq).await?;
        Ok(s)
    }

    /// One pass over `regions`: compare, send what differs, flush.
    /// `near`: the replica is reported caught up and stays so (no progress shown).
    async fn pass(
        &self,
        s: &mut Stream,
        seq: &mut u64,
        regions: &RegionSet,
        near: bool,
    ) -> Result<(), PassError> {
        let mut plan = CatchUpPlan::new(regions, self.export.size());
        let progress = |plan: &CatchUpPlan| {
            if near {
                return;
            }
            let p = plan.progress();
            self.set_state(ReplicaState::CatchingUp {
                done_bytes: p.done_bytes,
                total_bytes: p.total_bytes,
            });
        };
        progress(&plan);
        // First the primary's size: a copy that missed a resize grows before it is sent
        // (or asked the digests of) anything past its old end. A copy that large already
        // takes it as done.
        self.send_resize(s, seq, self.export.size()).await?;
        let head = self.export.clone();
        self.send_differences(s, seq, &head, &mut plan, &progress)
            .await?;
        self.send_sequenced(s, seq, |volume, generation, seq| Message::Flush {
            volume,
            generation,
            seq,
        })
        .await
    }

    /// Grows the replica's copy to `size` bytes (a copy that large already takes it as
    /// done).
    async fn send_resize(&self, s: &mut Stream, seq: &mut u64, size: u64) -> Result<(), PassError> {
        self.send_sequenced(s, seq, |volume, generation, seq| Message::Resize {
            volume,
            generation,
            seq,
            size,
        })
        .await
    }

    /// Sends the request `make` builds with the next seq and waits for its reply.
    async fn send_sequenced(
        &self,
        s: &mut Stream,
        seq: &mut u64,
        make: impl FnOnce(VolumeName, Generation, u64) -> Message,
    ) -> Result<(), PassError> {
        *seq += 1;
        s.send(&make(
            self.volume.clone(),
            Generation(self.generation),
            *seq,
        ))
        .await?;
        self.expect_reply(s, seq).await
    }

    /// Compares the replica's copy with `source` (the primary's copy, or one of its
    /// snapshots) over what `plan` covers and writes there what differs.
    async fn send_differences(
        &self,
        s: &mut Stream,
        seq: &mut u64,
        source: &Arc<Export>,
        plan: &mut CatchUpPlan,
        progress: &(dyn Fn(&CatchUpPlan) + Sync),
    ) -> Result<(), PassError> {
        let mut request = 0u64;
        for batch in plan.batches() {
            let export = source.clone();
            let local = tokio::task::spawn_blocking(move || {
                super::replica::digests(&export, batch.offset, batch.blocks)
            })
            .await
            .map_err(|e| PassError::Retry(e.to_string()))?
            .map_err(|e| PassError::Retry(format!("reading the primary's copy: {e}")))?;
            request += 1;
            s.send(&Message::Digests {
                volume: self.volume.clone(),
                generation: Generation(self.generation),
                request,
                offset: batch.offset,
                blocks: batch.blocks,
            })
            .await?;
            let remote = match s.recv().await? {
                Message::DigestsReply { request: r, result } if r == request => {
                    result.map_err(refused)?
                }
                other => {
                    return Err(PassError::Retry(format!(
                        "unexpected answer to a digest request: {other:?}"
                    )))
                }
            };
            let runs = plan
                .compare(batch, &local, &remote)
                .map_err(|e| PassError::Retry(e.to_string()))?;
            self.repair_bad_blocks(s, source, batch.offset, &remote)
                .await?;
            progress(plan);
            for run in runs {
                self.send_run(s, seq, source, run).await?;
                plan.sent(run);
                progress(plan);
            }
        }
        Ok(())
    }

    /// Reads `run` from `source` and writes it on the replica.
    async fn send_run(
        &self,
        s: &mut Stream,
        seq: &mut u64,
        source: &Arc<Export>,
        run: Region,
    ) -> Result<(), PassError> {
        let export = source.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; run.len as usize];
            export.read_at(run.offset, &mut buf).map(|()| buf)
        })
        .await
        .map_err(|e| PassError::Retry(e.to_string()))?
        .map_err(|e| PassError::Retry(format!("reading the primary's copy: {e}")))?;
        *seq += 1;
        s.send(&Message::Write {
            volume: self.volume.clone(),
            generation: Generation(self.generation),
            seq: *seq,
            offset: run.offset,
            fua: false,
            data,
        })
        .await?;
        self.expect_reply(s, seq).await?;
        self.shared
            .counters
            .lock()
            .entry(self.replica)
            .or_default()
            .0 += run.len;
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            tokio::time::sleep(Duration::from_secs_f64(run.len as f64 / rate as f64)).await;
        }
        Ok(())
    }

    /// Waits for the reply to `seq`. A gap means the replica's count is elsewhere (it
    /// restarted, or an earlier stream's writes count): continue from where it is and
    /// start the pass again.
    async fn expect_reply(&self, s: &mut Stream, seq: &mut u64) -> Result<(), PassError> {
        match s.recv().await? {
            Message::Reply { seq: r, result } if r == *seq => match result {
                Ok(()) => Ok(()),
                Err(ReplyError::SeqGap { expected }) => {
                    *seq = expected.saturating_sub(1);
                    Err(PassError::Retry(format!(
                        "the replica expects seq {expected}: the pass starts again"
                    )))
                }
                Err(e) => Err(refused(e)),
            },
            other => Err(PassError::Retry(format!(
                "unexpected answer to seq {seq}: {other:?}"
            ))),
        }
    }
}
