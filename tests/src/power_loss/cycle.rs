//! One power-loss experiment: a store on powerfs with one volume, and cycles of
//! workload → SIGKILL → power cut → restart → check everything → second cut and restart.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::admin_ops::CatalogModel;
use super::history::{History, Violation, BLOCK};
use super::store::{Rig, RunningStore, StoreSetup};
use super::workload::{payload, Mix, Workload};
use crate::powerfs::{CutMode, CutReport, PowerFs};

/// The volume every cycle writes.
pub const EXPORT: &str = "v";

/// What went wrong in a cycle.
#[derive(Debug)]
pub enum Finding {
    /// A request failed while the store was up.
    Workload(String),
    /// The store did not start after the cut (first or second restart).
    WontStart(String),
    /// Blocks hold what they may not.
    Data(Vec<Violation>),
    /// `tessera-store scrub` found damage.
    Scrub(String),
    /// An acknowledged catalog change (volume, snapshot) was lost, or one came back.
    Catalog(String),
    /// A second cut, with no write in between, changed what the first restart showed.
    Unstable(String),
    /// The harness itself failed (mount, read).
    Harness(String),
}

/// A failed cycle, with everything needed to understand and reproduce it.
#[derive(Debug)]
pub struct CycleFailure {
    /// The finding.
    pub finding: Finding,
    /// The whole report.
    pub message: String,
}

impl fmt::Display for CycleFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a passed cycle did.
#[derive(Clone, Copy, Debug, Default)]
pub struct CycleStats {
    /// Requests answered (flushes included).
    pub answered: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Blocks whose newer content a flush or FUA made durable.
    pub durable_blocks: u64,
    /// Page updates the cut dropped and (tear) kept.
    pub pages_dropped: usize,
    /// Page updates a tear kept.
    pub pages_kept: usize,
    /// Unsynced files and directory changes at the cut.
    pub unsynced_items: usize,
    /// Time spent in: the workload, cut and restart, checks (read, catalog, scrub), and
    /// the second cut with its restart and read.
    pub phases: [Duration; 4],
}

/// How a harness runs its cycles.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Volume size in 4 KiB blocks.
    pub blocks: u64,
    /// NBD connections of the workload.
    pub workers: usize,
    /// Which requests the workload draws.
    pub mix: Mix,
    /// Whether syncs may take up to a millisecond (drawn per cycle).
    pub sync_latency: bool,
}

/// A store on powerfs, its volume and the content last verified.
pub struct Harness {
    // Declared first so it dies before the filesystem is unmounted.
    store: Option<RunningStore>,
    pfs: PowerFs,
    setup: StoreSetup,
    baseline: Vec<u8>,
    catalog: CatalogModel,
    seed: u64,
    opts: Options,
    _dir: tempfile::TempDir,
}

/// Store tunables drawn per start: small segments and short intervals make rotations and
/// checkpoints (and so syncs, creates, unlinks) happen all through a cycle.
fn store_args(rng: &mut StdRng) -> Vec<String> {
    let seg = ["128K", "256K", "1M"][rng.gen_range(0..3)];
    let ms = ["5", "20", "100"][rng.gen_range(0..3)];
    ["--wal-segment-size", seg, "--checkpoint-interval-ms", ms]
        .map(String::from)
        .to_vec()
}

