//! A seeded, single-threaded simulation of one primary and two replicas over an in-memory
//! network, with the invariants of docs/replication.md checked on every run.
//!
//! Every frame goes through the real codec. The network keeps each stream's order (QUIC
//! does); faults are what QUIC and machines can do: a connection breaks and loses what was
//! in flight (both directions), streams and directions interleave in any order, a resend
//! duplicates requests, a replica crashes and loses what it had not flushed, another primary
//! fences the volume with a newer generation, the cluster moves a silent replica out of
//! the in-sync set. One injection goes beyond QUIC on purpose: two adjacent requests of
//! the same generation swap, so the replica's gap handling is exercised.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_replication::primary::{
    Config, Primary, PrimaryAction, PrimaryInput, ReplicaId, RequestId, Timing,
};
use tessera_replication::regions::RegionSet;
use tessera_replication::replica::{Op, Replica, ReplicaAction};
use tessera_replication::wire::{encode, Generation, Message, ReplyError, VolumeName};

mod model;
use model::{decode, msg_generation, sequenced, short, trace, write_id, Disk};

pub const BLOCK: u64 = 4096;
const BLOCKS: usize = 16;
const REPLICAS: [ReplicaId; 2] = [ReplicaId(1), ReplicaId(2)];
const USURPER: Generation = Generation(1000);

/// Bugs the checker must catch, planted in the shells around the real state machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    None,
    /// The primary's shell acknowledges every request to itself as soon as it sends it.
    PrimaryCompletesBeforeReplicaAcks,
    /// The replica's shell acknowledges flushes without making anything durable.
    ReplicaAcksFlushWithoutFlushing,
}

/// What one run did (to show the faults were exercised, not skipped).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub completed_writes: u64,
    pub committed_writes: u64,
    pub removals: u64,
    pub refused_configs: u64,
    pub fenced: u64,
    pub crashes: u64,
    pub breaks: u64,
    pub gaps: u64,
}

struct SimReplica {
    sm: Replica,
    disk: Disk,
    persisted: Generation,
    /// (generation, seq) -> write id, for the acks.
    seq_ids: HashMap<(Generation, u64), u64>,
    /// (generation, write id) -> step of the first ack.
    acked: HashMap<(Generation, u64), u64>,
    /// Step at which the usurper's generation became durable here.
    learned_usurper: Option<u64>,
}

#[derive(Default)]
struct Link {
    up: bool,
    to_replica: VecDeque<Vec<u8>>,
    to_primary: VecDeque<Vec<u8>>,
}

struct Sim {
    rng: StdRng,
    bug: Bug,
    step: u64,
    now: Duration,
    volume: VolumeName,
    primary: Primary,
    local: Disk,
    local_queue: VecDeque<RequestId>,
    replicas: BTreeMap<ReplicaId, SimReplica>,
    links: BTreeMap<ReplicaId, Link>,
    missed: BTreeMap<ReplicaId, RegionSet>,
    /// Config changes the cluster will hand over: (due, replica to move out).
    cluster: Vec<(Duration, ReplicaId)>,
    next_id: u64,
    /// Writes issued: id -> blocks.
    writes: HashMap<u64, Vec<usize>>,
    completed_writes: BTreeSet<u64>,
    /// Flush id -> writes completed when it was issued.
    flush_covers: HashMap<u64, Vec<u64>>,
    flushes: HashSet<u64>,
    /// Per block: the newest write a completed flush (or FUA) made a promise for.
    committed: Vec<u64>,
    fua: HashSet<u64>,
    /// Replica crashes this run may still inject (0-2, so some runs keep both replicas).
    crash_budget: u32,
    stats: Stats,
}

