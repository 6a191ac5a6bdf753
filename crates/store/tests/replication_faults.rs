//! A seeded, reproducible random fault schedule (issue #8, store side): three
//! `tessera-store` processes, a verifying workload writing through the primary the whole
//! time, and per cycle one fault drawn from the seed: a replica's store killed (SIGKILL),
//! the primary's store killed, the primary cut off (SIGSTOP: it answers nothing and keeps
//! its state, as behind a partition) or a replica cut off; then healed. The test plays the
//! cluster as `tesserad` does (out of the in-sync set with a generation raise, a new
//! primary from the in-sync replicas, catch-up, rejoin primary first), see
//! docs/replication.md. After each healing, with the workload paused: every copy
//! blake3-identical, and every block holds the last write a completed flush covered or a
//! later write the workload issued to it (never an older one, nothing foreign); a primary
//! cut off and resumed got no write acknowledged, and its write is on no copy.
//! Copies differing after a failover on a write the old primary never completed (finding 1
//! in docs/replication.md) are fixed: the new primary reconciles the last changes of
//! every copy first (`crates/store/src/repl/primary/reconcile.rs`), and every block of
//! every copy must be equal. A copy failing right after it rejoined (finding 2) is let
//! through and printed (`FINDING`; caught up again, as the cluster does).
//!
//! `TESSERA_FAULT_SEED` repeats a schedule (the seed is printed), `TESSERA_FAULT_CYCLES`
//! (default 50) sets its length: `TESSERA_FAULT_CYCLES=500` is the soak run.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_pki::ClusterCa;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaState, ReplicationRole, VolumeReplication};

mod support;
use support::*;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 1024;
/// Ids of writes sent to a primary that was cut off: none may be acknowledged or kept.
const FENCED: u64 = 1 << 62;

/// splitmix64: the schedule of a seed must not change with a dependency's version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Write `id` to `block`: id and block first, the rest derived from both, so a block read
/// back names the write it holds and a torn or foreign block shows.
fn payload(seed: u64, id: u64, block: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&id.to_le_bytes());
    h.update(&block.to_le_bytes());
    h.finalize_xof().fill(&mut out[16..]);
    out
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Outcome {
    Sent,
    Acked,
    Failed,
}

/// What the workload did: each write recorded before it is sent, then its outcome.
#[derive(Default)]
struct Log {
    /// Per block, its writes in order: (id, outcome).
    writes: HashMap<u64, Vec<(u64, Outcome)>>,
    /// Every write acknowledged with an id up to this one was covered by a completed flush.
    flushed_upto: u64,
    acked: u64,
    failed: u64,
    flushes: u64,
}

impl Log {
    /// Why `data`, read from `block` of a copy, is not a content the workload allows.
    fn check(&self, seed: u64, block: u64, data: &[u8]) -> Result<(), String> {
        let id = if data.iter().all(|b| *b == 0) {
            0
        } else {
            let id = u64::from_le_bytes(data[..8].try_into().unwrap());
            if data != payload(seed, id, block).as_slice() {
                return Err(format!(
                    "block {block} holds no write of the workload (torn or foreign, id field {id})"
                ));
            }
            id
        };
        if id >= FENCED {
            return Err(format!(
                "block {block} holds write {id} sent to a fenced primary"
            ));
        }
        let empty = Vec::new();
        let ws = self.writes.get(&block).unwrap_or(&empty);
        let durable = ws
            .iter()
            .filter(|(i, o)| *o == Outcome::Acked && *i <= self.flushed_upto)
            .map(|(i, _)| *i)
            .max();
        let issued = |id: u64| ws.iter().any(|(i, _)| *i == id);
        let ok = match durable {
            Some(d) => id == d || (id > d && issued(id)),
            None => id == 0 || issued(id),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "block {block} holds write {id}; the last flushed write to it is {durable:?}, its writes {ws:?}"
            ))
        }
    }
}

/// The workload's state, shared with the test.
struct Shared {
    seed: u64,
    log: Mutex<Log>,
    /// The NBD socket of the store the cluster made the primary.
    target: Mutex<PathBuf>,
    pause: AtomicBool,
    paused: AtomicBool,
    stop: AtomicBool,
}

