//! The replica service: takes the streams primaries open to this store, decodes their
//! frames with `tessera-replication`'s codec, runs each volume's `Replica` state machine
//! and performs what it asks on the local copy (the block store's `Export`), in order:
//! a newer generation is persisted before anything that depends on it is answered.
//!
//! A volume accepts replication only after `tesserad` made it a replica (the admin op
//! `set_replication`); anything else is answered `NotReplica`, a volume this store does
//! not hold `UnknownVolume`. A frame that does not decode (oversize, truncated, bad
//! fields) ends the stream with [`code::MALFORMED`]: nothing of it was applied, and the
//! refusal is logged at most once a second per kind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tessera_blockstore::{Export, Store, StoreError};
use tessera_replication::replica::{Op, Replica, ReplicaAction};
use tessera_replication::wire::{self, Generation, Message, ReplyError, VolumeName, BLOCK_SIZE};

mod from_primary;
mod inflight;
mod primary_conns;
mod repair;
mod stream;
mod submit;
pub use from_primary::{FromPrimary, FromPrimaryError};
use inflight::InFlight;
pub use stream::serve;

/// QUIC application error codes this service closes streams and connections with.
pub mod code {
    /// A frame that does not decode.
    pub const MALFORMED: u32 = 1;
    /// A message the protocol does not allow here (a reply sent to a replica).
    pub const PROTOCOL: u32 = 2;
    /// The peer's certificate is not a node's.
    pub const NOT_A_NODE: u32 = 3;
    /// The local store failed to persist a generation.
    pub const STORE_FAILED: u32 = 4;
}

/// Most bytes read from a stream at a time (a frame body is read in such pieces).
const READ_CHUNK: usize = 256 << 10;
/// Blocks digested per read of the local copy.
const DIGEST_CHUNK: u64 = 256;

/// One volume's replica: its state machine, the open local copy and what is being
/// applied to it.
struct VolumeReplica {
    machine: Replica,
    export: Arc<Export>,
    /// The generation the export is bound to.
    bound: u64,
    inflight: InFlight,
}

impl VolumeReplica {
    /// `export` already bound to `bound`.
    fn new(machine: Replica, export: Export, bound: u64) -> VolumeReplica {
        VolumeReplica {
            machine,
            export: Arc::new(export),
            bound,
            inflight: InFlight::default(),
        }
    }

    /// Makes `g` the volume's durable fence. The copy's export is bound to it first, so a
    /// write in flight on the blocking pool that starts meanwhile is not refused as stale
    /// (the block store finishes writes in progress before it raises the generation).
    fn persist_generation(
        &mut self,
        store: &Store,
        volume: &str,
        g: u64,
    ) -> Result<(), StoreError> {
        self.export.bind_generation(g.max(self.bound));
        match store.raise_generation(volume, g) {
            Ok(now) => {
                self.export.bind_generation(now);
                self.bound = now;
                Ok(())
            }
            Err(e) => {
                self.export.bind_generation(self.bound);
                Err(e)
            }
        }
    }
}

/// What [`ReplicaService::handle`] did with a message.
enum Handled {
    /// The answers to send.
    Answered(Vec<Message>),
    /// Requests of its volume are in flight: try again once they settled.
    Busy(Message),
}

/// What [`ReplicaService::try_start`] did with a message.
enum Start {
    /// Started (or answered) in order with what is in flight.
    Started,
    /// It must wait for requests in flight to settle.
    Wait(Message),
    /// Nothing is in flight: handle it alone.
    Alone(Message),
}

/// The replicas this store holds, by volume name.
pub struct ReplicaService {
    store: Store,
    volumes: Mutex<HashMap<String, Arc<Mutex<VolumeReplica>>>>,
    limiter: LogLimiter,
    taken: super::snapshot::Taken,
    /// The last changes applied per volume, answered to a new primary's `Unsettled`.
    recent: super::recent::Recent,
    /// The connections primaries fenced each volume through: the way back for a repair.
    primary_conns: primary_conns::PrimaryConns,
}

