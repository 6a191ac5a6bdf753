//! The primary's side of one volume: sequencing client requests, waiting for the in-sync
//! replicas, timeouts, removal, and being fenced.
//!
//! A [`Primary`] decides; the shell acts. The shell hands it inputs with the current time
//! ([`Primary::handle`], [`Primary::reconfigure`]) and performs the returned
//! [`PrimaryAction`]s **in order**: a [`PrimaryAction::RecordMissed`] must be durable
//! before any later action, since the completions after it rely on it.
//!
//! Rules:
//! - A client request gets the next seq of the generation, is sent to every in-sync
//!   replica and applied locally (the sends come first, so both run at once). Requests
//!   complete in seq order, each once the local apply and every in-sync replica
//!   acknowledged it. So a flush completes only after the local flush
//!   and every in-sync replica's flush, which each come after every earlier write.
//! - A replica that leaves a request unacknowledged for [`Timing::replica_timeout`] (or
//!   answers with an error) stops all completions: the primary emits
//!   [`PrimaryAction::RequestRemoval`] and completes nothing until the shell brings a newer
//!   configuration ([`Primary::reconfigure`]). From that configuration on, the regions the
//!   replica may lack (written and not covered by a flush it acknowledged) and every later
//!   write are recorded for it ([`PrimaryAction::RecordMissed`]).
//! - A snapshot ([`Op::Snapshot`]) is sequenced like a write: every copy applies it after
//!   the same ops, so every copy's snapshot holds the same writes. It completes like a
//!   flush (local and every in-sync replica), and is refused at once while a replica is
//!   out of sync or asked out ([`RequestError::NotAllInSync`]). A replica failing on it
//!   is a failed replica like any other.
//! - A resize ([`Op::Resize`]) is sequenced like a write: requests after it may reach
//!   the new end, and every copy grows before it applies them. It completes like a write.
//!   Only growth: a smaller size is refused ([`RequestError::Shrink`]).
//! - [`ReplyError::StaleGeneration`] naming a generation above this primary's means a newer
//!   generation exists: this primary is fenced, every pending and later request fails. One
//!   naming this primary's own generation answers a request sent before its latest
//!   configuration and is ignored.
//! - A configuration leaving fewer than 2 copies in sync (counting the primary's; fewer
//!   than the replica count when that is 1) is refused unless it carries the operator
//!   override.
//! - Replies carry no generation; they are matched on the stream's order. After each
//!   [`Message::Fence`] the primary ignores seq replies until that fence's reply (seq 0)
//!   came back, so a reply from before a generation change never acknowledges a request
//!   of the new one. The shell must give each connection its own stream and report
//!   [`PrimaryInput::Disconnected`] before [`PrimaryInput::Connected`] for a new one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::regions::{Region, RegionSet};
use crate::replica::Op;
use crate::wire::{Generation, Message, ReplyError, VolumeName, BLOCK_SIZE, MAX_DATA, SECTOR};

mod interface;
pub use interface::{
    Config, ConfigError, PrimaryAction, PrimaryInput, ReplicaId, RequestError, RequestId, Timing,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Running,
    /// Waiting for a configuration without the replicas asked out.
    Stalled,
    Fenced {
        current: Generation,
    },
    Failed,
}

#[derive(Debug)]
struct Pending {
    id: RequestId,
    op: Op,
    seq: u64,
    local_done: bool,
    acked: BTreeSet<ReplicaId>,
    /// When it was sent in the current generation (for the timeout).
    sent_at: Duration,
}

#[derive(Debug, Default)]
struct Link {
    connected: bool,
    /// Fences sent on the current stream whose reply has not come back.
    fences_outstanding: u32,
    last_sent: Duration,
    /// Regions written and not yet covered by a flush this replica acknowledged:
    /// (generation, seq, region).
    unflushed: Vec<(Generation, u64, Region)>,
}

/// One volume's primary state machine. See the module documentation for the rules.
#[derive(Debug)]
pub struct Primary {
    volume: VolumeName,
    volume_size: u64,
    config: Config,
    timing: Timing,
    mode: Mode,
    next_seq: u64,
    pending: VecDeque<Pending>,
    links: BTreeMap<ReplicaId, Link>,
    removal_requested: BTreeSet<ReplicaId>,
}

