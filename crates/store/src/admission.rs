//! Who may write a volume while a VM runs from it (issue #8): only that VM's own VMM.
//! Another writer — `qemu-io` or `nbdcopy` on the store's `nbd.sock` or over NBD on TCP
//! with a certificate of the cluster CA, a `tessera volume cp` over the QUIC export —
//! would write under the guest's feet, as qemu's image locking refuses ("Failed to get
//! shared 'write' lock").
//!
//! The store does not know which VM uses a volume nor which process is its VMM:
//! `tesserad` does (the cluster's VM records, the `run.json` of the VMMs it started on
//! this node, the digest of each VMM's writer key). So at a connection's first write the
//! store asks it, giving what tells the client apart: its process id when it came on the
//! Unix socket (the kernel's `SO_PEERCRED`, which the client cannot choose), and the
//! writer key it gave after the export's name (`tessera_nbd::export_name`; a VMM on
//! another node than its disk's primary writes over TCP, where only its key tells it
//! from another holder of a cluster certificate). Reads, flushes and snapshots are never
//! asked about.
//!
//! The answer is kept for [`RECHECK`] only, then asked again at the next write: so a
//! client admitted while no VM used the volume has its writes refused at most that long
//! after `tesserad` learns that a VM started on it (its start commits the VMM's writer
//! key before the VMM runs), and a VMM left behind by an HA restart or a migration
//! loses its right as soon. When `tesserad` cannot be asked, an admitted connection
//! keeps its answer for up to [`UNANSWERED_LIMIT`] (a `tesserad` restart does not fail
//! a running VM's writes), then its writes fail with EIO until it answers.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tessera_nbd::proto::Errno;
use tessera_nbd::{DeviceError, Peer};

use crate::claim::{self, ClusterAsk};

/// How long an answer is kept before the next write asks again.
pub const RECHECK: Duration = Duration::from_millis(500);
/// How long an admitted connection keeps writing while `tesserad` cannot be asked.
pub const UNANSWERED_LIMIT: Duration = Duration::from_secs(10);

/// One connection's right to write its volume.
pub struct Writer {
    /// Whom to ask and who the client is; `None`: not asked (a store without
    /// `tesserad`).
    ask: Option<(ClusterAsk, Client)>,
    /// The last answer and when it was given.
    answer: Mutex<Option<Answer>>,
}

/// What tells a client apart.
#[derive(Clone)]
struct Client {
    /// Its process id, when it came on the Unix socket.
    pid: Option<u32>,
    /// The writer key it gave, if any: never logged.
    key: Option<String>,
}

/// `tesserad`'s last answer for a connection.
#[derive(Clone, Debug)]
struct Answer {
    /// Its refusal in words, or leave to write.
    verdict: Result<(), String>,
    /// When it was given.
    given: Instant,
    /// When it was last asked for (a failure to ask counts: not asked again at once).
    asked: Instant,
}

/// What a write does with the answer it has: use it, or ask again.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Use(Result<(), String>),
    Ask,
}

/// The rule on the answer kept, at `now`.
fn next(answer: Option<&Answer>, now: Instant) -> Next {
    match answer {
        Some(a) if now.duration_since(a.asked) < RECHECK => Next::Use(a.verdict.clone()),
        _ => Next::Ask,
    }
}

/// What a failure to ask leaves the connection with at `now`: its admission while it is
/// recent enough, else the failure.
fn unanswered(answer: Option<&mut Answer>, now: Instant, why: String) -> Result<(), String> {
    match answer {
        Some(a) if a.verdict.is_ok() && now.duration_since(a.given) < UNANSWERED_LIMIT => {
            a.asked = now;
            Ok(())
        }
        _ => Err(why),
    }
}

impl Writer {
    /// The rule for a client connected from `peer` that gave writer key `key`, to a
    /// store that asks `cluster`. A store without `tesserad` (tests, a bare store) asks
    /// no one.
    pub fn for_peer(cluster: Option<&ClusterAsk>, peer: &Peer, key: Option<&str>) -> Writer {
        let pid = match peer {
            Peer::Unix { pid } => *pid,
            _ => None,
        };
        let client = Client {
            pid,
            key: key.map(str::to_string),
        };
        Writer {
            ask: cluster.map(|c| (c.clone(), client)),
            answer: Mutex::new(None),
        }
    }