impl ReplicaService {
    /// The service over `store`; no volume is a replica until [`ReplicaService::enable`].
    pub fn new(
        store: Store,
        taken: super::snapshot::Taken,
        recent: super::recent::Recent,
    ) -> Arc<ReplicaService> {
        Arc::new(ReplicaService {
            store,
            volumes: Mutex::new(HashMap::new()),
            limiter: LogLimiter::default(),
            taken,
            recent,
            primary_conns: primary_conns::PrimaryConns::default(),
        })
    }

    /// Makes `volume` a replica that refuses every generation below `generation`
    /// (persisted before this returns). Blocking: it may sync the catalog.
    pub fn enable(&self, volume: &str, generation: u64) -> Result<u64, StoreError> {
        let name = VolumeName::new(volume).map_err(|e| StoreError::Invalid {
            field: "volume",
            reason: e.to_string(),
        })?;
        let vr = self.volume(&name)?;
        let mut vr = vr.lock();
        // The fence as if a primary of `generation` announced itself: persisted, and the
        // count of seqs starts again, so the primary of that generation can write.
        let actions = vr.machine.handle(Message::Fence {
            volume: name,
            generation: Generation(generation),
        });
        for a in actions {
            if let ReplicaAction::PersistGeneration(g) = a {
                vr.persist_generation(&self.store, volume, g.0)?;
            }
        }
        Ok(vr.machine.generation().0)
    }

    /// After a restart: `volume` was a replica here. It may have lost acknowledged,
    /// unflushed writes, so it refuses writes until caught up (`Replica::restarted`).
    pub fn restore(&self, volume: &str) -> Result<(), StoreError> {
        let name = VolumeName::new(volume).map_err(|e| StoreError::Invalid {
            field: "volume",
            reason: e.to_string(),
        })?;
        let persisted = self.store.generation(volume)?;
        let export = self.store.open_export(volume)?;
        export.bind_generation(persisted);
        let v = Arc::new(Mutex::new(VolumeReplica::new(
            Replica::restarted(name, Generation(persisted)),
            export,
            persisted,
        )));
        self.volumes.lock().insert(volume.to_string(), v);
        Ok(())
    }

    /// The cluster has `volume` out of sync in `generation`, caught up by that
    /// generation's primary: take its writes while still reporting `must_catch_up`.
    pub fn begin_catch_up(&self, volume: &str, generation: u64) -> Result<u64, StoreError> {
        let name = VolumeName::new(volume).map_err(|e| StoreError::Invalid {
            field: "volume",
            reason: e.to_string(),
        })?;
        let vr = self.volume(&name)?;
        let mut vr = vr.lock();
        let actions = vr
            .machine
            .begin_catch_up(Generation(generation))
            .map_err(|_| StoreError::StaleGeneration {
                volume: volume.to_string(),
                held: generation,
                current: vr.machine.generation().0,
            })?;
        for a in actions {
            if let ReplicaAction::PersistGeneration(g) = a {
                vr.persist_generation(&self.store, volume, g.0)?;
            }
        }
        Ok(vr.machine.generation().0)
    }

    /// The cluster made `volume` an in-sync replica in `generation`: a catch-up begun in
    /// an older generation ends. Returns whether one did.
    pub fn end_catch_up(&self, volume: &str, generation: u64) -> bool {
        self.enabled(volume)
            .is_some_and(|v| v.lock().machine.end_catch_up(Generation(generation)))
    }

    /// True when `volume` is a replica here (local clients must not write it).
    pub fn is_replica(&self, volume: &str) -> bool {
        self.volumes.lock().contains_key(volume)
    }

    /// Every replica's (volume, generation, last seq applied, must catch up), in no order.
    pub fn states(&self) -> Vec<(String, u64, Option<u64>, bool)> {
        let volumes: Vec<_> = self
            .volumes
            .lock()
            .iter()
            .map(|(v, r)| (v.clone(), r.clone()))
            .collect();
        volumes
            .into_iter()
            .map(|(v, r)| {
                let r = r.lock();
                let m = &r.machine;
                (v, m.generation().0, m.last_applied(), m.must_catch_up())
            })
            .collect()
    }

    /// Stops serving `volume` as a replica (its persisted generation stays).
    pub fn disable(&self, volume: &str) {
        self.volumes.lock().remove(volume);
        self.primary_conns.forget(volume);
    }

