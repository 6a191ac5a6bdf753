//! Login throttling: exponential back-off after failed logins, per source address and per
//! username (429 with `Retry-After` while it lasts), and a bound on concurrent argon2
//! checks (503 with `Retry-After` when they stay taken).
//!
//! An attempt counts as a failure from the moment it is let through and is forgiven when
//! the password was right, so a burst of parallel guesses cannot all pass before the first
//! failure is recorded. Attempts refused while in back-off are not counted: a guesser at
//! one address cannot push the user's own count up, so (with the per-user allowance larger
//! than the per-address one) it cannot lock the user out of other addresses. Many
//! addresses guessing one user together do reach the per-user back-off: that user then
//! waits too, which is the price of slowing a distributed guesser.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What is throttled.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A source address (IPv6 by its /64: one host usually has the whole prefix).
    Addr(IpAddr),
    /// A username, whether it exists or not (so the answer does not tell).
    User(String),
}

#[derive(Clone, Copy, Debug)]
struct Backoff {
    failures: u32,
    last: Instant,
    until: Option<Instant>,
}

/// The limits.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Failures per address before back-off starts.
    pub free_per_addr: u32,
    /// Failures per username before back-off starts.
    pub free_per_user: u32,
    /// The first back-off; each further failure doubles it.
    pub base: Duration,
    /// The longest back-off of an address.
    pub max_addr: Duration,
    /// The longest back-off of a username.
    pub max_user: Duration,
    /// Failures older than this (since the last one) are forgotten.
    pub forget: Duration,
    /// At most this many addresses and usernames are remembered (memory bound).
    pub capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            free_per_addr: 5,
            free_per_user: 20,
            base: Duration::from_secs(1),
            max_addr: Duration::from_secs(15 * 60),
            max_user: Duration::from_secs(60),
            forget: Duration::from_secs(15 * 60),
            capacity: 50_000,
        }
    }
}

/// Failed logins by address and username.
pub struct Throttle {
    cfg: Config,
    seen: Mutex<HashMap<Key, Backoff>>,
}

