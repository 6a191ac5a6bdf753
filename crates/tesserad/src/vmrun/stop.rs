//! How a stop goes: the guest is asked first (the VMM presses its ACPI power button), the
//! VMM is powered off once the VM's stop timeout has passed (at once if the guest could
//! not be asked, e.g. while paused), and killed if it is still there [`KILL_AFTER`] after
//! that. Pure: the reconciler does the calls and keeps a [`Stop`] per stopping VM.

use std::time::{Duration, Instant};

use super::supervisor::Ending;

/// How long a forced power-off may take before the VMM is killed.
pub const KILL_AFTER: Duration = Duration::from_secs(10);

/// Where one stop of a VM stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// When it began.
    pub since: Instant,
    /// The guest was asked (its power button pressed).
    pub asked: bool,
    /// Why the guest could not be asked (the VMM refused the press).
    pub not_asked: Option<String>,
    /// When the VMM was told to power off (the forced part).
    pub forced: Option<Instant>,
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Press the guest's power button.
    Ask,
    /// Give the guest (or the power-off) time.
    Wait,
    /// Power the VMM off: the guest had its chance.
    PowerOff,
    /// SIGKILL.
    Kill,
}

impl Stop {
    /// A stop beginning at `now`.
    pub fn new(now: Instant) -> Stop {
        Stop {
            since: now,
            asked: false,
            not_asked: None,
            forced: None,
        }
    }

    /// The next step at `now`, with `grace` for the guest; `kill` asks for SIGKILL at once.
    pub fn next(&self, now: Instant, grace: Duration, kill: bool) -> Step {
        if kill {
            return Step::Kill;
        }
        if let Some(t) = self.forced {
            return if now.saturating_duration_since(t) >= KILL_AFTER {
                Step::Kill
            } else {
                Step::Wait
            };
        }
        if !self.asked && self.not_asked.is_none() {
            Step::Ask
        } else if self.not_asked.is_some() || now.saturating_duration_since(self.since) >= grace {
            Step::PowerOff
        } else {
            Step::Wait
        }
    }

    /// Why the VM stopped, for its status and its stop task: `how` its VMM ended.
    pub fn reason(&self, kill: bool, how: &Ending) -> String {
        if kill {
            return "killed on request".into();
        }
        if let Some(t) = self.forced {
            return match &self.not_asked {
                Some(why) => format!("forced at once: the guest could not be asked ({why})"),
                None => format!(
                    "forced after {} s: the guest did not shut down",
                    t.saturating_duration_since(self.since).as_secs()
                ),
            };
        }
        match how {
            Ending::GuestOff(_) => "the guest shut down".into(),
            Ending::Requested => "powered off through its control socket".into(),
            Ending::Crash(r) => format!("the VMM ended while stopping: {r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn the_guest_is_asked_first_and_forced_after_the_timeout() {
        let t0 = Instant::now();
        let mut s = Stop::new(t0);
        assert_eq!(s.next(t0, GRACE, false), Step::Ask);
        s.asked = true;
        assert_eq!(
            s.next(t0 + Duration::from_secs(29), GRACE, false),
            Step::Wait
        );
        let late = t0 + GRACE;
        assert_eq!(s.next(late, GRACE, false), Step::PowerOff);
        s.forced = Some(late);
        assert_eq!(
            s.next(late + Duration::from_secs(9), GRACE, false),
            Step::Wait
        );
        assert_eq!(s.next(late + KILL_AFTER, GRACE, false), Step::Kill);
        assert_eq!(
            s.reason(
                false,
                &Ending::Crash("the VMM was killed by signal 9".into())
            ),
            "forced after 30 s: the guest did not shut down"
        );
    }

    #[test]
    fn a_guest_that_shuts_down_says_so_and_one_that_cannot_be_asked_is_forced_at_once() {
        let t0 = Instant::now();
        let mut s = Stop::new(t0);
        s.asked = true;
        let off = Ending::GuestOff("the guest powered off (Reset)".into());
        assert_eq!(s.reason(false, &off), "the guest shut down");
        let mut paused = Stop::new(t0);
        paused.not_asked = Some("the VM is paused".into());
        assert_eq!(paused.next(t0, GRACE, false), Step::PowerOff);
        paused.forced = Some(t0);
        assert!(paused
            .reason(false, &Ending::Requested)
            .starts_with("forced at once: the guest could not be asked (the VM is paused"));
        assert_eq!(Stop::new(t0).next(t0, GRACE, true), Step::Kill);
        assert_eq!(Stop::new(t0).reason(true, &off), "killed on request");
    }
}