pub fn run(seed: u64, bug: Bug) -> Result<Stats, String> {
    let volume = VolumeName::new("sim").map_err(|e| e.to_string())?;
    let config = Config {
        generation: Generation(1),
        replica_count: 3,
        in_sync: REPLICAS.into_iter().collect(),
        out_of_sync: BTreeSet::new(),
        operator_override: false,
    };
    let timing = Timing {
        retransmit_after: Duration::from_millis(200),
        replica_timeout: Duration::from_millis(1500),
    };
    let primary = Primary::new(volume.clone(), BLOCKS as u64 * BLOCK, config, timing)
        .map_err(|e| e.to_string())?;
    let mut sim = Sim {
        rng: StdRng::seed_from_u64(seed),
        bug,
        step: 0,
        now: Duration::ZERO,
        volume: volume.clone(),
        primary,
        local: Disk::new(),
        local_queue: VecDeque::new(),
        replicas: REPLICAS
            .iter()
            .map(|r| {
                (
                    *r,
                    SimReplica {
                        sm: Replica::new(volume.clone()),
                        disk: Disk::new(),
                        persisted: Generation(0),
                        seq_ids: HashMap::new(),
                        acked: HashMap::new(),
                        learned_usurper: None,
                    },
                )
            })
            .collect(),
        links: REPLICAS.iter().map(|r| (*r, Link::default())).collect(),
        missed: BTreeMap::new(),
        cluster: Vec::new(),
        next_id: 1,
        writes: HashMap::new(),
        completed_writes: BTreeSet::new(),
        flush_covers: HashMap::new(),
        flushes: HashSet::new(),
        committed: vec![0; BLOCKS],
        fua: HashSet::new(),
        crash_budget: 0,
        stats: Stats::default(),
    };
    sim.crash_budget = sim.rng.gen_range(0..=2);
    for r in REPLICAS {
        sim.connect(r)?;
    }
    let usurp = sim.rng.gen_bool(0.2);
    let steps = 400;
    for _ in 0..steps {
        sim.step += 1;
        sim.random_event(usurp)?;
    }
    sim.heal()?;
    sim.check_durability()?;
    Ok(sim.stats)
}

impl Sim {
    fn random_event(&mut self, usurp: bool) -> Result<(), String> {
        let roll = self.rng.gen_range(0..1000);
        let r = REPLICAS[self.rng.gen_range(0..REPLICAS.len())];
        match roll {
            0..=149 => self.client_request(),
            150..=449 => self.deliver_to_replica(r),
            450..=699 => self.deliver_to_primary(r),
            700..=799 => self.local_done(),
            800..=899 => {
                self.now += Duration::from_millis(self.rng.gen_range(1..150));
                self.cluster_step()?;
                self.primary_input(PrimaryInput::Tick)
            }
            900..=919 => self.break_link(r),
            920..=959 => {
                if self.links[&r].up {
                    Ok(())
                } else {
                    self.connect(r)
                }
            }
            960..=974 => {
                self.duplicate(r);
                Ok(())
            }
            975..=989 => {
                self.swap_requests(r);
                Ok(())
            }
            990..=994 => {
                if self.crash_budget > 0 {
                    self.crash_budget -= 1;
                    self.crash(r)
                } else {
                    Ok(())
                }
            }
            _ => {
                if usurp {
                    self.usurp(r)
                } else {
                    Ok(())
                }
            }
        }
    }

    fn client_request(&mut self) -> Result<(), String> {
        if self.next_id > 80 {
            return Ok(());
        }
        let id = self.next_id;
        self.next_id += 1;
        let op = if self.rng.gen_bool(0.2) {
            self.flushes.insert(id);
            self.flush_covers
                .insert(id, self.completed_writes.iter().copied().collect());
            Op::Flush
        } else {
            let blocks = self.rng.gen_range(1..=2usize);
            let first = self.rng.gen_range(0..=BLOCKS - blocks);
            let fua = self.rng.gen_bool(0.1);
            if fua {
                self.fua.insert(id);
            }
            let mut data = Vec::with_capacity(blocks * BLOCK as usize);
            for _ in 0..blocks {
                for _ in 0..BLOCK / 8 {
                    data.extend_from_slice(&id.to_le_bytes());
                }
            }
            self.writes.insert(id, (first..first + blocks).collect());
            Op::Write {
                offset: first as u64 * BLOCK,
                fua,
                data,
            }
        };
        self.primary_input(PrimaryInput::Request {
            id: RequestId(id),
            op,
        })
    }

    fn primary_input(&mut self, input: PrimaryInput) -> Result<(), String> {
        let actions = self.primary.handle(self.now, input);
        self.primary_actions(actions)
    }