    /// Whether this connection may write `volume`: asked of `tesserad` at its first
    /// write and again when the answer is older than [`RECHECK`]. Blocking when it asks.
    pub fn check(&self, volume: &str) -> Result<(), DeviceError> {
        let Some((cluster, client)) = &self.ask else {
            return Ok(());
        };
        // The common case, a fresh answer, without leaving the async worker.
        if let Some(kept) = self.answer.try_lock() {
            if let Next::Use(verdict) = next(kept.as_ref(), Instant::now()) {
                return verdict.map_err(|why| DeviceError::new(Errno::Perm, why));
            }
        }
        claim::blocking(|| self.ask_now(cluster, client, volume))
    }

    /// Asks `tesserad` unless another write of this connection just did.
    fn ask_now(
        &self,
        cluster: &ClusterAsk,
        client: &Client,
        volume: &str,
    ) -> Result<(), DeviceError> {
        // One question at a time: the connection's other writes wait for its answer.
        let mut kept = self.answer.lock();
        let now = Instant::now();
        if let Next::Use(verdict) = next(kept.as_ref(), now) {
            return verdict.map_err(|why| DeviceError::new(Errno::Perm, why));
        }
        let verdict = match cluster.may_write_here(volume, client.pid, client.key.as_deref()) {
            Ok(verdict) => verdict,
            Err(why) => {
                let left = unanswered(kept.as_mut(), now, why.clone());
                if left.is_ok() {
                    tracing::warn!(volume, error = %why, "tesserad not asked again whether this client may write; its admission is kept a while");
                }
                return left.map_err(|why| DeviceError::new(Errno::Io, why));
            }
        };
        // Logged when it starts being refused, not at every question after.
        if let Err(why) = &verdict {
            if kept.as_ref().is_none_or(|a| a.verdict.is_ok()) {
                tracing::warn!(volume, pid = client.pid, reason = %why, "an export client's write refused");
            }
        }
        *kept = Some(Answer {
            verdict: verdict.clone(),
            given: now,
            asked: now,
        });
        verdict.map_err(|why| DeviceError::new(Errno::Perm, why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(verdict: Result<(), String>, at: Instant) -> Answer {
        Answer {
            verdict,
            given: at,
            asked: at,
        }
    }

    #[test]
    fn an_answer_is_kept_half_a_second_then_asked_again() {
        let t0 = Instant::now();
        assert_eq!(next(None, t0), Next::Ask);
        let ok = answer(Ok(()), t0);
        assert_eq!(next(Some(&ok), t0 + RECHECK / 2), Next::Use(Ok(())));
        // A VM that started meanwhile is heard of at the next write after RECHECK.
        assert_eq!(next(Some(&ok), t0 + RECHECK), Next::Ask);
        let no = answer(Err("in use".into()), t0);
        assert_eq!(next(Some(&no), t0), Next::Use(Err("in use".into())));
        assert_eq!(next(Some(&no), t0 + RECHECK), Next::Ask);
    }

    #[test]
    fn an_admission_outlives_an_unanswered_question_only_a_while() {
        let t0 = Instant::now();
        let why = || "cannot ask".to_string();
        // Never admitted: the failure.
        assert_eq!(unanswered(None, t0, why()), Err(why()));
        let mut no = answer(Err("in use".into()), t0);
        assert_eq!(unanswered(Some(&mut no), t0, why()), Err(why()));
        // Admitted: kept, and not asked again at once...
        let mut ok = answer(Ok(()), t0);
        let later = t0 + Duration::from_secs(3);
        assert_eq!(unanswered(Some(&mut ok), later, why()), Ok(()));
        assert_eq!(ok.asked, later);
        assert_eq!(next(Some(&ok), later + RECHECK / 2), Next::Use(Ok(())));
        // ...until the limit since tesserad last said yes.
        let too_late = t0 + UNANSWERED_LIMIT;
        assert_eq!(unanswered(Some(&mut ok), too_late, why()), Err(why()));
    }
}
