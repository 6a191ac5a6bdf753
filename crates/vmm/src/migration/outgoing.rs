//! The source's pre-copy driver: it runs on its own thread, started by the control API's
//! `migrate`, and reports through [`Shared`]'s status.
//!
//! 1. Connect (TLS), `Hello`; the target accepts or refuses.
//! 2. KVM's dirty log on; every page that is not zero goes out while the guest runs.
//! 3. Rounds: the pages dirtied since the last look go out again, until sending what is
//!    dirty would take no longer than the downtime target at the rate measured so far
//!    (or after [`MAX_ITERATIONS`]: the guest dirties memory faster than the link
//!    carries it, and the downtime will be longer; the status says `converged: false`).
//! 4. Pause; with the devices quiet, the last dirty pages and the state are read, then
//!    sent; the target answers `Loaded`, then `Resumed` once its caller let it run, and
//!    the guest here stops for good (`Migrated`).
//!
//! A failure or cancel before the last byte went out resumes the guest here; after that
//! the source cannot know whether the target will run it, so it stays paused
//! ([`Phase::Undecided`]) until `migration_cancel` resumes it.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::tls::{self, TlsError, TlsFiles};
use super::wire::{self, DiskInfo, Hello, Message, WireError, MAX_PAGES, PAGE_SIZE};
use super::{Direction, Phase, Shared, Status};
use crate::control::{ControlError, Request, RunState};
use crate::memory::{self, MemoryError};
use crate::snapshot::SnapshotError;
use crate::vm::capture::Parts;

/// Rounds of pre-copy after which the guest is paused whatever the estimate says.
pub const MAX_ITERATIONS: u32 = 30;
/// The downtime target when the caller names none, in ms.
pub const DEFAULT_DOWNTIME_MS: u64 = 50;
/// How long connecting and the TLS handshake may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// How long a read or write of the stream may block while memory moves.
const STREAM_LIMIT: Duration = Duration::from_secs(30);
/// How long the target may take from `Loaded` to `Resumed` (its caller moves the VM
/// and its disk through the cluster state meanwhile).
const SWITCH_LIMIT: Duration = Duration::from_secs(120);
/// How long a completed source waits for its caller to read the final figures.
const LINGER: Duration = Duration::from_secs(2);

/// What `migrate` asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// The target VMM's address (`ip:port`).
    pub to: String,
    /// The name the target's certificate must hold (`<node id>.node.tessera`).
    pub server_name: String,
    /// The target's one-time token.
    pub token: String,
    /// This node's TLS files.
    pub tls: TlsFiles,
    /// The downtime target in ms.
    pub downtime_ms: u64,
    /// A cap on the memory sent per second, in KiB, if any.
    pub max_bandwidth_kib_s: Option<u64>,
}

/// Why a migration could not start or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// One is under way.
    #[error("a migration is already under way ({0:?})")]
    Busy(Phase),
    /// The VM does not run.
    #[error("the VM is not running")]
    NotRunning,
    /// The target address does not parse.
    #[error("bad target address {0:?}")]
    Address(String),
    /// TLS setup or handshake.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The stream.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The dirty log.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Reading guest memory.
    #[error("reading guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The paused VM's state.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Pausing or holding the VM.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The target said no.
    #[error("the target refused: {0}")]
    Refused(String),
    /// The target sent something out of turn.
    #[error("the target sent {0} where {1} was due")]
    Unexpected(String, &'static str),
    /// Cancelled through the control API.
    #[error("cancelled")]
    Cancelled,
    /// The guest stopped (powered off) meanwhile.
    #[error("the VM stopped during the migration")]
    Stopped,
    /// The vCPUs did not park.
    #[error("the vCPUs did not pause within 5 s")]
    PauseTimeout,
    /// The state could not be encoded.
    #[error("encoding the VM state: {0}")]
    Encode(serde_json::Error),
    /// A cancel without a migration to cancel.
    #[error("no migration under way to cancel")]
    NothingToCancel,
}