    fn primary_actions(&mut self, actions: Vec<PrimaryAction>) -> Result<(), String> {
        let mut fake_acks = Vec::new();
        for action in actions {
            if trace() {
                eprintln!("{} primary: {}", self.step, short(&format!("{action:?}")));
            }
            match action {
                PrimaryAction::RecordMissed { replica, region } => {
                    self.missed.entry(replica).or_default().insert(region);
                }
                PrimaryAction::ForgetMissed { replica } => {
                    self.missed.remove(&replica);
                }
                PrimaryAction::ApplyLocal { id, op } => {
                    self.local.apply(&op, true);
                    self.local_queue.push_back(id);
                }
                PrimaryAction::Send { to, msg } => {
                    if self.bug == Bug::PrimaryCompletesBeforeReplicaAcks {
                        if let Some(seq) = sequenced(&msg) {
                            fake_acks.push((to, seq));
                        }
                    }
                    let frame = encode(&msg).map_err(|e| format!("encode: {e}"))?;
                    if let Some(link) = self.links.get_mut(&to) {
                        if link.up {
                            link.to_replica.push_back(frame);
                        }
                    }
                }
                PrimaryAction::Complete { id, result } => {
                    if result.is_ok() {
                        self.completed(id.0)?;
                    }
                }
                PrimaryAction::RequestRemoval { replica, .. } => {
                    self.stats.removals += 1;
                    let due = self.now + Duration::from_millis(self.rng.gen_range(0..400));
                    self.cluster.push((due, replica));
                }
                PrimaryAction::Disconnect { reason, .. } => {
                    return Err(format!("primary disconnected a replica: {reason}"));
                }
            }
        }
        for (from, seq) in fake_acks {
            self.primary_input(PrimaryInput::Received {
                from,
                msg: Message::Reply {
                    seq,
                    result: Ok(()),
                },
            })?;
        }
        if self.primary.is_fenced() {
            self.stats.fenced = 1;
        }
        let config = self.primary.config();
        if config.copies_in_sync() < 2 && !config.operator_override {
            return Err(format!(
                "in-sync set below 2 of 3 without the override: {config:?}"
            ));
        }
        Ok(())
    }

    /// A request completed: check it earned it, and note what it promises.
    fn completed(&mut self, id: u64) -> Result<(), String> {
        let generation = self.primary.generation();
        let in_sync = self.primary.config().in_sync.clone();
        if let Some(blocks) = self.writes.get(&id).cloned() {
            for r in &in_sync {
                let rep = &self.replicas[r];
                let Some(&ack_step) = rep.acked.get(&(generation, id)) else {
                    return Err(format!(
                        "write {id} completed in generation {generation} without an ack from in-sync replica {r:?}"
                    ));
                };
                if let Some(learned) = rep.learned_usurper {
                    if ack_step >= learned {
                        return Err(format!(
                            "write {id} acked by {r:?} at step {ack_step}, after it learned the newer generation at {learned}"
                        ));
                    }
                }
            }
            self.completed_writes.insert(id);
            self.stats.completed_writes += 1;
            if self.fua.contains(&id) {
                self.commit(id, &blocks);
            }
        } else if let Some(covered) = self.flush_covers.get(&id).cloned() {
            for w in covered {
                let blocks = self.writes[&w].clone();
                self.commit(w, &blocks);
            }
        }
        Ok(())
    }

    fn commit(&mut self, id: u64, blocks: &[usize]) {
        self.stats.committed_writes += 1;
        for b in blocks {
            self.committed[*b] = self.committed[*b].max(id);
        }
    }

    fn local_done(&mut self) -> Result<(), String> {
        match self.local_queue.pop_front() {
            Some(id) => self.primary_input(PrimaryInput::LocalDone { id, result: Ok(()) }),
            None => Ok(()),
        }
    }

    fn deliver_to_replica(&mut self, r: ReplicaId) -> Result<(), String> {
        let Some(frame) = self
            .links
            .get_mut(&r)
            .and_then(|l| l.to_replica.pop_front())
        else {
            return Ok(());
        };
        let msg = decode(&frame)?;
        let replies = self.replica_handle(r, msg)?;
        let link = self.links.get_mut(&r).ok_or("no link")?;
        for reply in replies {
            link.to_primary
                .push_back(encode(&reply).map_err(|e| e.to_string())?);
        }
        Ok(())
    }