fn addr_key(a: IpAddr) -> Key {
    match a {
        IpAddr::V4(_) => Key::Addr(a),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Key::Addr(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                Key::Addr(IpAddr::V6(std::net::Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        },
    }
}

impl Throttle {
    /// A throttle with these limits.
    pub fn new(cfg: Config) -> Throttle {
        Throttle {
            cfg,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn keys(addr: Option<IpAddr>, user: &str) -> Vec<(Key, bool)> {
        let mut v = vec![(Key::User(user.to_string()), false)];
        if let Some(a) = addr {
            v.push((addr_key(a), true));
        }
        v
    }

    /// Lets an attempt through (counting it as a failure until [`Throttle::succeeded`]),
    /// or says how long to wait.
    pub fn begin(&self, addr: Option<IpAddr>, user: &str, now: Instant) -> Result<(), Duration> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let forget = self.cfg.forget;
        let keys = Self::keys(addr, user);
        let mut wait = Duration::ZERO;
        for (k, _) in &keys {
            if let Some(b) = seen.get(k) {
                if now.duration_since(b.last) < forget {
                    if let Some(u) = b.until.filter(|u| *u > now) {
                        wait = wait.max(u - now);
                    }
                }
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if seen.len() + keys.len() > self.cfg.capacity {
            seen.retain(|_, b| now.duration_since(b.last) < forget);
            if seen.len() + keys.len() > self.cfg.capacity {
                // Still full of recent failures: keep those in back-off, forget the rest.
                seen.retain(|_, b| b.until.is_some_and(|u| u > now));
            }
        }
        for (k, is_addr) in keys {
            let (free, max) = if is_addr {
                (self.cfg.free_per_addr, self.cfg.max_addr)
            } else {
                (self.cfg.free_per_user, self.cfg.max_user)
            };
            let b = seen.entry(k).or_insert(Backoff {
                failures: 0,
                last: now,
                until: None,
            });
            if now.duration_since(b.last) >= forget {
                b.failures = 0;
            }
            b.failures = b.failures.saturating_add(1);
            b.last = now;
            b.until = (b.failures > free).then(|| {
                let doublings = (b.failures - free - 1).min(20);
                now + self.cfg.base.saturating_mul(1 << doublings).min(max)
            });
        }
        Ok(())
    }

    /// The attempt let through by [`Throttle::begin`] had the right password: the
    /// username's failures are forgotten, the address's count loses this attempt.
    pub fn succeeded(&self, addr: Option<IpAddr>, user: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.remove(&Key::User(user.to_string()));
        if let Some(a) = addr {
            let k = addr_key(a);
            if let Some(b) = seen.get_mut(&k) {
                b.failures = b.failures.saturating_sub(1);
                if b.failures <= self.cfg.free_per_addr {
                    b.until = None;
                }
                if b.failures == 0 {
                    seen.remove(&k);
                }
            }
        }
    }
}

/// The daemon's throttle (one API per process).
pub fn throttle() -> &'static Throttle {
    static T: std::sync::OnceLock<Throttle> = std::sync::OnceLock::new();
    T.get_or_init(|| Throttle::new(Config::default()))
}

/// Concurrent argon2 checks and hashes at most (each takes ~19 MiB and tens of ms of a
/// core); more wait for a turn.
const ARGON2_AT_ONCE: usize = 4;
/// How long a check waits for its turn before the answer is 503.
const ARGON2_WAIT: Duration = Duration::from_secs(5);

/// A turn to run argon2, or `None` after [`ARGON2_WAIT`] without one.
pub async fn argon2_turn() -> Option<tokio::sync::SemaphorePermit<'static>> {
    static S: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(ARGON2_AT_ONCE);
    turn(&S, ARGON2_WAIT).await
}

async fn turn(
    s: &tokio::sync::Semaphore,
    wait: Duration,
) -> Option<tokio::sync::SemaphorePermit<'_>> {
    tokio::time::timeout(wait, s.acquire()).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            free_per_addr: 3,
            free_per_user: 6,
            base: Duration::from_secs(1),
            max_addr: Duration::from_secs(60),
            max_user: Duration::from_secs(10),
            forget: Duration::from_secs(600),
            capacity: 100,
        }
    }

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    #[test]
    fn an_address_backs_off_exponentially_and_other_addresses_still_get_in() {
        let t = Throttle::new(cfg());
        let t0 = Instant::now();
        for _ in 0..3 {
            t.begin(A, "admin", t0).unwrap();
        }
        // The fourth attempt passes but starts a 1 s back-off.
        t.begin(A, "admin", t0).unwrap();
        assert_eq!(t.begin(A, "admin", t0), Err(Duration::from_secs(1)));
        // Refused attempts do not count: many of them change nothing.
        for _ in 0..100 {
            assert!(t.begin(A, "admin", t0).is_err());
        }
        let t1 = t0 + Duration::from_secs(1);
        t.begin(A, "admin", t1).unwrap();
        assert_eq!(t.begin(A, "admin", t1), Err(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        t.begin(A, "admin", t2).unwrap();
        assert_eq!(t.begin(A, "admin", t2), Err(Duration::from_secs(4)));
        // Another address, the same user: the user has 6 counted failures, its allowance.
        t.begin(B, "admin", t2).unwrap();
        t.succeeded(B, "admin");
        t.begin(B, "admin", t2).unwrap();
    }

    #[test]
    fn many_addresses_guessing_one_user_reach_its_back_off() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        for i in 0..7u8 {
            let a = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i)));
            t.begin(a, "admin", now).unwrap();
        }
        assert!(t.begin(B, "admin", now).is_err());
        // Another user is not affected.
        t.begin(B, "olga", now).unwrap();
        // It ends.
        assert!(t.begin(B, "admin", now + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn failures_are_forgotten_and_memory_is_bounded() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        for _ in 0..5 {
            let _ = t.begin(A, "x", now);
        }
        assert!(t.begin(A, "x", now).is_err());
        assert!(t.begin(A, "x", now + Duration::from_secs(600)).is_ok());
        for i in 0..1000 {
            let _ = t.begin(A, &format!("user{i}"), now + Duration::from_secs(2000 + i));
        }
        assert!(t.seen.lock().unwrap().len() <= 100);
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        for i in 0..4u16 {
            let a: IpAddr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i).into();
            t.begin(Some(a), &format!("u{i}"), now).unwrap();
        }
        let other: IpAddr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9).into();
        assert!(t.begin(Some(other), "v", now).is_err());
    }

    #[tokio::test]
    async fn argon2_checks_beyond_the_bound_wait_then_give_up() {
        let s = tokio::sync::Semaphore::new(2);
        let a = turn(&s, Duration::from_millis(50)).await.unwrap();
        let _b = turn(&s, Duration::from_millis(50)).await.unwrap();
        let start = Instant::now();
        assert!(turn(&s, Duration::from_millis(200)).await.is_none());
        assert!(start.elapsed() >= Duration::from_millis(200));
        drop(a);
        assert!(turn(&s, Duration::from_millis(50)).await.is_some());
    }
}