/// What the driver needs of the VM.
pub struct Source {
    /// The VM's parts (memory, devices, the vCPUs' parked state).
    pub parts: Parts,
    /// Forces the vCPUs out of the guest.
    pub kick: Arc<dyn Fn() + Send + Sync>,
    /// The disk as the target must present it.
    pub disk: Option<DiskInfo>,
    /// Whether the VM tracks dirty pages anyway (`--track-dirty-pages`): then the log
    /// stays on after a failed migration.
    pub track_always: bool,
    /// Status, cancel.
    pub shared: Arc<Shared>,
}

/// Starts a migration on its own thread; its progress is in the status.
pub fn start(src: Arc<Source>, p: Params) -> Result<(), MigrateError> {
    let st = src.shared.status();
    if st.phase.busy() {
        return Err(MigrateError::Busy(st.phase));
    }
    let control = &src.parts.control;
    if !matches!(control.state(), RunState::Running | RunState::Paused)
        || control.stop_requested().is_some()
    {
        return Err(MigrateError::NotRunning);
    }
    let addr: SocketAddr =
        p.to.parse()
            .map_err(|_| MigrateError::Address(p.to.clone()))?;
    let memory_bytes = memory::layout(&src.parts.mem).iter().map(|r| r.1).sum();
    src.shared.reset();
    src.shared.update(|s| {
        *s = Status {
            direction: Some(Direction::Out),
            phase: Phase::Connecting,
            memory_bytes,
            downtime_target_ms: p.downtime_ms,
            ..Status::default()
        }
    });
    control.event("migration_started", Some(p.to.clone()));
    std::thread::Builder::new()
        .name("migrate-out".into())
        .spawn(move || run(&src, &p, addr))
        .map_err(|e| MigrateError::Wire(WireError::Io(e)))?;
    Ok(())
}

/// Cancels the migration under way: the driver stops and resumes the guest; a migration
/// left undecided resumes it here. The caller must know the target will not run it.
pub fn cancel(src: &Source) -> Result<(), MigrateError> {
    let st = src.shared.status();
    match st.phase {
        Phase::Undecided => {
            end_here(src, true);
            src.shared.update(|s| {
                s.phase = Phase::Cancelled;
                s.error = Some("cancelled after everything was sent; resumed here".into());
            });
            src.parts
                .control
                .event("migration_cancelled", st.error.clone());
            Ok(())
        }
        p if p.busy() && st.direction == Some(Direction::Out) => {
            src.shared.cancel();
            Ok(())
        }
        _ => Err(MigrateError::NothingToCancel),
    }
}

/// Puts the VM back to running here: the dirty log off (unless always tracked) and the
/// guest resumed if the migration holds it.
fn end_here(src: &Source, resume: bool) {
    if !src.track_always {
        if let Err(e) = memory::set_dirty_logging(&src.parts.vm, &src.parts.mem, false) {
            tracing::warn!(error = %e, "could not turn the dirty log off");
        }
    }
    let control = &src.parts.control;
    if resume && control.held_for_migration() {
        if let Err(e) = control.release() {
            tracing::error!(error = %e, "could not resume the VM after its migration failed");
        }
    }
}

/// Where the driver got to, for deciding what a failure means.
#[derive(Default)]
struct Progress {
    /// The last byte of the state went out: the target may hold everything.
    sent_all: bool,
}

