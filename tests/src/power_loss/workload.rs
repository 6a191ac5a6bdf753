//! The verifying workload: several NBD connections (so several requests in flight) issue
//! writes (aligned and not, one block to half a MiB, some FUA), trims, zero writes and
//! flushes at random. Each request is recorded in the shared [`History`] before it is sent
//! and again when it is answered.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_nbd::Client;

use super::history::{History, Request, BLOCK};
use super::store::RunningStore;

const B: u64 = BLOCK as u64;

/// The bytes request `seq` writes at `off..off+len`: for each block it touches, a slice of
/// that block's pattern for this request ("PWRL", block number, `seq`, then bytes derived
/// from `seed`, the block and `seq`), so every version of every block is unique.
pub fn payload(seed: u64, seq: u64, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let (first, end) = (off / B, (off + len).div_ceil(B));
    for b in first..end {
        let mut pattern = [0u8; BLOCK];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.update(&seq.to_le_bytes());
        h.update(&b.to_le_bytes());
        h.finalize_xof().fill(&mut pattern);
        pattern[..4].copy_from_slice(b"PWRL");
        pattern[4..12].copy_from_slice(&b.to_le_bytes());
        pattern[12..20].copy_from_slice(&seq.to_le_bytes());
        let lo = (off.max(b * B) - b * B) as usize;
        let hi = ((off + len).min((b + 1) * B) - b * B) as usize;
        out.extend_from_slice(&pattern[lo..hi]);
    }
    out
}

/// What the workers share.
struct Shared {
    history: Arc<Mutex<History>>,
    seed: u64,
    next_seq: AtomicU64,
    stop: AtomicBool,
    /// Set before the store is killed: a failed request after it is the kill, not a bug.
    cutting: AtomicBool,
    /// Completed flushes, for waiting on the next one.
    flushes: (Mutex<u64>, Condvar),
    /// When set, one FLUSH or FUA write at a time across all connections.
    one_flush: Option<Mutex<()>>,
    mix: Mix,
}

/// A running workload.
pub struct Workload {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<Result<u64, String>>>,
}

/// Which requests the workload draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    /// FLUSH and FUA writes may overlap across connections (else one at a time).
    pub concurrent_flushes: bool,
    /// Writes of 64 KiB and more (the store's placed writes) go to the last quarter of
    /// the volume and nothing else does; zero writes never ask for allocation (NO_HOLE
    /// zeroes of 64 KiB would be placed writes too).
    pub large_writes_apart: bool,
}

impl Mix {
    /// Everything, mixed.
    pub const FULL: Mix = Mix {
        concurrent_flushes: true,
        large_writes_apart: false,
    };
    /// Large writes kept apart from everything else: for narrowing down a finding
    /// (docs/power-loss.md).
    pub const LARGE_APART: Mix = Mix {
        concurrent_flushes: true,
        large_writes_apart: true,
    };
}

/// Writes from this size on take the store's placed-write path.
const PLACED: u64 = 16;

/// A byte range and what to do with it.
fn pick(rng: &mut StdRng, blocks: u64, mix: Mix) -> (Request, u64, u64) {
    // Blocks lo..hi for small requests, and for large ones.
    let split = if mix.large_writes_apart {
        blocks * 3 / 4
    } else {
        blocks
    };
    let small = (0, split);
    let large = (if mix.large_writes_apart { split } else { 0 }, blocks);
    let aligned =
        |rng: &mut StdRng, (lo, hi): (u64, u64), n: u64| (rng.gen_range(lo..=hi - n) * B, n * B);
    let unaligned = |rng: &mut StdRng, (lo, hi): (u64, u64), max: u64| {
        let off = rng.gen_range(lo * B..hi * B - 1);
        (off, rng.gen_range(1..=max).min(hi * B - off))
    };
    // Small enough to be logged, unless placed writes mix with the rest anyway.
    let most = if mix.large_writes_apart {
        PLACED - 1
    } else {
        PLACED
    };
    let roll = rng.gen_range(0..100);
    if roll < 12 {
        let (off, len) = if rng.gen_bool(0.7) {
            let n = rng.gen_range(1..=2 * most);
            aligned(rng, small, n)
        } else {
            unaligned(rng, small, 2 * B)
        };
        let req = if roll < 6 {
            Request::Trim
        } else {
            Request::WriteZeroes
        };
        return (req, off, len);
    }
    let fua = rng.gen_bool(0.1);
    let class = rng.gen_range(0..100);
    let (off, len) = if class < 45 {
        aligned(rng, small, 1)
    } else if class < 65 {
        let n = rng.gen_range(2..=most);
        aligned(rng, small, n)
    } else if class < 75 {
        // 256-512 KiB, sometimes shifted off block boundaries.
        let n = rng.gen_range(64..=128);
        let (off, len) = aligned(rng, large, n + 1);
        let shift = if rng.gen_bool(0.3) {
            rng.gen_range(1..B)
        } else {
            0
        };
        (off + shift, len - B)
    } else {
        unaligned(rng, small, 3 * B)
    };
    (Request::Write { fua }, off, len)
}