impl Primary {
    /// A primary for `volume` of `volume_size` bytes under `config`.
    pub fn new(
        volume: VolumeName,
        volume_size: u64,
        config: Config,
        timing: Timing,
    ) -> Result<Primary, ConfigError> {
        config.check()?;
        let links = config
            .in_sync
            .iter()
            .map(|r| (*r, Link::default()))
            .collect();
        Ok(Primary {
            volume,
            volume_size,
            config,
            timing,
            mode: Mode::Running,
            next_seq: 1,
            pending: VecDeque::new(),
            links,
            removal_requested: BTreeSet::new(),
        })
    }

    /// The volume's size, as the requests sequenced so far leave it.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The generation this primary writes in.
    pub fn generation(&self) -> Generation {
        self.config.generation
    }

    /// True once a replica reported a newer generation.
    pub fn is_fenced(&self) -> bool {
        matches!(self.mode, Mode::Fenced { .. })
    }

    /// The newer generation a replica reported, once fenced.
    pub fn fenced_by(&self) -> Option<Generation> {
        match self.mode {
            Mode::Fenced { current } => Some(current),
            _ => None,
        }
    }

    /// True while waiting for a configuration without a failed replica.
    pub fn is_stalled(&self) -> bool {
        self.mode == Mode::Stalled
    }

    /// Requests accepted and not completed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Handles one input at time `now` (any monotonic clock, the same for every call).
    pub fn handle(&mut self, now: Duration, input: PrimaryInput) -> Vec<PrimaryAction> {
        let mut out = Vec::new();
        match input {
            PrimaryInput::Request { id, op } => self.request(now, id, op, &mut out),
            PrimaryInput::LocalDone { id, result } => self.local_done(id, result, &mut out),
            PrimaryInput::Connected(r) => self.connected(now, r, &mut out),
            PrimaryInput::Disconnected(r) => {
                if let Some(link) = self.links.get_mut(&r) {
                    link.connected = false;
                    link.fences_outstanding = 0;
                }
            }
            PrimaryInput::Received { from, msg } => self.received(now, from, msg, &mut out),
            PrimaryInput::Tick => {}
        }
        self.check_replicas(now, &mut out);
        self.try_complete(&mut out);
        out
    }

    /// Takes the next configuration from the cluster (after a [`PrimaryAction::RequestRemoval`],
    /// or a replica back in sync). Refused unless newer and keeping enough copies in sync.
    pub fn reconfigure(
        &mut self,
        now: Duration,
        config: Config,
    ) -> Result<Vec<PrimaryAction>, ConfigError> {
        if matches!(self.mode, Mode::Fenced { .. } | Mode::Failed) {
            return Err(ConfigError::Stopped);
        }
        if config.generation <= self.config.generation {
            return Err(ConfigError::NotNewer {
                current: self.config.generation,
                offered: config.generation,
            });
        }
        config.check()?;
        let mut out = Vec::new();
        // What a replica leaving the in-sync set may lack becomes durable first.
        let leaving: Vec<ReplicaId> = self
            .config
            .in_sync
            .difference(&config.in_sync)
            .copied()
            .collect();
        for r in leaving {
            if let Some(link) = self.links.remove(&r) {
                if config.out_of_sync.contains(&r) {
                    let mut missed = RegionSet::new();
                    for (_, _, region) in &link.unflushed {
                        missed.insert(*region);
                    }
                    for region in missed.iter() {
                        out.push(PrimaryAction::RecordMissed { replica: r, region });
                    }
                }
            }
        }
        let joining: Vec<ReplicaId> = config
            .in_sync
            .difference(&self.config.in_sync)
            .copied()
            .collect();
        for r in joining {
            out.push(PrimaryAction::ForgetMissed { replica: r });
            self.links.insert(r, Link::default());
        }
        self.config = config;
        self.removal_requested
            .retain(|r| self.config.in_sync.contains(r));
        self.mode = if self.removal_requested.is_empty() {
            Mode::Running
        } else {
            Mode::Stalled
        };
        // Everything not completed goes again, in order, under the new generation.
        self.next_seq = 1;
        for p in &mut self.pending {
            p.seq = self.next_seq;
            self.next_seq += 1;
            p.acked.clear();
            p.sent_at = now;
        }
        let replicas: Vec<ReplicaId> = self.config.in_sync.iter().copied().collect();
        for r in replicas {
            self.fence_and_resend(now, r, &mut out);
        }
        self.try_complete(&mut out);
        Ok(out)
    }