    /// The replica of an existing volume, built from its persisted generation.
    fn volume(&self, name: &VolumeName) -> Result<Arc<Mutex<VolumeReplica>>, StoreError> {
        let mut map = self.volumes.lock();
        if let Some(v) = map.get(name.as_str()) {
            return Ok(v.clone());
        }
        let persisted = self.store.generation(name.as_str())?;
        let export = self.store.open_export(name.as_str())?;
        export.bind_generation(persisted);
        // Only `enable` gets here, and the cluster makes a copy a replica only when it
        // holds everything (a new volume, or one caught up): it starts with seq 1 of the
        // generation `enable` fences in, which is never below the persisted one. A store
        // that restarted forgot its roles; until it is told again it takes no writes.
        let v = Arc::new(Mutex::new(VolumeReplica::new(
            Replica::new(name.clone()),
            export,
            persisted,
        )));
        map.insert(name.as_str().to_string(), v.clone());
        Ok(v)
    }

    /// True while `volume` is a replica on this store.
    pub fn holds(&self, volume: &str) -> bool {
        self.volumes.lock().contains_key(volume)
    }

    fn enabled(&self, name: &str) -> Option<Arc<Mutex<VolumeReplica>>> {
        self.volumes.lock().get(name).cloned()
    }

    /// Logs `m` if it refuses a request of `volume` (at most once a second).
    fn log_refusal(&self, volume: &VolumeName, m: &Message) {
        if let Message::Reply {
            result: Err(e),
            seq,
        } = m
        {
            self.limiter.warn("refused", || {
                format!("replication request {seq} for {volume} refused: {e}")
            });
        }
    }

    /// Handles one message alone (nothing of its volume in flight: else it is given back
    /// as [`Handled::Busy`]); returns what to send back, or why the stream must close.
    /// Blocking (store I/O).
    fn handle(&self, msg: Message) -> Result<Handled, (u32, String)> {
        let volume = match target_volume(&msg) {
            Some(v) => v.clone(),
            None => {
                return Err((
                    code::PROTOCOL,
                    "a replica received a reply; only the primary receives replies".into(),
                ))
            }
        };
        let Some(vr) = self.enabled(volume.as_str()) else {
            let why = match self.store.generation(volume.as_str()) {
                Err(StoreError::NotFound(_)) | Err(StoreError::Gone(_)) => {
                    ReplyError::UnknownVolume
                }
                _ => ReplyError::NotReplica,
            };
            self.limiter.warn("refused", || {
                format!("replication message for volume {volume} refused: {why}")
            });
            return Ok(Handled::Answered(refusal(&msg, why).into_iter().collect()));
        };
        let mut vr = vr.lock();
        if !vr.inflight.is_empty() {
            return Ok(Handled::Busy(msg));
        }
        let mut out = Vec::new();
        let mut pending = std::collections::VecDeque::from(vr.machine.handle(msg));
        while let Some(action) = pending.pop_front() {
            match action {
                ReplicaAction::PersistGeneration(g) => {
                    match vr.persist_generation(&self.store, volume.as_str(), g.0) {
                        Ok(()) => {}
                        Err(e) => {
                            // The state machine already counts `g` as seen; forget it so
                            // the next stream starts from what is persisted.
                            self.volumes.lock().remove(volume.as_str());
                            return Err((
                                code::STORE_FAILED,
                                format!("persisting generation {g} of {volume}: {e}"),
                            ));
                        }
                    }
                }
                ReplicaAction::Apply { seq, op } => {
                    // Noted whatever the outcome: a failed apply may have changed part.
                    self.recent.note(volume.as_str(), &op);
                    let result = match op {
                        // Flushed first: once acknowledged, the snapshot's content is durable.
                        Op::Snapshot { name, size } => vr.export.flush().and_then(|()| {
                            super::snapshot::take(
                                &self.store,
                                &vr.export,
                                volume.as_str(),
                                &name,
                                size,
                                &self.taken,
                            )
                        }),
                        Op::Resize { size } => {
                            super::resize::grow(&self.store, volume.as_str(), size)
                        }
                        op => apply(&vr.export, op),
                    }
                    .map_err(|e| reply_error(&e));
                    if let Err(e) = &result {
                        self.limiter.warn("apply", || {
                            format!("replicated write {seq} to {volume} failed: {e}")
                        });
                    }
                    let more = vr.machine.applied(seq, result);
                    for (i, a) in more.into_iter().enumerate() {
                        pending.insert(i, a);
                    }
                }
                ReplicaAction::ReadDigests {
                    request,
                    offset,
                    blocks,
                } => out.push(Message::DigestsReply {
                    request,
                    result: repair::digests_marking_bad(&vr.export, offset, blocks)
                        .map_err(|e| reply_error(&e)),
                }),
                ReplicaAction::ReadSnapshot {
                    request,
                    snapshot,
                    offset,
                    len,
                } => out.push(Message::ReadReply {
                    request,
                    result: repair::read_snapshot(
                        &self.store,
                        volume.as_str(),
                        &snapshot,
                        offset,
                        len,
                    ),
                }),
                ReplicaAction::Repair {
                    request,
                    snapshot,
                    offset,
                    data,
                } => out.push(Message::RepairReply {
                    request,
                    result: repair::repair(
                        &self.store,
                        &vr.export,
                        snapshot.as_ref(),
                        offset,
                        &data,
                    ),
                }),
                ReplicaAction::Read {
                    request,
                    offset,
                    len,
                } => {
                    let mut buf = vec![0u8; len as usize];
                    out.push(Message::ReadReply {
                        request,
                        result: vr
                            .export
                            .read_at(offset, &mut buf)
                            .map(|()| buf)
                            .map_err(|e| reply_error(&e)),
                    });
                }
                ReplicaAction::ReportUnsettled { request } => {
                    let regions: Vec<(u64, u64)> = self
                        .recent
                        .regions(volume.as_str())
                        .iter()
                        .map(|r| (r.offset, r.len))
                        .collect();
                    // The window holds at most `WINDOW` regions, far below the wire's cap.
                    out.push(Message::UnsettledReply {
                        request,
                        result: Ok(regions),
                    });
                }
                ReplicaAction::ListSnapshots { request } => {
                    out.push(Message::SnapshotListReply {
                        request,
                        result: snapshot_names(&self.store, volume.as_str()),
                    });
                }
                ReplicaAction::Send(m) => {
                    self.log_refusal(&volume, &m);
                    out.push(m)
                }
                ReplicaAction::Disconnect { reason } => {
                    return Err((code::PROTOCOL, reason.to_string()))
                }
            }
        }
        Ok(Handled::Answered(out))
    }
}