impl Harness {
    /// Mounts powerfs, starts a store with a volume of `blocks` 4 KiB blocks, fills it,
    /// stops it cleanly and checks the fill survives a cut. Panics if any of that fails.
    pub fn new(seed: u64, opts: Options) -> Harness {
        let Rig { pfs, setup, dir } = Rig::mount();
        let mut rng = StdRng::seed_from_u64(seed);
        let store = setup.start(&store_args(&mut rng)).unwrap();
        let size = opts.blocks * BLOCK as u64;
        store
            .admin(&["volume", "create", EXPORT, "--size", &size.to_string()])
            .unwrap();
        let fill = payload(seed, 0, 0, size);
        let mut c = store.connect(EXPORT).unwrap();
        for (i, chunk) in fill.chunks(1 << 20).enumerate() {
            c.write((i << 20) as u64, chunk, false).unwrap();
        }
        c.flush().unwrap();
        drop(c);
        store.stop().unwrap();
        let mut h = Harness {
            store: None,
            pfs,
            setup,
            baseline: fill,
            catalog: CatalogModel::new(EXPORT),
            seed,
            opts,
            _dir: dir,
        };
        // A volume created, filled, flushed and cleanly stopped must survive a cut.
        let cut = h.pfs.power_cut(CutMode::DropAll, seed).unwrap();
        let lost = |what: String| -> ! {
            let lost: String = cut.lost.iter().map(|l| format!("  {l}\n")).collect();
            panic!(
                "setup (seed {seed:#x}): {what} after a clean stop and a power cut; the cut \
                 dropped:\n{lost}store log (tail):\n{}",
                h.setup.log_tail(20)
            )
        };
        let store = h
            .setup
            .start(&store_args(&mut rng))
            .unwrap_or_else(|e| lost(e));
        match store.read_all(EXPORT) {
            Ok(back) if back == h.baseline => {}
            Ok(_) => lost(format!("volume {EXPORT} lost its flushed content")),
            Err(e) => lost(format!("volume {EXPORT} cannot be read ({e})")),
        }
        h.store = Some(store);
        h
    }

    /// The filesystem (to switch lying sync on, or read its counts).
    pub fn powerfs(&self) -> &PowerFs {
        &self.pfs
    }