fn run(src: &Source, p: &Params, addr: SocketAddr) {
    let started = Instant::now();
    let mut progress = Progress::default();
    let res = drive(src, p, addr, &mut progress);
    src.shared.set_socket(None);
    let control = &src.parts.control;
    let total = Some(started.elapsed().as_millis() as u64);
    match res {
        Ok(downtime) => {
            let ms = downtime.as_millis() as u64;
            src.shared.update(|s| {
                s.phase = Phase::Completed;
                s.downtime_ms = Some(ms);
                s.total_ms = total;
            });
            tracing::info!(
                downtime_ms = ms,
                total_ms = total,
                timeline = %super::timeline_line(&src.shared.status().timeline),
                "live migration completed; the VM runs on the target"
            );
            control.event("migrated", Some(format!("downtime {ms} ms")));
            src.shared.linger(LINGER);
            let _ = control.request(Request::Leave);
            (src.kick)();
        }
        Err(e) if progress.sent_all && !src.shared.cancelled() => {
            tracing::warn!(error = %e, "live migration undecided: the VM stays paused here until its caller says");
            src.shared.update(|s| {
                s.phase = Phase::Undecided;
                s.error = Some(e.to_string());
                s.total_ms = total;
            });
            control.event("migration_undecided", Some(e.to_string()));
        }
        Err(e) => {
            let cancelled = src.shared.cancelled();
            end_here(src, true);
            let why = if cancelled {
                "cancelled".to_string()
            } else {
                e.to_string()
            };
            tracing::warn!(error = %why, "live migration ended; the VM runs here");
            src.shared.update(|s| {
                s.phase = if cancelled {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                s.error = Some(why.clone());
                s.total_ms = total;
            });
            control.event(
                if cancelled {
                    "migration_cancelled"
                } else {
                    "migration_failed"
                },
                Some(why),
            );
        }
    }
}

/// Pauses the guest for the stop-and-copy; false if it was paused already.
fn pause(src: &Source) -> Result<bool, MigrateError> {
    let control = &src.parts.control;
    match control.request(Request::Pause) {
        Ok(()) => {}
        Err(ControlError::AlreadyPaused) => return Ok(false),
        Err(ControlError::Stopped) => return Err(MigrateError::Stopped),
        Err(e) => return Err(e.into()),
    }
    for _ in 0..500 {
        (src.kick)();
        if control.wait_state(&RunState::Paused, Duration::from_millis(10)) {
            return Ok(true);
        }
        if matches!(control.state(), RunState::Stopped(_)) {
            return Err(MigrateError::Stopped);
        }
    }
    Err(MigrateError::PauseTimeout)
}

fn drive(
    src: &Source,
    p: &Params,
    addr: SocketAddr,
    progress: &mut Progress,
) -> Result<Duration, MigrateError> {
    let sh = &src.shared;
    let (vm, mem, control) = (&src.parts.vm, &src.parts.mem, &src.parts.control);
    let mut s = tls::connect(p.tls.client()?, addr, &p.server_name, CONNECT_LIMIT)?;
    sh.set_socket(s.sock.try_clone().ok());
    let cut = || -> Result<(), MigrateError> {
        if sh.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        if control.stop_requested().is_some() || matches!(control.state(), RunState::Stopped(_)) {
            return Err(MigrateError::Stopped);
        }
        Ok(())
    };
    cut()?;
    s.sock
        .set_read_timeout(Some(STREAM_LIMIT))
        .map_err(WireError::Io)?;
    s.sock
        .set_write_timeout(Some(STREAM_LIMIT))
        .map_err(WireError::Io)?;
    let layout = memory::layout(mem);
    {
        let mut w = BufWriter::with_capacity(64 << 10, &mut s);
        wire::write_preamble(&mut w)?;
        let hello = Hello {
            token: p.token.clone(),
            spec: src.parts.spec.clone(),
            memory: layout.clone(),
            disk: src.disk.clone(),
        };
        wire::write(&mut w, &Message::Hello(Box::new(hello)))?;
        w.flush().map_err(WireError::Io)?;
    }
    match wire::read(&mut s)? {
        Message::Accept => {}
        Message::Refuse(why) => return Err(MigrateError::Refused(why)),
        other => return Err(unexpected(&other, "Accept")),
    }

    // Pre-copy. The log goes on first, so any page written after it is sent again.
    memory::set_dirty_logging(vm, mem, true)?;
    memory::dirty_pages(vm, mem)?;
    sh.update(|st| st.phase = Phase::Precopy);
    let mut out = Sender::new(p.max_bandwidth_kib_s);
    let target_ms = p.downtime_ms;
    {
        let mut w = BufWriter::with_capacity(1 << 20, &mut s);
        for (start, len) in &layout {
            out.send(&mut w, mem, *start, *len, true, sh, &cut)?;
        }
        w.flush().map_err(WireError::Io)?;
    }
    let mut iterations = 1u32;
    let mut last_look = Instant::now();
    let (pending, converged) = loop {
        cut()?;
        let d = memory::dirty_pages(vm, mem)?;
        let since = last_look.elapsed();
        last_look = Instant::now();
        let dirty = d.pages * PAGE_SIZE as u64;
        let bandwidth = out.bandwidth();
        let expected = expected_ms(dirty, bandwidth);
        sh.update(|st| {
            st.iterations = iterations;
            st.remaining_bytes = dirty;
            st.dirty_bytes_per_s = per_second(dirty, since);
            st.bandwidth_bytes_per_s = bandwidth;
            st.expected_downtime_ms = expected;
        });
        if expected <= target_ms || iterations >= MAX_ITERATIONS {
            break (d.ranges, expected <= target_ms);
        }
        let mut w = BufWriter::with_capacity(1 << 20, &mut s);
        for (gpa, len) in &d.ranges {
            out.send(&mut w, mem, *gpa, *len, false, sh, &cut)?;
        }
        w.flush().map_err(WireError::Io)?;
        iterations += 1;
    };
    sh.update(|st| st.converged = Some(converged));

    // Stop and copy.
    cut()?;
    sh.update(|st| st.phase = Phase::StopAndCopy);
    sh.mark("pause_asked");
    pause(src)?;
    control.hold_for_migration()?;
    let paused = Instant::now();
    sh.mark("paused");
    let (last_pages, state) = src.parts.with_state(|st| {
        let fin = memory::dirty_pages(vm, mem)?;
        let mut pages = Vec::new();
        for (gpa, len) in pending.iter().chain(&fin.ranges) {
            let mut at = *gpa;
            let end = gpa + len;
            while at < end {
                let n = (end - at).min(u64::from(MAX_PAGES) * PAGE_SIZE as u64) as usize;
                let mut data = vec![0u8; n];
                mem.read_slice(&mut data, GuestAddress(at))?;
                pages.push((at, data));
                at += n as u64;
            }
        }
        st.memory = layout.clone();
        let doc = serde_json::to_vec(st).map_err(MigrateError::Encode)?;
        Ok::<_, MigrateError>((pages, doc))
    })?;
    sh.mark("state_read");
    let (scroll, next) = control.serial_output(0);
    {
        let mut w = BufWriter::with_capacity(1 << 20, &mut s);
        let mut bytes = 0u64;
        for (gpa, data) in last_pages {
            bytes += data.len() as u64;
            wire::write(&mut w, &Message::Pages { gpa, data })?;
        }
        let keep = scroll.len().min(wire::MAX_SCROLLBACK as usize);
        let from = scroll.len() - keep;
        wire::write(
            &mut w,
            &Message::Scrollback {
                start: next - keep as u64,
                data: scroll[from..].to_vec(),
            },
        )?;
        wire::write(&mut w, &Message::State(state))?;
        w.flush().map_err(WireError::Io)?;
        sh.update(|st| {
            st.bytes += bytes;
            st.pages += bytes / PAGE_SIZE as u64;
        });
    }
    sh.mark("sent");
    progress.sent_all = true;
    match wire::read(&mut s)? {
        Message::Loaded => sh.mark("loaded"),
        Message::Refuse(why) => {
            // The target will not run it: the guest may run here again.
            progress.sent_all = false;
            return Err(MigrateError::Refused(why));
        }
        other => return Err(unexpected(&other, "Loaded")),
    }
    sh.update(|st| st.phase = Phase::SwitchingOver);
    s.sock
        .set_read_timeout(Some(SWITCH_LIMIT))
        .map_err(WireError::Io)?;
    match wire::read(&mut s)? {
        Message::Resumed => {
            sh.mark("resumed");
            Ok(paused.elapsed())
        }
        Message::Refuse(why) => Err(MigrateError::Refused(why)),
        other => Err(unexpected(&other, "Resumed")),
    }
}

fn unexpected(m: &Message, due: &'static str) -> MigrateError {
    let what = match m {
        Message::Hello(_) => "Hello",
        Message::Accept => "Accept",
        Message::Refuse(_) => "Refuse",
        Message::Pages { .. } => "Pages",
        Message::Zeroes { .. } => "Zeroes",
        Message::Scrollback { .. } => "Scrollback",
        Message::State(_) => "State",
        Message::Loaded => "Loaded",
        Message::Resumed => "Resumed",
    };
    MigrateError::Unexpected(what.into(), due)
}

/// How long sending `bytes` takes at `bandwidth` bytes/s, in ms (nothing to send: 0; no
/// rate known yet: as long as can be).
pub fn expected_ms(bytes: u64, bandwidth: u64) -> u64 {
    match (bytes, bandwidth) {
        (0, _) => 0,
        (_, 0) => u64::MAX,
        (b, bw) => (u128::from(b) * 1000 / u128::from(bw)) as u64,
    }
}

fn per_second(bytes: u64, d: Duration) -> u64 {
    let us = d.as_micros().max(1);
    (u128::from(bytes) * 1_000_000 / us) as u64
}

/// Sends pages and keeps the rate: bytes out, time spent sending, the optional cap.
struct Sender {
    limit: Option<u64>,
    /// Most pages per `Pages` message: fewer under a cap, so the cap is kept smoothly
    /// and a cancel is seen soon.
    run_pages: usize,
    bytes: u64,
    busy: Duration,
    capped_since: Instant,
    capped_bytes: u64,
}

impl Sender {
    fn new(limit_kib_s: Option<u64>) -> Sender {
        let limit = limit_kib_s
            .filter(|l| *l > 0)
            .map(|l| l.saturating_mul(1024));
        Sender {
            limit,
            run_pages: if limit.is_some() {
                4
            } else {
                MAX_PAGES as usize
            },
            bytes: 0,
            busy: Duration::ZERO,
            capped_since: Instant::now(),
            capped_bytes: 0,
        }
    }

    /// Bytes per second over all the sending so far.
    fn bandwidth(&self) -> u64 {
        per_second(self.bytes, self.busy)
    }

    /// Waits as long as the cap asks after `n` more bytes, looking for a cancel meanwhile.
    fn throttle(
        &mut self,
        n: u64,
        cut: &dyn Fn() -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        self.capped_bytes += n;
        let due = Duration::from_micros(
            (u128::from(self.capped_bytes) * 1_000_000 / u128::from(limit)) as u64,
        );
        loop {
            let spent = self.capped_since.elapsed();
            if spent >= due {
                return Ok(());
            }
            std::thread::sleep((due - spent).min(Duration::from_millis(20)));
            cut()?;
        }
    }

    /// Sends the pages gathered in `run` (from `at`), if any.
    fn flush_pages(
        &mut self,
        w: &mut dyn Write,
        run: &mut Vec<u8>,
        at: u64,
        sh: &Shared,
        cut: &dyn Fn() -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError> {
        if run.is_empty() {
            return Ok(());
        }
        let pages = (run.len() / PAGE_SIZE) as u32;
        wire::write_pages_header(w, at, pages)?;
        w.write_all(run).map_err(WireError::Io)?;
        if self.limit.is_some() {
            // Under a cap the pages go out as they are counted, not a buffer later.
            w.flush().map_err(WireError::Io)?;
        }
        let n = run.len() as u64;
        run.clear();
        self.bytes += n;
        sh.update(|st| {
            st.bytes += n;
            st.pages += u64::from(pages);
        });
        self.throttle(n, cut)?;
        cut()
    }

    /// Sends `zeroes` pages of zeroes from `at`, if any.
    fn flush_zeroes(
        &mut self,
        w: &mut dyn Write,
        at: u64,
        zeroes: &mut u32,
        sh: &Shared,
    ) -> Result<(), MigrateError> {
        if *zeroes == 0 {
            return Ok(());
        }
        let pages = std::mem::take(zeroes);
        wire::write(w, &Message::Zeroes { gpa: at, pages })?;
        sh.update(|st| st.zero_pages += u64::from(pages));
        Ok(())
    }

    /// Sends the pages of `[gpa, gpa + len)`: runs of pages with data as `Pages`, runs of
    /// zero pages as `Zeroes` (or not at all when `skip_zeroes`: the first round, whose
    /// target memory is fresh).
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        w: &mut dyn Write,
        mem: &tessera_virtio::GuestMem,
        gpa: u64,
        len: u64,
        skip_zeroes: bool,
        sh: &Shared,
        cut: &dyn Fn() -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError> {
        let started = Instant::now();
        let mut page = vec![0u8; PAGE_SIZE];
        let mut run: Vec<u8> = Vec::with_capacity(self.run_pages * PAGE_SIZE);
        let (mut run_at, mut zero_at, mut zeroes) = (gpa, gpa, 0u32);
        let mut at = gpa;
        let end = gpa.saturating_add(len);
        while at < end {
            mem.read_slice(&mut page, GuestAddress(at))?;
            if page.iter().all(|b| *b == 0) {
                self.flush_pages(w, &mut run, run_at, sh, cut)?;
                if !skip_zeroes {
                    if zeroes == 0 {
                        zero_at = at;
                    }
                    zeroes += 1;
                    if zeroes == MAX_PAGES {
                        self.flush_zeroes(w, zero_at, &mut zeroes, sh)?;
                    }
                }
            } else {
                self.flush_zeroes(w, zero_at, &mut zeroes, sh)?;
                if run.is_empty() {
                    run_at = at;
                }
                run.extend_from_slice(&page);
                if run.len() >= self.run_pages * PAGE_SIZE {
                    self.flush_pages(w, &mut run, run_at, sh, cut)?;
                }
            }
            at += PAGE_SIZE as u64;
        }
        self.flush_pages(w, &mut run, run_at, sh, cut)?;
        self.flush_zeroes(w, zero_at, &mut zeroes, sh)?;
        self.busy += started.elapsed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_downtime_follows_the_measured_rate() {
        assert_eq!(expected_ms(0, 0), 0, "nothing dirty: no time");
        assert_eq!(expected_ms(4096, 0), u64::MAX, "no rate yet: never fits");
        assert_eq!(expected_ms(10 << 20, 100 << 20), 100);
        assert_eq!(expected_ms(1 << 20, 1 << 30), 0);
        assert_eq!(per_second(1000, Duration::from_millis(500)), 2000);
    }

    #[test]
    fn a_capped_sender_keeps_to_its_rate() {
        let mut s = Sender::new(Some(1024)); // 1 MiB/s
        let t = Instant::now();
        s.throttle(256 << 10, &|| Ok(())).unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(240),
            "256 KiB at 1 MiB/s took {took:?}"
        );
        let mut free = Sender::new(None);
        let t = Instant::now();
        free.throttle(1 << 30, &|| Ok(())).unwrap();
        assert!(t.elapsed() < Duration::from_millis(50));
        // A cancel ends the wait.
        let mut s = Sender::new(Some(1));
        let t = Instant::now();
        assert!(s
            .throttle(1 << 20, &|| Err(MigrateError::Cancelled))
            .is_err());
        assert!(t.elapsed() < Duration::from_millis(500));
    }
}
