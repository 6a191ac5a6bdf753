//! A token bucket for log lines a guest can trigger, so a guest cannot fill the host's
//! logs (or spend the VMM's time formatting them): a burst is logged in full, then at
//! most a steady rate, and the next line logged says how many were left out.

use std::time::Instant;

/// Lets through `burst` lines at once and `per_sec` a second after that.
#[derive(Debug)]
pub struct LogLimit {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl LogLimit {
    /// A full bucket of `burst` tokens refilled at `per_sec` a second.
    pub fn new(burst: u32, per_sec: u32) -> LogLimit {
        LogLimit {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_sec),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the lines suppressed since the
    /// last one logged (to be said with it), or `None` (counted as suppressed).
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`LogLimit::check`] at a given time (for tests; times before the last are taken as it).
    pub fn check_at(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Logs `$($arg)+` at `$level` if `$limit` (a `LogLimit`) lets it through, with a
/// `suppressed` field counting the lines left out before it.
#[macro_export]
macro_rules! limited {
    ($limit:expr, $level:ident, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.check() {
            if suppressed > 0 {
                tracing::$level!(suppressed, "{suppressed} lines like the next suppressed (rate limit)");
            }
            tracing::$level!($($arg)+);
        }
    };
}

/// The default for guest-triggered lines: 20 at once, then 5 a second.
pub fn guest_lines() -> LogLimit {
    LogLimit::new(20, 5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_and_the_next_line_counts_the_rest() {
        let mut l = LogLimit::new(3, 2);
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.check_at(t0), None);
        }
        // Half a second later one token is back: the line says 1000 were suppressed.
        assert_eq!(l.check_at(t0 + Duration::from_millis(500)), Some(1000));
        assert_eq!(l.check_at(t0 + Duration::from_millis(500)), None);
        // A long quiet refills no more than the burst.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(l.check_at(later), Some(1));
        assert_eq!(l.check_at(later), Some(0));
        assert_eq!(l.check_at(later), Some(0));
        assert_eq!(l.check_at(later), None);
        // Time going backwards grants nothing.
        assert_eq!(l.check_at(t0), None);
    }
}
