//! The restart policy: what happens when a VMM ends unasked (a crash, or the guest
//! powering itself off), with its backoff and the crash loop that ends it `crashed`.
//!
//! Under `always`, a guest that ends by itself is started again and that is not a crash:
//! on `tessera-vmm` a guest's reboot is such an ending too (the i8042 reset line, which
//! is also how guests power off), and a Proxmox user expects a VM that reboots itself
//! ten times a day to keep running, as its HA stack's `started` state restarts a VM shut
//! down from inside without counting a failure. Only crashes count toward the crash loop.
//! A guest that ends again and again soon after its start is slowed down as Docker's
//! `always` does it: 0.1 s, doubling per quick ending in a row up to 60 s, and at once
//! again after a run of at least [`QUICK_RUN`], so it never floods the cluster with
//! restarts and events, and is never given up on.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::{DesiredState, RestartPolicy, Vm, VmState};
use tessera_state::{Command, Require};

use super::supervisor::Ending;
use super::Reconciler;
use crate::records::table::VMS;
use crate::tables::{event, put};

/// Crashes within this window that make a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(600);
/// Crashes within [`CRASH_WINDOW`] after which the VM is left `crashed`.
const CRASH_LIMIT: usize = 5;

/// A run shorter than this, ended by the guest, is a quick ending (see the module doc).
const QUICK_RUN: Duration = Duration::from_secs(10);
/// The longest wait before a guest that keeps ending quickly is started again.
const QUICK_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Restart bookkeeping of one VM.
#[derive(Default)]
pub(super) struct Crashes {
    pub(super) start_seq: u64,
    /// Crashes of this start within [`CRASH_WINDOW`].
    pub(super) times: Vec<Instant>,
    /// Restarts after the guest ended by itself (`always`), for this start.
    pub(super) guest_restarts: u32,
    /// Guest endings in a row, each after a run shorter than [`QUICK_RUN`].
    pub(super) quick_endings: u32,
    pub(super) not_before: Option<Instant>,
}

impl Crashes {
    /// Restarts by the restart policy for this start (as `VmStatus::restarts` says).
    pub(super) fn restarts(&self) -> u32 {
        self.times.len() as u32 + self.guest_restarts
    }
}

impl Reconciler {
    /// A VMM ended unasked after running for `ran` (unknown for an adopted VMM): restart
    /// it, leave it crashed, or (the guest powered off) record the VM as stopped, by its
    /// restart policy.
    pub(super) async fn ended(&mut self, vm: &Vm, how: Ending, ran: Option<Duration>) {
        let name = vm.name.clone();
        let (crash, reason) = match how {
            Ending::GuestOff(r) => (false, r),
            Ending::Requested => (false, "powered off through its control socket".into()),
            Ending::Crash(r) => (true, r),
        };
        tracing::info!(vm = %name, crash, %reason, "VMM ended");
        if !crash && vm.restart_policy != RestartPolicy::Always {
            // The guest is off for good: so is the VM's desired state.
            let mut stopped = vm.clone();
            stopped.desired_state = DesiredState::Stopped;
            stopped.force_stop = false;
            let _ = self
                .node
                .write(Command::Txn {
                    require: vec![Require::equals(VMS, &name, json!(vm))],
                    ops: vec![
                        put(VMS, &name, &stopped),
                        event("vm.stopped", &name, "tesserad", &reason),
                    ],
                })
                .await;
            self.reasons.remove(&name);
            return self
                .report(&name, VmState::Stopped, Some(reason), None)
                .await;
        }
        let c = self.crashes.entry(name.clone()).or_default();
        let now = Instant::now();
        let verdict = if crash {
            after_crash(&mut c.times, now, vm.restart_policy)
        } else {
            c.guest_restarts += 1;
            Ok(after_guest_ending(&mut c.quick_endings, ran))
        };
        let n = c.restarts();
        if let Err(given_up) = verdict {
            c.not_before = None;
            let why = format!("{reason} ({given_up})");
            let _ = self
                .node
                .write(Command::Txn {
                    require: vec![Require::exists(VMS, &name)],
                    ops: vec![event("vm.crashed", &name, "tesserad", &why)],
                })
                .await;
            self.reasons.remove(&name);
            return self.report(&name, VmState::Crashed, Some(why), None).await;
        }
        let backoff = verdict.unwrap_or_default();
        c.not_before = Some(now + backoff);
        let why = format!(
            "restarting in {} s after: {reason} (restart {n})",
            backoff.as_secs_f32()
        );
        let _ = self
            .node
            .write(Command::Txn {
                require: vec![Require::exists(VMS, &name)],
                ops: vec![event("vm.restart", &name, "tesserad", &why)],
            })
            .await;
        self.reasons
            .insert(name.clone(), format!("restarted after: {reason}"));
        self.report(&name, VmState::Starting, Some(why), None).await;
    }
}