/// The volume a primary's request is about (`None` for replies).
fn target_volume(msg: &Message) -> Option<&VolumeName> {
    match msg {
        Message::Fence { volume, .. }
        | Message::Write { volume, .. }
        | Message::WriteZeroes { volume, .. }
        | Message::Trim { volume, .. }
        | Message::Flush { volume, .. }
        | Message::Snapshot { volume, .. }
        | Message::Resize { volume, .. }
        | Message::Digests { volume, .. }
        | Message::Read { volume, .. }
        | Message::SnapshotRead { volume, .. }
        | Message::Repair { volume, .. }
        | Message::Unsettled { volume, .. }
        | Message::SnapshotList { volume, .. } => Some(volume),
        Message::DigestsReply { .. }
        | Message::ReadReply { .. }
        | Message::RepairReply { .. }
        | Message::UnsettledReply { .. }
        | Message::SnapshotListReply { .. }
        | Message::Reply { .. } => None,
    }
}

/// The answer refusing request `msg` with `why`.
fn refusal(msg: &Message, why: ReplyError) -> Option<Message> {
    Some(match msg {
        Message::Fence { .. } => Message::Reply {
            seq: 0,
            result: Err(why),
        },
        Message::Write { seq, .. }
        | Message::WriteZeroes { seq, .. }
        | Message::Trim { seq, .. }
        | Message::Flush { seq, .. }
        | Message::Snapshot { seq, .. }
        | Message::Resize { seq, .. } => Message::Reply {
            seq: *seq,
            result: Err(why),
        },
        Message::Digests { request, .. } => Message::DigestsReply {
            request: *request,
            result: Err(why),
        },
        Message::Read { request, .. } | Message::SnapshotRead { request, .. } => {
            Message::ReadReply {
                request: *request,
                result: Err(why),
            }
        }
        Message::Repair { request, .. } => Message::RepairReply {
            request: *request,
            result: Err(why),
        },
        Message::SnapshotList { request, .. } => Message::SnapshotListReply {
            request: *request,
            result: Err(why),
        },
        Message::Unsettled { request, .. } => Message::UnsettledReply {
            request: *request,
            result: Err(why),
        },
        _ => return None,
    })
}

