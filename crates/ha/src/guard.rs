//! Self-fencing on one node: a node that has not been in contact with a majority for
//! [`SELF_FENCE_AFTER`] stops every local VM, and asks for a hard reset if any still
//! runs at [`WATCHDOG_AFTER`]. Both come before the other side's [`DOWN_AFTER`], so the
//! majority never restarts a VM the minority still runs.
//!
//! [`DOWN_AFTER`]: crate::timing::DOWN_AFTER

use crate::model::Millis;
use crate::timing::{SELF_FENCE_AFTER, WATCHDOG_AFTER};

/// The last time this node was in contact with a majority of `cluster_size` nodes, itself
/// counted (at `now`), given when it last heard each peer (`None`: never). `None` when a
/// majority was never reached.
pub fn majority_contact(
    now: Millis,
    peers_heard: &[Option<Millis>],
    cluster_size: usize,
) -> Option<Millis> {
    let majority = cluster_size / 2 + 1;
    if majority <= 1 {
        return Some(now);
    }
    let mut heard: Vec<Millis> = peers_heard.iter().flatten().copied().collect();
    heard.sort_unstable_by(|a, b| b.cmp(a));
    // Itself is the first member; the (majority - 1)-th most recent peer completes it.
    heard.get(majority - 2).copied()
}

/// What the guard asks its node to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardAction {
    /// Contact to a majority was lost (logged; nothing to stop).
    QuorumLost,
    /// Stop every VM on this node now.
    StopAllLocalVms,
    /// VMs still run past the bound: reset the node (the kernel watchdog's job).
    WatchdogReset,
    /// Contact to a majority is back.
    QuorumRegained,
}

/// One node's self-fencing state.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    lost: bool,
    stopped: bool,
    reset: bool,
}

impl Guard {
    /// A guard for a node that has just started (it has no VMs until the quorum tells it).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the node is fenced (no contact to a majority): it must not start VMs.
    pub fn fenced(&self) -> bool {
        self.lost
    }

    /// Called on every tick with the last majority contact and how many VMs run here.
    pub fn observe(
        &mut self,
        now: Millis,
        contact: Option<Millis>,
        running_local: usize,
    ) -> Vec<GuardAction> {
        let silent = contact.map_or(Millis::MAX, |c| now.saturating_sub(c));
        let mut out = Vec::new();
        if silent < SELF_FENCE_AFTER {
            if self.lost {
                out.push(GuardAction::QuorumRegained);
            }
            *self = Self::default();
            return out;
        }
        if !self.lost {
            self.lost = true;
            out.push(GuardAction::QuorumLost);
        }
        if running_local > 0 && !self.stopped {
            self.stopped = true;
            out.push(GuardAction::StopAllLocalVms);
        } else if running_local > 0 && silent >= WATCHDOG_AFTER && !self.reset {
            self.reset = true;
            out.push(GuardAction::WatchdogReset);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_contact_is_the_time_the_majority_was_last_complete() {
        // Three nodes: itself plus the most recent peer.
        assert_eq!(
            majority_contact(5_000, &[Some(4_800), Some(1_000)], 3),
            Some(4_800)
        );
        // Five nodes: itself plus the two most recent peers.
        assert_eq!(
            majority_contact(5_000, &[Some(4_800), Some(1_000), None, Some(3_000)], 5),
            Some(3_000)
        );
        assert_eq!(majority_contact(5_000, &[None, None], 3), None);
        assert_eq!(majority_contact(5_000, &[], 1), Some(5_000));
    }

    #[test]
    fn a_node_cut_off_stops_its_vms_then_asks_for_a_reset_if_they_keep_running() {
        let mut g = Guard::new();
        assert!(g.observe(1_000, Some(900), 2).is_empty());
        assert!(g.observe(2_899, Some(900), 2).is_empty());
        assert_eq!(
            g.observe(2_900, Some(900), 2),
            vec![GuardAction::QuorumLost, GuardAction::StopAllLocalVms]
        );
        assert!(g.fenced());
        // The stop did not take: the watchdog's turn, once.
        assert!(g.observe(3_300, Some(900), 1).is_empty());
        assert_eq!(
            g.observe(3_400, Some(900), 1),
            vec![GuardAction::WatchdogReset]
        );
        assert!(g.observe(3_500, Some(900), 1).is_empty());
        assert_eq!(
            g.observe(3_600, Some(3_600), 0),
            vec![GuardAction::QuorumRegained]
        );
        assert!(!g.fenced());
    }

    #[test]
    fn a_node_without_vms_only_notes_the_lost_quorum() {
        let mut g = Guard::new();
        assert_eq!(g.observe(10_000, None, 0), vec![GuardAction::QuorumLost]);
        assert!(g.observe(20_000, None, 0).is_empty());
    }
}
