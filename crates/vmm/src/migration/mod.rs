//! Live migration between two `tessera-vmm` processes on different nodes.
//!
//! The source (`outgoing`) sends guest memory while the guest runs, then the pages the
//! guest dirtied meanwhile, round after round, until the pages left would take no longer
//! than the downtime target to send; then it pauses the guest, sends the last dirty pages
//! and the vCPU and device state, and waits. The target (`incoming`, a VMM started with
//! `--incoming`) receives all that into fresh guest memory and builds the VM without
//! running it; it says `Loaded`, and runs the guest only when its caller says `go` over
//! the control socket (after `tesserad` moved the VM and its disk's primary through the
//! cluster state). Then it tells the source `Resumed`, and the source VMM exits.
//!
//! The stream is TLS over TCP with the cluster's node certificates (`tls`); its format is
//! defined once in `wire`. Any failure before the source has sent its last byte leaves
//! the guest running on the source; after that only the caller knows whether the target
//! may run (it asked for `go` or not), so the source stays paused until told
//! (`migration_cancel` resumes it).

pub mod deferred_disk;
pub mod incoming;
pub mod outgoing;
pub mod tls;
pub mod wire;

use std::net::TcpStream;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which end of a migration this VMM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The source: it sends the VM.
    Out,
    /// The target: it receives the VM.
    In,
}

/// Where a migration stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No migration.
    #[default]
    None,
    /// Source: connecting to the target.
    Connecting,
    /// Source: sending memory while the guest runs.
    Precopy,
    /// Source: the guest is paused; the last dirty pages and the state are being sent.
    StopAndCopy,
    /// Source: the target holds everything; waiting until it runs the guest.
    SwitchingOver,
    /// Source: the stream failed after everything was sent: whether the target will run
    /// the guest is its caller's to say, so the guest stays paused here until
    /// `migration_cancel` (which resumes it) or a power-off.
    Undecided,
    /// Source: the guest runs on the target.
    Completed,
    /// Source: the migration failed; the guest runs here.
    Failed,
    /// Source: cancelled; the guest runs here.
    Cancelled,
    /// Target: waiting for the source.
    Listening,
    /// Target: receiving.
    Receiving,
    /// Target: it holds the whole VM; waiting for `migration_go`.
    Loaded,
    /// Target: the guest runs here.
    Running,
}

impl Phase {
    /// Whether a migration is under way (another may not start).
    pub fn busy(self) -> bool {
        !matches!(
            self,
            Phase::None | Phase::Completed | Phase::Failed | Phase::Cancelled | Phase::Running
        )
    }
}

/// A migration's progress, as `migration_status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Which end this VMM is, once a migration began.
    pub direction: Option<Direction>,
    /// Where it stands.
    pub phase: Phase,
    /// Why it failed, or what was cut short.
    pub error: Option<String>,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Bytes of page data sent (source) or received (target), every round counted.
    pub bytes: u64,
    /// Pages sent (or received) with their data.
    pub pages: u64,
    /// Pages sent (or received) as zeroes, without data.
    pub zero_pages: u64,
    /// Rounds of memory sent while the guest ran (the first, whole, counts as one).
    pub iterations: u32,
    /// How fast the guest dirtied memory during the last round, bytes per second.
    pub dirty_bytes_per_s: u64,
    /// How fast pages went out, bytes per second (all rounds so far).
    pub bandwidth_bytes_per_s: u64,
    /// Dirty bytes waiting at the last look.
    pub remaining_bytes: u64,
    /// What sending them would pause the guest for, in ms.
    pub expected_downtime_ms: u64,
    /// The downtime the pre-copy aims under, in ms.
    pub downtime_target_ms: u64,
    /// Whether the pre-copy got the expected downtime under the target (false: it gave up
    /// after its last round and paused anyway).
    pub converged: Option<bool>,
    /// Source: from pausing the guest to the target saying it runs, in ms.
    pub downtime_ms: Option<u64>,
    /// From the start to the end, in ms.
    pub total_ms: Option<u64>,
    /// Target: where it listens (`ip:port`).
    pub listen: Option<String>,
    /// Target: the token the source must present.
    pub token: Option<String>,
    /// The switch-over's moments, in the order they happened ([`Mark`]): where the
    /// downtime goes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Mark>,
}

/// One moment of a migration's switch-over, on the host's monotonic clock
/// (`CLOCK_MONOTONIC`, one clock for every process of a host: a source's and a target's
/// marks compare when both run on the same host, as in the dev cluster).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// What happened (`paused`, `sent`, `loaded`, `go`, `first_disk_done`, ...).
    pub what: String,
    /// When, in µs of the host's monotonic clock.
    pub mono_us: u64,
}