    /// Runs one message through a replica and its shell; returns what it sends back.
    fn replica_handle(&mut self, r: ReplicaId, msg: Message) -> Result<Vec<Message>, String> {
        let step = self.step;
        let flush_works = self.bug != Bug::ReplicaAcksFlushWithoutFlushing;
        let rep = self.replicas.get_mut(&r).ok_or("no replica")?;
        let incoming = msg_generation(&msg);
        let before = rep.sm.generation();
        let mut out = Vec::new();
        if trace() {
            eprintln!("{step} replica {r:?} gets {}", short(&format!("{msg:?}")));
        }
        let mut actions: VecDeque<ReplicaAction> = rep.sm.handle(msg).into();
        while let Some(action) = actions.pop_front() {
            match action {
                ReplicaAction::PersistGeneration(g) => {
                    rep.persisted = g;
                    if g >= USURPER && rep.learned_usurper.is_none() {
                        rep.learned_usurper = Some(step);
                    }
                }
                ReplicaAction::Apply { seq, op } => {
                    if let Op::Write { data, .. } = &op {
                        let id = write_id(data);
                        rep.seq_ids.insert((rep.sm.generation(), seq), id);
                    }
                    rep.disk.apply(&op, flush_works);
                    for a in rep.sm.applied(seq, Ok(())) {
                        actions.push_front(a);
                    }
                }
                ReplicaAction::Send(reply) => {
                    if let Message::Reply { seq, result } = &reply {
                        match result {
                            Ok(()) => {
                                let g = rep.sm.generation();
                                if let Some(id) = rep.seq_ids.get(&(g, *seq)) {
                                    rep.acked.entry((g, *id)).or_insert(step);
                                }
                            }
                            Err(ReplyError::SeqGap { .. }) => self.stats.gaps += 1,
                            Err(_) => {}
                        }
                    }
                    if let (Some(g), Message::Reply { result, .. }) = (incoming, &reply) {
                        if g < before && !matches!(result, Err(ReplyError::StaleGeneration { .. }))
                        {
                            return Err(format!(
                                "replica {r:?} at generation {before} answered a generation-{g} request with {result:?}"
                            ));
                        }
                    }
                    out.push(reply);
                }
                ReplicaAction::ReadDigests { .. }
                | ReplicaAction::Read { .. }
                | ReplicaAction::ReadSnapshot { .. }
                | ReplicaAction::Repair { .. }
                | ReplicaAction::ReportUnsettled { .. }
                | ReplicaAction::ListSnapshots { .. } => {}
                ReplicaAction::Disconnect { reason } => {
                    return Err(format!("replica disconnected: {reason}"));
                }
            }
        }
        Ok(out)
    }

    fn deliver_to_primary(&mut self, r: ReplicaId) -> Result<(), String> {
        let Some(frame) = self
            .links
            .get_mut(&r)
            .and_then(|l| l.to_primary.pop_front())
        else {
            return Ok(());
        };
        let msg = decode(&frame)?;
        self.primary_input(PrimaryInput::Received { from: r, msg })
    }

    fn break_link(&mut self, r: ReplicaId) -> Result<(), String> {
        let link = self.links.get_mut(&r).ok_or("no link")?;
        if !link.up {
            return Ok(());
        }
        self.stats.breaks += 1;
        if trace() {
            eprintln!("{} link to {r:?} breaks", self.step);
        }
        *link = Link::default();
        self.primary_input(PrimaryInput::Disconnected(r))
    }

    fn connect(&mut self, r: ReplicaId) -> Result<(), String> {
        self.links.insert(
            r,
            Link {
                up: true,
                ..Link::default()
            },
        );
        self.primary_input(PrimaryInput::Connected(r))
    }

    /// Delivers the next request to `r` twice, as a resend would (QUIC itself never
    /// duplicates a frame, and replies are never duplicated: see docs/replication.md).
    fn duplicate(&mut self, r: ReplicaId) {
        let link = self.links.get_mut(&r).expect("link");
        let Some(front) = link.to_replica.front().cloned() else {
            return;
        };
        if decode(&front).ok().as_ref().and_then(sequenced).is_some() {
            link.to_replica.push_front(front);
        }
    }

    /// Swaps the first two queued requests to `r` if both are sequenced in one generation.
    fn swap_requests(&mut self, r: ReplicaId) {
        let link = self.links.get_mut(&r).expect("link");
        if link.to_replica.len() < 2 {
            return;
        }
        let (Ok(a), Ok(b)) = (decode(&link.to_replica[0]), decode(&link.to_replica[1])) else {
            return;
        };
        if sequenced(&a).is_some()
            && sequenced(&b).is_some()
            && msg_generation(&a) == msg_generation(&b)
        {
            link.to_replica.swap(0, 1);
        }
    }

