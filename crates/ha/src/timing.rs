//! The timing budget: how fast a node is declared down, how fast a node without quorum
//! stops its VMs, and the bound on a VM running again elsewhere. The compile-time checks
//! below are the argument of docs/ha.md: self-fencing finishes before detection starts a
//! restart, and detection plus fence plus start stays within 15 s.

use crate::model::Millis;

/// How often every node announces itself (tesserad: five times a second).
pub const ANNOUNCE_EVERY: Millis = 200;
/// Silence after which the quorum's side declares a node down (tesserad's
/// `health::DOWN_AFTER`).
pub const DOWN_AFTER: Millis = 3_000;
/// The detection bound: the last announcement heard may be up to one interval before the
/// node failed, and the check runs on the shell's tick.
pub const DETECTION_BOUND: Millis = 3_500;
/// Time without contact to a majority (itself included) after which a node's [`Guard`]
/// stops every local VM.
///
/// [`Guard`]: crate::Guard
pub const SELF_FENCE_AFTER: Millis = 2_000;
/// Time without contact to a majority after which the guard, finding VMs still running,
/// asks for a hard reset (the kernel watchdog where present).
pub const WATCHDOG_AFTER: Millis = 2_500;
/// The budget for committing the generation raises through Raft (the simulator's commit
/// latency must stay below it).
pub const FENCE_COMMIT_BUDGET: Millis = 1_000;
/// The budget for starting a VM on its new node until its VMM reports it running.
pub const START_BUDGET: Millis = 5_000;
/// A start that has not reported running after this is fenced and placed again.
pub const START_TIMEOUT: Millis = 10_000;
/// From a node failing to its HA VMs running elsewhere (when they fit).
pub const RECOVERY_BOUND: Millis = DETECTION_BOUND + FENCE_COMMIT_BUDGET + START_BUDGET;
/// The product's promise (issue #12).
pub const PROMISED_RECOVERY: Millis = 15_000;

// A node cut off stops its VMs (at the latest, by the watchdog) before the other side can
// declare it down: the two copies never run at the same time, not only never write.
const _: () = assert!(SELF_FENCE_AFTER < WATCHDOG_AFTER);
const _: () = assert!(WATCHDOG_AFTER < DOWN_AFTER);
const _: () = assert!(DOWN_AFTER + ANNOUNCE_EVERY <= DETECTION_BOUND);
const _: () = assert!(RECOVERY_BOUND <= PROMISED_RECOVERY);
const _: () = assert!(START_BUDGET < START_TIMEOUT);
