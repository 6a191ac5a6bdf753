//! The restart policy: what happens when a VMM ends unasked (a crash, or the guest
//! powering itself off), with its backoff and the crash loop that ends it `crashed`.

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

/// Restart bookkeeping of one VM.
#[derive(Default)]
pub(super) struct Crashes {
    pub(super) start_seq: u64,
    pub(super) times: Vec<Instant>,
    pub(super) not_before: Option<Instant>,
}

impl Reconciler {
    /// A VMM ended unasked: restart it, leave it crashed, or (the guest powered off)
    /// record the VM as stopped, by its restart policy.
    pub(super) async fn ended(&mut self, vm: &Vm, how: Ending) {
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
        let verdict = after_crash(&mut c.times, now, vm.restart_policy);
        let n = c.times.len();
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
            backoff.as_secs()
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

#[cfg(test)]
mod tests {
    use super::*;

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