/// The restart policy's verdict on a crash at `now`: `times` (the crashes of this start)
/// forgets those older than [`CRASH_WINDOW`] and gains `now`. A restart after a backoff
/// of 1, 2, 4, 8 s for the first to fourth crash in the window; the VM left crashed
/// (`Err`: why, for its reason) under `never` or at the [`CRASH_LIMIT`]th.
fn after_crash(
    times: &mut Vec<Instant>,
    now: Instant,
    policy: RestartPolicy,
) -> Result<Duration, String> {
    times.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
    times.push(now);
    let n = times.len();
    if policy == RestartPolicy::Never {
        return Err("restart policy never".into());
    }
    if n >= CRASH_LIMIT {
        return Err(format!(
            "crash loop: {n} crashes within 10 minutes; not restarted"
        ));
    }
    Ok(Duration::from_secs(1 << (n - 1).min(5)))
}

/// The wait before a VM whose guest ended by itself after running `ran` is started again
/// under `always`: none after a run of [`QUICK_RUN`] or more (or of unknown length: an
/// adopted VMM), else 0.1 s doubling with each quick ending in a row (`quick`), at most
/// [`QUICK_BACKOFF_MAX`].
fn after_guest_ending(quick: &mut u32, ran: Option<Duration>) -> Duration {
    if ran.is_none_or(|r| r >= QUICK_RUN) {
        *quick = 0;
        return Duration::ZERO;
    }
    *quick = quick.saturating_add(1);
    let doublings = (*quick - 1).min(20);
    (Duration::from_millis(100) * (1u32 << doublings)).min(QUICK_BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_ending_by_itself_under_always_is_never_a_crash_loop() {
        let mut quick = 0;
        let s = Duration::from_secs;
        // Ending again and again right after its start: slowed down, never given up.
        let waits: Vec<Duration> = (0..12)
            .map(|_| after_guest_ending(&mut quick, Some(Duration::from_millis(300))))
            .collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[1], Duration::from_millis(200));
        assert_eq!(waits[4], Duration::from_millis(1600));
        assert_eq!(waits[9], s(51) + Duration::from_millis(200));
        assert_eq!(waits[10], s(60), "capped");
        assert_eq!(waits[11], s(60));
        // A run of 10 s or more (a guest that reboots now and then) starts again at once
        // and forgets the quick endings before it.
        assert_eq!(after_guest_ending(&mut quick, Some(s(10))), Duration::ZERO);
        assert_eq!(quick, 0);
        assert_eq!(
            after_guest_ending(&mut quick, Some(s(1))),
            Duration::from_millis(100)
        );
        // An adopted VMM's run has no known length: at once.
        assert_eq!(after_guest_ending(&mut quick, None), Duration::ZERO);
    }

    #[test]
    fn crashes_back_off_then_a_crash_loop_ends_crashed() {
        let t0 = Instant::now();
        let mut times = Vec::new();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for (i, want) in [1, 2, 4, 8].into_iter().enumerate() {
            let got = after_crash(&mut times, at(i as u64 * 20), RestartPolicy::OnCrash);
            assert_eq!(got, Ok(Duration::from_secs(want)), "crash {}", i + 1);
        }
        assert_eq!(
            after_crash(&mut times, at(100), RestartPolicy::Always),
            Err("crash loop: 5 crashes within 10 minutes; not restarted".into())
        );
        // Crashes 10 minutes old or older are forgotten.
        let mut times = vec![at(0), at(20), at(40)];
        assert_eq!(
            after_crash(&mut times, at(619), RestartPolicy::OnCrash),
            Ok(Duration::from_secs(4)),
            "the crash at 0 s is forgotten, those at 20 and 40 s count"
        );
        let mut times = vec![at(0), at(20), at(40)];
        assert_eq!(
            after_crash(&mut times, at(640), RestartPolicy::OnCrash),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(times.len(), 1);
        // Under never, the first crash ends it.
        let mut times = Vec::new();
        assert_eq!(
            after_crash(&mut times, t0, RestartPolicy::Never),
            Err("restart policy never".into())
        );
    }
}