    /// The replica's machine loses power: what it had not flushed is gone, and so is the link.
    fn crash(&mut self, r: ReplicaId) -> Result<(), String> {
        if trace() {
            eprintln!("{} replica {r:?} crashes", self.step);
        }
        self.stats.crashes += 1;
        let volume = self.volume.clone();
        let rep = self.replicas.get_mut(&r).ok_or("no replica")?;
        rep.disk.volatile = rep.disk.durable.clone();
        rep.sm = Replica::restarted(volume, rep.persisted);
        self.break_link(r)
    }

    /// Another primary (elsewhere in the cluster) fences replica `r` with a newer generation.
    fn usurp(&mut self, r: ReplicaId) -> Result<(), String> {
        let fence = Message::Fence {
            volume: self.volume.clone(),
            generation: USURPER,
        };
        self.replica_handle(r, fence)?;
        Ok(())
    }

    /// The cluster answers removal requests that are due.
    fn cluster_step(&mut self) -> Result<(), String> {
        let now = self.now;
        let due: Vec<ReplicaId> = self
            .cluster
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, r)| *r)
            .collect();
        self.cluster.retain(|(t, _)| *t > now);
        for r in due {
            let mut config = self.primary.config().clone();
            if !config.in_sync.remove(&r) {
                continue;
            }
            config.out_of_sync.insert(r);
            config.generation = config.generation.next();
            match self.primary.reconfigure(self.now, config) {
                Ok(actions) => self.primary_actions(actions)?,
                Err(_) => self.stats.refused_configs += 1,
            }
        }
        Ok(())
    }

    /// No more faults: reconnect, deliver everything, let time pass until it settles.
    fn heal(&mut self) -> Result<(), String> {
        for r in REPLICAS {
            if !self.links[&r].up {
                self.connect(r)?;
            }
        }
        let mut final_flush = false;
        for round in 0..200 {
            self.step += 1;
            for r in REPLICAS {
                while !self.links[&r].to_replica.is_empty() {
                    self.deliver_to_replica(r)?;
                }
                while !self.links[&r].to_primary.is_empty() {
                    self.deliver_to_primary(r)?;
                }
            }
            while !self.local_queue.is_empty() {
                self.local_done()?;
            }
            if self.primary.pending() == 0 && self.cluster.is_empty() {
                if final_flush || self.primary.is_fenced() {
                    break;
                }
                // One last flush, so every completed write gets a promise to check.
                final_flush = true;
                self.client_request_flush()?;
                continue;
            }
            let _ = round;
            self.now += Duration::from_millis(100);
            self.cluster_step()?;
            self.primary_input(PrimaryInput::Tick)?;
        }
        Ok(())
    }

    fn client_request_flush(&mut self) -> Result<(), String> {
        let id = self.next_id;
        self.next_id += 1;
        self.flushes.insert(id);
        self.flush_covers
            .insert(id, self.completed_writes.iter().copied().collect());
        self.primary_input(PrimaryInput::Request {
            id: RequestId(id),
            op: Op::Flush,
        })
    }

    /// Every promised write is durable on the primary and every in-sync replica, and on
    /// every out-of-sync replica unless its block is in that replica's missed record.
    fn check_durability(&self) -> Result<(), String> {
        let config = self.primary.config();
        for b in 0..BLOCKS {
            let promised = self.committed[b];
            if self.local.durable[b] < promised {
                return Err(format!(
                    "block {b}: the primary's durable copy holds write {} but write {promised} was promised",
                    self.local.durable[b]
                ));
            }
            for r in REPLICAS {
                let held = self.replicas[&r].disk.durable[b];
                if held >= promised {
                    continue;
                }
                let in_missed = self
                    .missed
                    .get(&r)
                    .is_some_and(|m| m.contains(b as u64 * BLOCK));
                if config.in_sync.contains(&r) || !in_missed {
                    return Err(format!(
                        "block {b}: replica {r:?} ({}) durably holds write {held} but write {promised} was promised{}",
                        if config.in_sync.contains(&r) { "in sync" } else { "out of sync" },
                        if in_missed { "" } else { ", and the block is not in its missed record" }
                    ));
                }
            }
        }
        Ok(())
    }
}