fn worker(mut c: Client, shared: Arc<Shared>, mut rng: StdRng) -> Result<u64, String> {
    let blocks = shared.history.lock().unwrap().blocks();
    let mut answered = 0u64;
    let trace = std::env::var_os("POWER_LOSS_TRACE").is_some();
    let failed = |e: tessera_nbd::ClientError, what: &str, answered: u64| {
        if shared.cutting.load(Ordering::SeqCst) {
            Ok(answered)
        } else {
            Err(format!("{what} failed while the store was up: {e}"))
        }
    };
    while !shared.stop.load(Ordering::SeqCst) {
        if rng.gen_range(0..100) < 12 {
            let _one = shared.one_flush.as_ref().map(|m| m.lock().unwrap());
            let sent = shared.history.lock().unwrap().flush_sent();
            if let Err(e) = c.flush() {
                return failed(e, "FLUSH", answered);
            }
            shared.history.lock().unwrap().flushed(sent);
            answered += 1;
            *shared.flushes.0.lock().unwrap() += 1;
            shared.flushes.1.notify_all();
            continue;
        }
        let (req, off, len) = pick(&mut rng, blocks, shared.mix);
        let seq = shared.next_seq.fetch_add(1, Ordering::SeqCst);
        let data =
            matches!(req, Request::Write { .. }).then(|| payload(shared.seed, seq, off, len));
        let ticket = {
            let mut h = shared.history.lock().unwrap();
            if !h.is_free(off, len) {
                continue;
            }
            h.begin(seq, off, len, req, data.as_deref())
        };
        let mut no_hole = false;
        let res = match (req, &data) {
            (Request::Write { fua }, Some(d)) => {
                let _one = fua
                    .then(|| shared.one_flush.as_ref().map(|m| m.lock().unwrap()))
                    .flatten();
                c.write(off, d, fua)
            }
            (Request::Trim, _) => c.trim(off, len as u32),
            _ => {
                no_hole = !shared.mix.large_writes_apart && rng.gen_bool(0.5);
                c.write_zeroes(off, len as u32, no_hole)
            }
        };
        if trace {
            // One line per answer, in the workload's own numbering, for reading a
            // failure's history side by side with the store's log.
            eprintln!(
                "trace #{}.{} {req:?}{} bytes {off}+{len} blocks {}..{}: {}",
                seq >> 32,
                seq & 0xffff_ffff,
                if no_hole { " NO_HOLE" } else { "" },
                off / 4096,
                (off + len).div_ceil(4096),
                if res.is_ok() { "acked" } else { "failed" }
            );
        }
        let mut h = shared.history.lock().unwrap();
        match res {
            Ok(()) => {
                h.acked(ticket);
                answered += 1;
            }
            Err(e) => {
                h.unanswered(ticket);
                drop(h);
                return failed(e, &format!("{req:?} #{seq} at {off}+{len}"), answered);
            }
        }
    }
    Ok(answered)
}

impl Workload {
    /// Connects `workers` clients to `export` and starts them. Request numbers start at
    /// `first_seq`; random choices come from `seed`; `mix` says which requests.
    pub fn start(
        store: &RunningStore,
        export: &str,
        history: Arc<Mutex<History>>,
        seed: u64,
        workers: usize,
        first_seq: u64,
        mix: Mix,
    ) -> Result<Workload, String> {
        let shared = Arc::new(Shared {
            history,
            seed,
            next_seq: AtomicU64::new(first_seq),
            stop: AtomicBool::new(false),
            cutting: AtomicBool::new(false),
            flushes: (Mutex::new(0), Condvar::new()),
            one_flush: (!mix.concurrent_flushes).then(|| Mutex::new(())),
            mix,
        });
        let clients = (0..workers)
            .map(|_| store.connect(export))
            .collect::<Result<Vec<_>, _>>()?;
        let workers = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let rng = StdRng::seed_from_u64(seed ^ (i as u64 + 1).wrapping_mul(0x9e37));
                let shared = shared.clone();
                std::thread::spawn(move || worker(c, shared, rng))
            })
            .collect();
        Ok(Workload { shared, workers })
    }

    /// Waits (at most `timeout`) until a flush completes after this call.
    pub fn wait_for_flush(&self, timeout: Duration) -> bool {
        let (lock, cv) = &self.shared.flushes;
        let guard = lock.lock().unwrap();
        let before = *guard;
        let (_guard, res) = cv
            .wait_timeout_while(guard, timeout, |n| *n == before)
            .unwrap();
        !res.timed_out()
    }

    /// Says the store is about to die: requests failing from now on are expected.
    pub fn cutting(&self) {
        self.shared.cutting.store(true, Ordering::SeqCst);
    }

    /// Stops the workers (once the store is dead they stop by themselves) and returns how
    /// many requests were answered; an error if one failed while the store was up.
    pub fn finish(self) -> Result<u64, String> {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut total = 0;
        let mut first_err = None;
        for w in self.workers {
            match w.join() {
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some("a worker panicked".into())),
            }
        }
        first_err.map_or(Ok(total), Err)
    }
}