    fn request(&mut self, now: Duration, id: RequestId, op: Op, out: &mut Vec<PrimaryAction>) {
        match self.mode {
            Mode::Fenced { current } => {
                out.push(complete(id, Err(RequestError::Fenced { current })));
                return;
            }
            Mode::Failed => {
                out.push(complete(
                    id,
                    Err(RequestError::LocalFailed(
                        "an earlier request failed".into(),
                    )),
                ));
                return;
            }
            Mode::Running | Mode::Stalled => {}
        }
        if matches!(op, Op::Snapshot { .. }) {
            // Only a snapshot every copy takes is consistent: refused while a replica is
            // out of sync (it would lack the snapshot) or asked out (the same, soon).
            let missing: Vec<ReplicaId> = self
                .config
                .out_of_sync
                .iter()
                .chain(self.removal_requested.iter())
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if !missing.is_empty() || self.mode == Mode::Stalled {
                out.push(complete(id, Err(RequestError::NotAllInSync(missing))));
                return;
            }
        }
        // What a resize adds counts as changed, like a write's region: a copy out of sync
        // (or leaving the in-sync set before it took the resize) has it recorded missed,
        // so its catch-up runs a pass, which grows it first, before it rejoins.
        let mut grown = None;
        if let Op::Resize { size } = op {
            if size == 0 || size % BLOCK_SIZE != 0 {
                out.push(complete(id, Err(RequestError::Misaligned)));
                return;
            }
            if size < self.volume_size {
                out.push(complete(
                    id,
                    Err(RequestError::Shrink {
                        size,
                        current: self.volume_size,
                    }),
                ));
                return;
            }
            grown = (size > self.volume_size).then_some(Region {
                offset: self.volume_size,
                len: size - self.volume_size,
            });
            // Requests sequenced after it may reach the new end: every copy applies them
            // after it, the local one included.
            self.volume_size = size;
        }
        let region = op_region(&op);
        if matches!(&op, Op::Write { data, .. } if data.len() > MAX_DATA) {
            out.push(complete(id, Err(RequestError::TooLarge)));
            return;
        }
        if let Some(region) = region {
            if region.offset % SECTOR != 0 || region.len % SECTOR != 0 || region.len == 0 {
                out.push(complete(id, Err(RequestError::Misaligned)));
                return;
            }
            if region
                .offset
                .checked_add(region.len)
                .is_none_or(|end| end > self.volume_size)
            {
                out.push(complete(id, Err(RequestError::OutOfRange)));
                return;
            }
            for r in &self.config.out_of_sync {
                out.push(PrimaryAction::RecordMissed {
                    replica: *r,
                    region,
                });
            }
        }
        if let Some(region) = grown {
            for r in &self.config.out_of_sync {
                out.push(PrimaryAction::RecordMissed {
                    replica: *r,
                    region,
                });
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let generation = self.config.generation;
        if let Some(region) = region.or(grown) {
            for link in self.links.values_mut() {
                link.unflushed.push((generation, seq, region));
            }
        }
        let pending = Pending {
            id,
            op,
            seq,
            local_done: false,
            acked: BTreeSet::new(),
            sent_at: now,
        };
        let msg = self.message(&pending);
        for (r, link) in &mut self.links {
            if link.connected {
                link.last_sent = now;
                out.push(PrimaryAction::Send {
                    to: *r,
                    msg: msg.clone(),
                });
            }
        }
        // After the sends: the replicas apply it while the shell applies it locally,
        // instead of waiting for the local copy first (a round trip later otherwise).
        out.push(PrimaryAction::ApplyLocal {
            id,
            op: pending.op.clone(),
        });
        self.pending.push_back(pending);
    }

    fn local_done(
        &mut self,
        id: RequestId,
        result: Result<(), ReplyError>,
        out: &mut Vec<PrimaryAction>,
    ) {
        match result {
            Ok(()) => {
                if let Some(p) = self.pending.iter_mut().find(|p| p.id == id) {
                    p.local_done = true;
                }
            }
            Err(e) => {
                // The local copy no longer matches what the replicas got: stop.
                self.mode = Mode::Failed;
                for p in self.pending.drain(..) {
                    out.push(complete(
                        p.id,
                        Err(RequestError::LocalFailed(e.to_string())),
                    ));
                }
            }
        }
    }

    fn connected(&mut self, now: Duration, r: ReplicaId, out: &mut Vec<PrimaryAction>) {
        if let Some(link) = self.links.get_mut(&r) {
            link.connected = true;
            link.fences_outstanding = 0;
        }
        if matches!(self.mode, Mode::Running | Mode::Stalled) {
            self.fence_and_resend(now, r, out);
        }
    }

    /// Sends the current generation's fence, then every request `r` has not acknowledged.
    fn fence_and_resend(&mut self, now: Duration, r: ReplicaId, out: &mut Vec<PrimaryAction>) {
        let Some(link) = self.links.get_mut(&r) else {
            return;
        };
        if !link.connected {
            return;
        }
        link.fences_outstanding += 1;
        link.last_sent = now;
        out.push(PrimaryAction::Send {
            to: r,
            msg: Message::Fence {
                volume: self.volume.clone(),
                generation: self.config.generation,
            },
        });
        self.resend(r, 0, out);
    }

    /// Sends every pending request from seq `from` that `r` has not acknowledged.
    fn resend(&self, r: ReplicaId, from: u64, out: &mut Vec<PrimaryAction>) {
        for p in &self.pending {
            if p.seq >= from && !p.acked.contains(&r) {
                out.push(PrimaryAction::Send {
                    to: r,
                    msg: self.message(p),
                });
            }
        }
    }

    fn received(
        &mut self,
        now: Duration,
        from: ReplicaId,
        msg: Message,
        out: &mut Vec<PrimaryAction>,
    ) {
        let Message::Reply { seq, result } = msg else {
            if !matches!(
                msg,
                Message::DigestsReply { .. }
                    | Message::ReadReply { .. }
                    | Message::UnsettledReply { .. }
                    | Message::SnapshotListReply { .. }
            ) {
                out.push(PrimaryAction::Disconnect {
                    replica: from,
                    reason: "a primary received a request; only replicas receive requests",
                });
            }
            // Digest and read replies belong to catch-up and repair, not wired here yet.
            return;
        };
        if let Err(ReplyError::StaleGeneration { current }) = result {
            // Only a generation above ours means another primary. A replica at ours (it
            // learned it from this primary's catch-up stream after a restart) refusing a
            // request this primary sent before its last configuration says nothing of the
            // kind; fencing on it stopped a primary for good (the fault schedule, seed
            // 1796249916819214427).
            if current > self.config.generation {
                self.fenced(current, out);
            }
            return;
        }
        if !matches!(self.mode, Mode::Running | Mode::Stalled) {
            return;
        }
        let Some(link) = self.links.get_mut(&from) else {
            // Not in sync (any more): nothing of ours waits for it.
            return;
        };
        if seq == 0 {
            link.fences_outstanding = link.fences_outstanding.saturating_sub(1);
            if result.is_err() {
                self.replica_failed(from, out);
            }
            return;
        }
        if link.fences_outstanding > 0 {
            // A reply from before the latest fence: another generation's seq.
            return;
        }
        match result {
            Ok(()) => {
                let generation = self.config.generation;
                let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) else {
                    return;
                };
                p.acked.insert(from);
                if p.op == Op::Flush {
                    link.unflushed
                        .retain(|(g, s, _)| *g == generation && *s > seq);
                }
            }
            Err(ReplyError::SeqGap { expected }) => {
                if self.pending.front().is_some_and(|p| p.seq <= expected) {
                    link.last_sent = now;
                    self.resend(from, expected, out);
                } else {
                    // It lacks a request we completed: it is not the copy we think it is.
                    self.replica_failed(from, out);
                }
            }
            Err(_) => self.replica_failed(from, out),
        }
    }

    fn fenced(&mut self, current: Generation, out: &mut Vec<PrimaryAction>) {
        if matches!(self.mode, Mode::Fenced { .. }) {
            return;
        }
        self.mode = Mode::Fenced { current };
        for p in self.pending.drain(..) {
            out.push(complete(p.id, Err(RequestError::Fenced { current })));
        }
    }

    fn replica_failed(&mut self, r: ReplicaId, out: &mut Vec<PrimaryAction>) {
        if !self.config.in_sync.contains(&r) || !self.removal_requested.insert(r) {
            return;
        }
        if self.mode == Mode::Running {
            self.mode = Mode::Stalled;
        }
        out.push(PrimaryAction::RequestRemoval {
            replica: r,
            generation: self.config.generation,
        });
    }

    /// Timeouts and resends.
    fn check_replicas(&mut self, now: Duration, out: &mut Vec<PrimaryAction>) {
        if !matches!(self.mode, Mode::Running | Mode::Stalled) {
            return;
        }
        let replicas: Vec<ReplicaId> = self.links.keys().copied().collect();
        for r in replicas {
            let Some(oldest) = self.pending.iter().find(|p| !p.acked.contains(&r)) else {
                continue;
            };
            if now.saturating_sub(oldest.sent_at) >= self.timing.replica_timeout {
                self.replica_failed(r, out);
                continue;
            }
            let Some(link) = self.links.get_mut(&r) else {
                continue;
            };
            if link.connected && now.saturating_sub(link.last_sent) >= self.timing.retransmit_after
            {
                link.last_sent = now;
                self.resend(r, 0, out);
            }
        }
    }

    fn try_complete(&mut self, out: &mut Vec<PrimaryAction>) {
        if self.mode != Mode::Running {
            return;
        }
        while let Some(p) = self.pending.front() {
            let done = p.local_done && self.config.in_sync.iter().all(|r| p.acked.contains(r));
            if !done {
                break;
            }
            if let Some(p) = self.pending.pop_front() {
                out.push(complete(p.id, Ok(())));
            }
        }
    }

    fn message(&self, p: &Pending) -> Message {
        let volume = self.volume.clone();
        let generation = self.config.generation;
        let seq = p.seq;
        match &p.op {
            Op::Write { offset, fua, data } => Message::Write {
                volume,
                generation,
                seq,
                offset: *offset,
                fua: *fua,
                data: data.clone(),
            },
            Op::WriteZeroes { offset, len } => Message::WriteZeroes {
                volume,
                generation,
                seq,
                offset: *offset,
                len: *len,
            },
            Op::Trim { offset, len } => Message::Trim {
                volume,
                generation,
                seq,
                offset: *offset,
                len: *len,
            },
            Op::Flush => Message::Flush {
                volume,
                generation,
                seq,
            },
            Op::Snapshot { name, size } => Message::Snapshot {
                volume,
                generation,
                seq,
                name: name.clone(),
                size: *size,
            },
            Op::Resize { size } => Message::Resize {
                volume,
                generation,
                seq,
                size: *size,
            },
        }
    }
}

fn complete(id: RequestId, result: Result<(), RequestError>) -> PrimaryAction {
    PrimaryAction::Complete { id, result }
}

/// The bytes an op changes (none for a flush).
pub fn op_region(op: &Op) -> Option<Region> {
    match op {
        Op::Write { offset, data, .. } => Some(Region {
            offset: *offset,
            len: data.len() as u64,
        }),
        Op::WriteZeroes { offset, len } | Op::Trim { offset, len } => Some(Region {
            offset: *offset,
            len: *len,
        }),
        Op::Flush | Op::Snapshot { .. } | Op::Resize { .. } => None,
    }
}

#[cfg(test)]
mod tests;