/// Now on the host's monotonic clock, in µs (the clock [`Mark`]s use).
pub fn mono_us() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec for the call's duration, and
    // CLOCK_MONOTONIC is always available on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    if r != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// A migration's state shared between its thread and the control API.
#[derive(Default)]
pub struct Shared {
    status: Mutex<Status>,
    changed: Condvar,
    /// The stream's socket, to cut it on a cancel.
    sock: Mutex<Option<TcpStream>>,
    cancelled: std::sync::atomic::AtomicBool,
    /// Target: `migration_go` was asked.
    go: Mutex<bool>,
    /// Source: a `migration_status` reply told a caller the migration completed.
    seen_done: Mutex<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    /// Forgets a finished migration's flags before another starts.
    pub fn reset(&self) {
        self.cancelled
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *self.go.lock().unwrap_or_else(|p| p.into_inner()) = false;
        *self.seen_done.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.set_socket(None);
    }

    /// Changes the status.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Notes that `what` happened now in the status's timeline.
    pub fn mark(&self, what: &str) {
        let at = mono_us();
        self.update(|s| {
            s.timeline.push(Mark {
                what: what.to_string(),
                mono_us: at,
            })
        });
    }

    /// The status once its phase is no longer `phase`, or after `wait` (a caller's long
    /// poll, so it learns of a change at once).
    pub fn status_after(&self, phase: Option<Phase>, wait: Duration) -> Status {
        let deadline = Instant::now() + wait;
        let mut g = self.lock();
        while Some(g.phase) == phase {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        g.clone()
    }

    /// Source: a caller was told the migration completed (its reply written), so this
    /// process may end.
    pub fn completion_seen(&self) {
        *self.seen_done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Keeps the stream's socket so a cancel can cut it.
    pub fn set_socket(&self, s: Option<TcpStream>) {
        *self.sock.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Asks the migration to stop: the flag, and the stream cut so a blocked read or
    /// write returns.
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(s) = self.sock.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.changed.notify_all();
    }

    /// Whether a cancel was asked.
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Target: lets the loaded VM run.
    pub fn go(&self) {
        *self.go.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Target: waits (bounded) until `migration_go` or a cancel; true for go.
    pub fn wait_go(&self, control: &crate::control::Control, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if *self.go.lock().unwrap_or_else(|p| p.into_inner()) {
                return true;
            }
            if self.cancelled() || control.stop_requested().is_some() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // The flags live under other locks: look again shortly rather than miss a
            // notification between the checks and the wait.
            let g = self.lock();
            let _ = self
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(20)));
        }
    }

    /// Source: waits (bounded) until a `migration_status` saw the migration completed,
    /// so the caller learns the figures before this process ends.
    pub fn linger(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !*self.seen_done.lock().unwrap_or_else(|p| p.into_inner()) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let g = self.lock();
            let _ = self
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(20)));
        }
    }
}

/// The marks as `t0=<host monotonic ms of the first> what=+<ms after the first> ...`, for a log.
pub fn timeline_line(marks: &[Mark]) -> String {
    let Some(first) = marks.first() else {
        return String::new();
    };
    let mut line = format!("t0={:.3}", first.mono_us as f64 / 1000.0);
    for m in marks {
        let rel = m.mono_us.saturating_sub(first.mono_us) as f64 / 1000.0;
        line.push_str(&format!(" {}=+{rel:.1}", m.what));
    }
    line
}

/// Compares two tokens in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A fresh random token (128 bits, hex) for a target to require of its source.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abcd", "abcd"));
        assert!(!same_token("abcd", "abce"));
        assert!(!same_token("abcd", "abc"));
        let t = new_token().unwrap();
        assert_eq!(t.len(), 32);
        assert_ne!(t, new_token().unwrap());
    }

    #[test]
    fn a_status_wait_returns_on_a_change_or_at_its_limit() {
        let s = std::sync::Arc::new(Shared::default());
        let started = Instant::now();
        assert_eq!(
            s.status_after(Some(Phase::None), Duration::from_millis(50))
                .phase,
            Phase::None
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            s2.status_after(Some(Phase::None), Duration::from_secs(10))
                .phase
        });
        s.update(|st| st.phase = Phase::Precopy);
        assert_eq!(t.join().unwrap(), Phase::Precopy);
    }
}