    /// Runs cycle `k`: the workload for a random time (then, if `after_flush`, until the
    /// next flush completes), SIGKILL, a `mode` cut, restart, check, scrub, a second
    /// drop-all cut and restart, check again.
    pub fn cycle(
        &mut self,
        k: u64,
        mode: CutMode,
        after_flush: Option<bool>,
    ) -> Result<CycleStats, CycleFailure> {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (k + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let delay = Duration::from_millis(rng.gen_range(5..=150));
        let after_flush = after_flush.unwrap_or_else(|| rng.gen_bool(0.25));
        let latency = if self.opts.sync_latency && rng.gen_bool(0.5) {
            Duration::from_micros(rng.gen_range(100..=1000))
        } else {
            Duration::ZERO
        };
        let context = format!(
            "cycle {k}: {mode:?} cut after {delay:?} (sync latency {latency:?}){}",
            if after_flush {
                " and right after a flush returned"
            } else {
                ""
            }
        );
        let mut cut_report = CutReport::default();
        let fail = |finding: Finding, cut: &CutReport, log: String| {
            let what = match &finding {
                Finding::Data(v) => v.iter().map(|v| format!("  {v}\n")).collect::<String>(),
                Finding::Workload(s)
                | Finding::WontStart(s)
                | Finding::Scrub(s)
                | Finding::Catalog(s)
                | Finding::Unstable(s)
                | Finding::Harness(s) => format!("  {s}\n"),
            };
            let lost: String = cut
                .lost
                .iter()
                .take(40)
                .map(|l| format!("  {l}\n"))
                .collect();
            CycleFailure {
                message: format!(
                    "{context} (seed {seed:#x}): {kind}\n{what}\
                     what the cut dropped ({} item(s), first 40):\n{lost}\
                     store log (tail):\n{log}\n\
                     reproduce: POWER_LOSS_SEED={seed:#x} POWER_LOSS_CYCLES={cycles}",
                    cut.lost.len(),
                    seed = self.seed,
                    kind = kind_name(&finding),
                    cycles = k + 1,
                ),
                finding,
            }
        };

        let admin = rng.gen_bool(0.35).then(|| {
            let op = self.catalog.pick(&mut rng, k);
            (op, delay.mul_f64(rng.gen()))
        });
        let store = self
            .store
            .take()
            .expect("a store is running between cycles");
        let history = Arc::new(Mutex::new(History::new(&self.baseline)));
        self.pfs.set_sync_latency(latency);
        let mut phases = [Duration::ZERO; 4];
        let mut mark = Instant::now();
        let mut lap = |phase: usize| {
            phases[phase] = mark.elapsed();
            mark = Instant::now();
        };
        let workload = Workload::start(
            &store,
            EXPORT,
            history.clone(),
            rng.gen(),
            self.opts.workers,
            (k << 32) + 1,
            self.opts.mix,
        )
        .map_err(|e| fail(Finding::Workload(e), &cut_report, self.setup.log_tail(20)))?;
        let admin = admin.map(|(op, at)| {
            let setup = self.setup.clone();
            std::thread::spawn(move || {
                std::thread::sleep(at);
                let args = op.args();
                let res = setup.admin(&args.iter().map(String::as_str).collect::<Vec<_>>());
                (op, res, Instant::now())
            })
        });
        std::thread::sleep(delay);
        if after_flush {
            workload.wait_for_flush(Duration::from_secs(5));
        }
        workload.cutting();
        let killed = Instant::now();
        store.kill9();
        lap(0);
        self.pfs.set_sync_latency(Duration::ZERO);
        if let Some(t) = admin {
            let (op, res, done) = t.join().expect("admin thread");
            if let Err(e) = &res {
                if done < killed {
                    let e = format!("{op:?} failed while the store was up: {e}");
                    return Err(fail(
                        Finding::Workload(e),
                        &cut_report,
                        self.setup.log_tail(20),
                    ));
                }
            }
            self.catalog.record(&op, res.is_ok());
        }
        let answered = workload
            .finish()
            .map_err(|e| fail(Finding::Workload(e), &cut_report, self.setup.log_tail(20)))?;
        cut_report = self
            .pfs
            .power_cut(mode, rng.gen())
            .map_err(|e| fail(Finding::Harness(e.to_string()), &cut_report, String::new()))?;

        let store = self
            .setup
            .start(&store_args(&mut rng))
            .map_err(|e| fail(Finding::WontStart(e), &cut_report, String::new()))?;
        lap(1);
        let found = store
            .read_all(EXPORT)
            .map_err(|e| fail(Finding::Harness(e), &cut_report, self.setup.log_tail(20)))?;
        let history = history.lock().unwrap();
        let violations = history.check(&found, 20);
        if !violations.is_empty() {
            return Err(fail(
                Finding::Data(violations),
                &cut_report,
                self.setup.log_tail(20),
            ));
        }
        self.catalog
            .check(&store)
            .map_err(|e| fail(Finding::Catalog(e), &cut_report, self.setup.log_tail(20)))?;
        store
            .admin(&["scrub"])
            .map_err(|e| fail(Finding::Scrub(e), &cut_report, self.setup.log_tail(20)))?;

        lap(2);
        // What the restart showed must be durable: lose power again, without writes.
        store.kill9();
        let second = self
            .pfs
            .power_cut(CutMode::DropAll, rng.gen())
            .map_err(|e| fail(Finding::Harness(e.to_string()), &cut_report, String::new()))?;
        let store = self.setup.start(&store_args(&mut rng)).map_err(|e| {
            fail(
                Finding::WontStart(format!("second restart: {e}")),
                &second,
                String::new(),
            )
        })?;
        let again = store
            .read_all(EXPORT)
            .map_err(|e| fail(Finding::Harness(e), &second, self.setup.log_tail(20)))?;
        if again != found {
            let changed: Vec<usize> = (0..found.len() / BLOCK)
                .filter(|b| again[b * BLOCK..(b + 1) * BLOCK] != found[b * BLOCK..(b + 1) * BLOCK])
                .collect();
            let msg = format!(
                "{} block(s) changed across a second cut with no write in between (first: {:?})",
                changed.len(),
                &changed[..changed.len().min(10)]
            );
            return Err(fail(
                Finding::Unstable(msg),
                &second,
                self.setup.log_tail(20),
            ));
        }
        self.catalog
            .check(&store)
            .map_err(|e| fail(Finding::Unstable(e), &second, self.setup.log_tail(20)))?;
        lap(3);
        self.store = Some(store);
        self.baseline = found;
        Ok(CycleStats {
            phases,
            answered,
            flushes: history.counts().flushes,
            durable_blocks: history.durable_blocks(),
            pages_dropped: cut_report.pages_dropped,
            pages_kept: cut_report.pages_kept,
            unsynced_items: cut_report.lost.len(),
        })
    }
}

fn kind_name(f: &Finding) -> &'static str {
    match f {
        Finding::Workload(_) => "a request failed while the store was up",
        Finding::WontStart(_) => "the store did not start after the power cut",
        Finding::Data(_) => "blocks hold content they may not",
        Finding::Scrub(_) => "scrub found damage",
        Finding::Catalog(_) => "the catalog does not hold what was acknowledged",
        Finding::Unstable(_) => "content changed across a second power cut",
        Finding::Harness(_) => "the harness failed",
    }
}