/// One client at a time, one request in flight (so "completed before the flush was sent"
/// is the order of the log): random 4 KiB writes, a flush every eight, to the current
/// primary; a failed request drops the connection and the next one goes to the target.
fn workload(sh: &Shared, mut rng: Rng) {
    let mut client = None;
    let mut next_id = 1u64;
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.pause.load(Ordering::SeqCst) {
            client = None;
            sh.paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        sh.paused.store(false, Ordering::SeqCst);
        let c = match &mut client {
            Some(c) => c,
            None => {
                let target = sh.target.lock().unwrap().clone();
                match tessera_nbd::Client::connect_unix(&target, "v") {
                    Ok(c) => client.insert(c),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
            }
        };
        if rng.below(8) == 0 {
            let upto = next_id - 1;
            if c.flush().is_ok() {
                let mut log = sh.log.lock().unwrap();
                log.flushed_upto = log.flushed_upto.max(upto);
                log.flushes += 1;
            } else {
                client = None;
            }
            continue;
        }
        let (id, block) = (next_id, rng.below(BLOCKS));
        next_id += 1;
        let ws = {
            let mut log = sh.log.lock().unwrap();
            let ws = log.writes.entry(block).or_default();
            ws.push((id, Outcome::Sent));
            ws.len() - 1
        };
        let ok = c
            .write(block * BLOCK as u64, &payload(sh.seed, id, block), false)
            .is_ok();
        let mut log = sh.log.lock().unwrap();
        log.writes.get_mut(&block).unwrap()[ws].1 =
            if ok { Outcome::Acked } else { Outcome::Failed };
        if ok {
            log.acked += 1;
        } else {
            log.failed += 1;
            drop(log);
            client = None;
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The cluster's view of volume `v`, kept by the test as `tesserad` keeps it in Raft.
struct Cluster {
    generation: u64,
    primary: usize,
    /// The replicas in the in-sync set.
    in_sync: Vec<usize>,
}

fn status(n: &Node) -> VolumeReplication {
    match n.admin(AdminOp::ReplicationStatus {}) {
        Ok(AdminReply::Replication(all)) => all.into_iter().find(|v| v.volume == "v").unwrap(),
        other => panic!("{}: replication status: {other:?}", n.id),
    }
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn set(n: &Node, generation: u64, role: ReplicationRole) {
    if let Err(e) = n.admin(AdminOp::SetReplication {
        volume: "v".into(),
        generation,
        role,
    }) {
        panic!("{}: set_replication in generation {generation}: {e}", n.id);
    }
}

fn replica(catching_up: bool) -> ReplicationRole {
    ReplicationRole::Replica { catching_up }
}

impl Cluster {
    /// Tells the primary its in-sync replicas and those `catching_up`, in a new generation.
    fn configure(&mut self, nodes: &[Node], catching_up: &[usize]) {
        self.generation += 1;
        let r: Vec<&Node> = self.in_sync.iter().map(|i| &nodes[*i]).collect();
        let c: Vec<&Node> = catching_up.iter().map(|i| &nodes[*i]).collect();
        let role = primary_role(
            &r,
            &c,
            serde_json::json!({"timeout_ms": 1000, "cluster_wait_ms": 2000}),
        );
        set(&nodes[self.primary], self.generation, role);
    }

    /// Failover: the first in-sync replica becomes the primary in a new generation and
    /// catches `old` up (its copy compared over the whole volume: no record of it there).
    fn fail_over(&mut self, nodes: &[Node], sh: &Shared, old: usize) {
        self.primary = self.in_sync.remove(0);
        self.configure(nodes, &[old]);
        *sh.target.lock().unwrap() = nodes[self.primary].dir.join("nbd.sock");
    }

    /// `x`, told it is catching up, is caught up and rejoins: the primary first, then `x`
    /// once its store holds the new generation (the primary's fence).
    fn heal(&mut self, nodes: &[Node], x: usize) {
        let p = self.primary;
        let caught_up = || {
            status(&nodes[p])
                .replicas
                .iter()
                .any(|r| r.node == nodes[x].id && r.state == ReplicaState::CaughtUp {})
        };
        wait_until(
            &format!("{} caught up by {}", nodes[x].id, nodes[p].id),
            60,
            caught_up,
        );
        self.in_sync.push(x);
        self.configure(nodes, &[]);
        let g = self.generation;
        wait_until(&format!("{} holds generation {g}", nodes[x].id), 30, || {
            status(&nodes[x]).generation >= g
        });
        set(&nodes[x], g, replica(false));
    }

    /// The replica the primary reports failed, if any, with the workload paused (its
    /// request in flight has completed or failed by then).
    fn failed_replica(&self, nodes: &[Node], sh: &Shared) -> Option<(usize, String)> {
        sh.pause.store(true, Ordering::SeqCst);
        wait_until("the workload paused", 60, || {
            sh.paused.load(Ordering::SeqCst)
        });
        let s = status(&nodes[self.primary]);
        let failed = s.replicas.iter().find_map(|r| match &r.state {
            ReplicaState::Failed { reason } => Some((r.node.clone(), reason.clone())),
            _ => None,
        })?;
        let x = nodes.iter().position(|n| n.id == failed.0).unwrap();
        Some((x, failed.1))
    }

    /// What `tesserad`'s resync does with a replica its primary reports failed: out of
    /// the in-sync set in a new generation, caught up, rejoined.
    fn resync(&mut self, nodes: &[Node], sh: &Shared, x: usize) {
        self.in_sync.retain(|i| *i != x);
        self.configure(nodes, &[x]);
        sh.pause.store(false, Ordering::SeqCst);
        let g = self.generation;
        wait_until(&format!("{} holds generation {g}", nodes[x].id), 30, || {
            status(&nodes[x]).generation >= g
        });
        set(&nodes[x], g, replica(true));
        self.heal(nodes, x);
    }
}

/// Pauses the workload and checks every copy (see the module's comment): every block
/// allowed by the log, and every copy equal to the primary's.
fn verify(nodes: &[Node], c: &Cluster, sh: &Shared, cycle: usize, what: &str) {
    sh.pause.store(true, Ordering::SeqCst);
    wait_until("the workload paused", 60, || {
        sh.paused.load(Ordering::SeqCst)
    });
    let s = status(&nodes[c.primary]);
    assert!(
        s.replicas.len() == 2
            && s.replicas
                .iter()
                .all(|r| r.state == ReplicaState::InSync {}),
        "cycle {cycle} ({what}): not all in sync after healing: {s:?}"
    );
    let copies: Vec<Vec<u8>> = nodes
        .iter()
        .map(|n| {
            let mut buf = vec![0u8; BLOCKS as usize * BLOCK];
            let mut client = n.nbd("v");
            for (i, chunk) in buf.chunks_mut(1 << 20).enumerate() {
                client.read(i as u64 * (1 << 20), chunk).unwrap();
            }
            buf
        })
        .collect();
    let log = sh.log.lock().unwrap();
    let seed = sh.seed;
    for (i, copy) in copies.iter().enumerate() {
        for (b, data) in copy.chunks(BLOCK).enumerate() {
            if let Err(e) = log.check(seed, b as u64, data) {
                panic!(
                    "cycle {cycle} ({what}), seed {seed}, {}'s copy: {e}",
                    nodes[i].id
                );
            }
        }
    }
    let p = &copies[c.primary];
    let id = |d: &[u8]| u64::from_le_bytes(d[..8].try_into().unwrap());
    for (i, copy) in copies.iter().enumerate() {
        if blake3::hash(copy) == blake3::hash(p) {
            continue;
        }
        for (blk, (a, b)) in p.chunks(BLOCK).zip(copy.chunks(BLOCK)).enumerate() {
            if a == b {
                continue;
            }
            let blk = blk as u64;
            let why = format!(
                "cycle {cycle} ({what}), seed {seed}: {}'s copy differs from the primary {}'s at block {blk}: \
                 primary write {}, {} write {} (flushed up to write {}; the block's writes {:?})",
                nodes[i].id,
                nodes[c.primary].id,
                id(a),
                nodes[i].id,
                id(b),
                log.flushed_upto,
                log.writes.get(&blk)
            );
            panic!("{why}");
        }
    }
    drop(log);
    sh.pause.store(false, Ordering::SeqCst);
}

/// `TESSERA_FAULT_SEED`, or `default`, or the clock.
fn seed(default: Option<u64>) -> u64 {
    std::env::var("TESSERA_FAULT_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("TESSERA_FAULT_SEED: a number"))
        .or(default)
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[test]
fn a_seeded_random_fault_schedule_loses_no_flushed_write_and_leaves_equal_copies() {
    schedule(seed(None));
}

/// The failover gap the schedule found (seed 1796248549054495077, cycles 37 and 39: the
/// primary cut off while a write was in flight): the replica that became the primary had
/// not applied the write, the other replica had, and nothing made them equal again. The
/// new primary now reconciles the last changes of every copy before it takes requests.
/// The seed fixes the schedule, not the timing: the moment of the cut-off decides whether
/// a write is in flight (one request at a time, so in most cut-offs one is).
#[test]
fn after_a_failover_every_copy_is_identical() {
    schedule(seed(Some(1796248549054495077)));
}

fn schedule(seed: u64) {
    let cycles: usize = std::env::var("TESSERA_FAULT_CYCLES")
        .ok()
        .map(|s| s.parse().expect("TESSERA_FAULT_CYCLES: a number"))
        .unwrap_or(50);
    eprintln!(
        "fault schedule: seed {seed}, {cycles} cycles (TESSERA_FAULT_SEED={seed} repeats it)"
    );
    let mut rng = Rng(seed);

    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-faults-test").unwrap();
    let mut nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    for n in &nodes {
        n.create("v", BLOCKS * BLOCK as u64);
    }
    let mut c = Cluster {
        generation: 1,
        primary: 0,
        in_sync: vec![1, 2],
    };
    set(&nodes[1], 2, replica(false));
    set(&nodes[2], 2, replica(false));
    c.configure(&nodes, &[]);

    let sh = Arc::new(Shared {
        seed,
        log: Mutex::new(Log::default()),
        target: Mutex::new(nodes[0].dir.join("nbd.sock")),
        pause: AtomicBool::new(false),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let writer = {
        let (sh, rng) = (sh.clone(), Rng(rng.next()));
        std::thread::spawn(move || workload(&sh, rng))
    };

    let started = Instant::now();
    let mut counts = [0usize; 4];
    let mut rejoins_failed = 0;
    for cycle in 0..cycles {
        let kind = rng.below(4) as usize;
        counts[kind] += 1;
        // How long the fault lasts while the workload goes on.
        let away = Duration::from_millis(50 + rng.below(400));
        let p = c.primary;
        let what;
        match kind {
            0 => {
                let r = c.in_sync.remove(rng.below(2) as usize);
                what = format!("{}'s store (a replica) killed", nodes[r].id);
                nodes[r].kill();
                c.configure(&nodes, &[r]);
                std::thread::sleep(away);
                nodes[r].restart();
                set(&nodes[r], c.generation, replica(true));
                c.heal(&nodes, r);
            }
            1 => {
                what = format!("{}'s store (the primary) killed", nodes[p].id);
                nodes[p].kill();
                c.fail_over(&nodes, &sh, p);
                std::thread::sleep(away);
                nodes[p].restart();
                set(&nodes[p], c.generation, replica(true));
                c.heal(&nodes, p);
            }
            2 => {
                what = format!("{} (the primary) cut off", nodes[p].id);
                let mut stale = nodes[p].nbd("v");
                nodes[p].signal("STOP");
                c.fail_over(&nodes, &sh, p);
                std::thread::sleep(away);
                nodes[p].signal("CONT");
                // The old primary still thinks it is one: its write must not be
                // acknowledged (the new primary and the fenced replica refuse it).
                let block = rng.below(BLOCKS);
                let id = FENCED + cycle as u64;
                let r = stale.write(block * BLOCK as u64, &payload(seed, id, block), true);
                assert!(
                    r.is_err(),
                    "cycle {cycle}, seed {seed}: the cut-off primary {} acknowledged a write",
                    nodes[p].id
                );
                set(&nodes[p], c.generation, replica(true));
                c.heal(&nodes, p);
            }
            _ => {
                let r = c.in_sync.remove(rng.below(2) as usize);
                what = format!("{} (a replica) cut off", nodes[r].id);
                nodes[r].signal("STOP");
                c.configure(&nodes, &[r]);
                std::thread::sleep(away);
                nodes[r].signal("CONT");
                // As the cluster does: told only once its store holds the generation.
                let g = c.generation;
                wait_until(&format!("{} holds generation {g}", nodes[r].id), 30, || {
                    status(&nodes[r]).generation >= g
                });
                set(&nodes[r], g, replica(true));
                c.heal(&nodes, r);
            }
        }
        // A copy that rejoined may be reported failed right after (finding 2 in
        // docs/replication.md): the cluster takes it out and catches it up again.
        let mut again = 0;
        while let Some((x, reason)) = c.failed_replica(&nodes, &sh) {
            again += 1;
            rejoins_failed += 1;
            eprintln!(
                "FINDING (cycle {cycle}, {what}, seed {seed}): {} reported failed after it rejoined in generation {}: {reason}; caught up again",
                nodes[x].id, c.generation
            );
            assert!(
                again <= 3,
                "cycle {cycle}, seed {seed}: {} failed after rejoining three times",
                nodes[x].id
            );
            c.resync(&nodes, &sh, x);
        }
        verify(&nodes, &c, &sh, cycle, &what);
        let log = sh.log.lock().unwrap();
        eprintln!(
            "cycle {cycle}: {what}; healed in generation {}; {} writes acknowledged, {} failed, {} flushes so far ({:?})",
            c.generation,
            log.acked,
            log.failed,
            log.flushes,
            started.elapsed()
        );
    }
    sh.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let log = sh.log.lock().unwrap();
    eprintln!(
        "{cycles} cycles in {:?} (replica killed {}, primary killed {}, primary cut off {}, replica cut off {}): {} writes acknowledged, {} failed, {} flushes; {rejoins_failed} copies reported failed right after they rejoined",
        started.elapsed(),
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        log.acked,
        log.failed,
        log.flushes
    );
    // A workload that did not write would make every check pass.
    assert!(
        log.acked as usize > cycles && log.flushes as usize > cycles / 2,
        "the workload hardly ran"
    );
}

/// The checker itself, without processes: it must refuse what the fault schedule is there
/// to catch, or the schedule above could not fail.
#[test]
fn the_checker_refuses_a_lost_flushed_write_a_fenced_write_and_a_torn_block() {
    let seed = 7;
    let mut log = Log::default();
    // Block 3: write 1 acknowledged and flushed, 2 acknowledged (not flushed), 4 failed.
    log.writes.insert(
        3,
        vec![
            (1, Outcome::Acked),
            (2, Outcome::Acked),
            (4, Outcome::Failed),
        ],
    );
    log.flushed_upto = 1;
    for id in [1, 2, 4] {
        assert_eq!(
            log.check(seed, 3, &payload(seed, id, 3)),
            Ok(()),
            "write {id}"
        );
    }
    // Zeros: the flushed write 1 lost.
    assert!(log.check(seed, 3, &[0u8; BLOCK]).is_err());
    // Once write 2 is flushed, write 1 is an older content: lost too.
    log.flushed_upto = 2;
    assert!(log.check(seed, 3, &payload(seed, 1, 3)).is_err());
    // A write never issued to this block, one of another block, one sent to a fenced
    // primary, and a torn block.
    assert!(log.check(seed, 3, &payload(seed, 5, 3)).is_err());
    assert!(log.check(seed, 3, &payload(seed, 2, 4)).is_err());
    assert!(log.check(seed, 3, &payload(seed, FENCED + 1, 3)).is_err());
    let mut torn = payload(seed, 2, 3);
    torn[BLOCK / 2..].copy_from_slice(&payload(seed, 4, 3)[BLOCK / 2..]);
    assert!(log.check(seed, 3, &torn).is_err());
    // A block never written holds zeros, and only zeros.
    assert_eq!(log.check(seed, 9, &[0u8; BLOCK]), Ok(()));
    assert!(log.check(seed, 9, &payload(seed, 2, 9)).is_err());
}