fn apply(export: &Export, op: Op) -> Result<(), StoreError> {
    match op {
        Op::Write { offset, fua, data } => export.write_owned(offset, data, fua),
        Op::WriteZeroes { offset, len } => export.write_zeroes(offset, len, false, false),
        Op::Trim { offset, len } => export.trim(offset, len, false),
        Op::Flush => export.flush(),
        Op::Snapshot { .. } | Op::Resize { .. } => Err(StoreError::Invalid {
            field: "op",
            reason: "a snapshot or resize is applied by the replica's own step".into(),
        }),
    }
}

/// The blake3 digest of each 4 KiB block of `blocks` from `offset`.
pub(super) fn digests(
    export: &Export,
    offset: u64,
    blocks: u32,
) -> Result<Vec<wire::Digest>, StoreError> {
    let mut out = Vec::with_capacity(blocks as usize);
    let mut done = 0u64;
    let mut buf = Vec::new();
    while done < u64::from(blocks) {
        let n = DIGEST_CHUNK.min(u64::from(blocks) - done);
        buf.resize((n * BLOCK_SIZE) as usize, 0);
        export.read_at(offset + done * BLOCK_SIZE, &mut buf)?;
        out.extend(
            buf.chunks(BLOCK_SIZE as usize)
                .map(|b| *blake3::hash(b).as_bytes()),
        );
        done += n;
    }
    Ok(out)
}

/// The names of the snapshots `volume` holds on this store, for a catch-up's
/// `SnapshotList`. More than the wire carries is refused, not cut (a list cut short would
/// have the primary send a snapshot this copy holds already).
fn snapshot_names(
    store: &tessera_blockstore::Store,
    volume: &str,
) -> Result<Vec<VolumeName>, ReplyError> {
    let info = store.volume_info(volume).map_err(|e| reply_error(&e))?;
    if info.snapshots.len() > tessera_replication::wire::MAX_SNAPSHOT_NAMES as usize {
        return Err(ReplyError::Io(format!(
            "{} snapshots: more than a snapshot list carries",
            info.snapshots.len()
        )));
    }
    info.snapshots
        .iter()
        .map(|s| VolumeName::new(s.name.as_str()).map_err(|e| ReplyError::Io(e.to_string())))
        .collect()
}

/// A store error as the wire's typed refusal.
pub fn reply_error(e: &StoreError) -> ReplyError {
    match e {
        StoreError::NoSpace { .. } => ReplyError::NoSpace,
        StoreError::OutOfRange { .. } => ReplyError::OutOfRange,
        StoreError::NotFound(_) | StoreError::Gone(_) => ReplyError::UnknownVolume,
        StoreError::StaleGeneration { current, .. } => ReplyError::StaleGeneration {
            current: Generation(*current),
        },
        other => ReplyError::Io(other.to_string()),
    }
}

/// True for a request cheap enough to handle on an async worker: a write without FUA of
/// at most the primary's quick size (the page cache only, no sync).
fn quick_request(msg: &Message) -> bool {
    matches!(msg, Message::Write { fua: false, data, .. }
        if data.len() <= super::primary::QUICK_WRITE_MAX)
}

/// Logs at most one warning a second per kind, counting the ones it held back: a peer
/// sending garbage must not be able to fill the disk with log lines.
#[derive(Default)]
pub struct LogLimiter {
    last: Mutex<HashMap<&'static str, Instant>>,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// Logs `line()` unless `kind` was logged less than a second ago.
    pub fn warn(&self, kind: &'static str, line: impl FnOnce() -> String) {
        let now = Instant::now();
        let mut last = self.last.lock();
        match last.get(kind) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(1) => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                last.insert(kind, now);
                drop(last);
                let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
                tracing::warn!(suppressed, "{}", line());
            }
        }
    }
}
