//! Keeping a volume's copies in sync from what its primary's store reports, on the
//! primary's node: a replica the store reports `failed` leaves the in-sync set; an
//! out-of-sync copy whose node is up again is caught up; a caught-up copy rejoins the
//! in-sync set. Each of these raises the generation in the same compare-and-swap of the
//! volume record, before any store hears of it; the reconciler (`roles`) then tells the
//! stores, the primary first.
//!
//! The primary's node decides, not the leader: only it can ask its store (the admin
//! socket is local), and a compare-and-swap through Raft is the same authority whoever
//! proposes it. The removal uses the leader's rule (`failover::decide`): never fewer than
//! two copies in sync without the operator override.
//!
//! A rejoined copy is `joining` until its own node saw its store fenced by the primary in
//! the rejoin generation (the primary fences it only after the last catch-up pass) and
//! ended its catch-up: until then it may lack the last writes and failover never makes it
//! the primary.
//!
//! [`decide`] is pure; [`act`] writes its answer.

use std::collections::HashMap;

use serde_json::json;
use tessera_api::{CatchUpProgress, CopyState};
use tessera_state::{Command, Node, Require};
use tessera_store_admin::{ReplicaState, VolumeReplication};

use super::failover::{self, Decision};
use crate::records::table::VOLUMES;
use crate::records::{Volume, VolumeState};
use crate::tables::put;

/// What the primary's report asks of the cluster state.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Write `volume` (generation raised when the stores' configuration changes) with
    /// these events (kind, message).
    Change {
        /// The new record.
        volume: Volume,
        /// What happened, as events.
        events: Vec<(&'static str, String)>,
    },
    /// Replicas failed, but removing them would leave too few in sync.
    Stalled {
        /// The failed copies' nodes.
        failed: Vec<String>,
    },
}

/// What to change in `v` (whose primary is this node) given its store's `report`;
/// `node_of` maps a replica name in the report (its certificate name) to its node id,
/// `node_ok` says whether a node and its store can take a catch-up now.
pub fn decide(
    v: &Volume,
    report: &VolumeReplication,
    node_of: impl Fn(&str) -> Option<String>,
    node_ok: impl Fn(&str) -> bool,
) -> Option<Step> {
    // Only a report of the configuration the record gives: anything older or not yet
    // taken says nothing about the present.
    if !v.is_replicated()
        || v.state != VolumeState::Ready
        || report.role != "primary"
        || !report.configured
        || report.generation != v.generation
        || report.fenced_by.is_some()
    {
        return None;
    }
    let state_of = |node: &str| v.copies.iter().find(|c| c.node == node).map(|c| c.state);
    let mut failed = Vec::new();
    let mut caught_up = Vec::new();
    let mut progress: HashMap<String, CatchUpProgress> = HashMap::new();
    for r in &report.replicas {
        let Some(node) = node_of(&r.node) else {
            continue;
        };
        match (&r.state, state_of(&node)) {
            (ReplicaState::Failed { reason }, Some(CopyState::InSync)) => {
                failed.push((node, reason.clone()))
            }
            (ReplicaState::CaughtUp {}, Some(CopyState::CatchingUp)) => caught_up.push(node),
            (
                ReplicaState::CatchingUp {
                    done_bytes,
                    total_bytes,
                },
                Some(CopyState::CatchingUp),
            ) => {
                progress.insert(
                    node,
                    CatchUpProgress {
                        done: *done_bytes,
                        total: *total_bytes,
                    },
                );
            }
            _ => {}
        }
    }
    // 1. A failed replica blocks every write: out of the in-sync set first.
    if !failed.is_empty() {
        let names: Vec<String> = failed.iter().map(|(n, _)| n.clone()).collect();
        return match failover::decide(v, |n| names.iter().any(|f| f == n))? {
            Decision::Stalled { failed } => Some(Step::Stalled { failed }),
            Decision::Change { volume, .. } => {
                let why: Vec<String> = failed.iter().map(|(n, r)| format!("{n}: {r}")).collect();
                Some(Step::Change {
                    events: vec![(
                        "volume.replica_out_of_sync",
                        format!(
                            "the primary reported the copies on {} failed ({}); they left the \
                             in-sync set; generation {}",
                            names.join(", "),
                            why.join("; "),
                            volume.generation
                        ),
                    )],
                    volume,
                })
            }
        };
    }
    // 2. Caught up: back in the in-sync set (the primary runs the last pass before it
    //    takes this generation).
    if !caught_up.is_empty() {
        let mut new = v.clone();
        new.generation += 1;
        for c in &mut new.copies {
            if caught_up.contains(&c.node) {
                c.state = CopyState::InSync;
                c.catch_up = None;
                c.joining = true;
                c.rebuild = false;
            }
        }
        let mut events = vec![(
            "volume.replica_in_sync",
            format!(
                "the copies on {} were caught up and rejoin the in-sync set; generation {}",
                caught_up.join(", "),
                new.generation
            ),
        )];
        // Two copies in sync again: the operator's override has done its job, and the
        // rule of 2 holds again for the next failure.
        let in_sync = new
            .copies
            .iter()
            .filter(|c| c.state == CopyState::InSync)
            .count();
        if in_sync >= 2 {
            if let Some(o) = new.operator_override.take() {
                events.push((
                    "volume.override_cleared",
                    format!(
                        "{in_sync} copies in sync again: the override {} gave is cleared; \
                         generation {}",
                        o.by, new.generation
                    ),
                ));
            }
        }
        return Some(Step::Change {
            events,
            volume: new,
        });
    }
    // 3. Out of sync on a node that is back: the primary catches it up.
    let back: Vec<String> = v
        .copies
        .iter()
        .filter(|c| c.state == CopyState::OutOfSync && node_ok(&c.node))
        .map(|c| c.node.clone())
        .collect();
    if !back.is_empty() {
        let mut new = v.clone();
        new.generation += 1;
        for c in &mut new.copies {
            if back.contains(&c.node) {
                c.state = CopyState::CatchingUp;
                c.catch_up = None;
                c.joining = false;
            }
        }
        return Some(Step::Change {
            events: vec![(
                "volume.catch_up_started",
                format!(
                    "the copies on {} are back and being caught up by the primary on {}; \
                     generation {}",
                    back.join(", "),
                    v.node,
                    new.generation
                ),
            )],
            volume: new,
        });
    }
    // 4. Progress, shown by `GET /volumes/{name}` (no generation change: the stores'
    //    configuration stays).
    let mut new = v.clone();
    for c in &mut new.copies {
        if let Some(p) = progress.get(&c.node) {
            c.catch_up = Some(*p);
        }
    }
    (new != *v).then_some(Step::Change {
        volume: new,
        events: vec![],
    })
}

/// Writes `new` over `old` (compare-and-swap) with `events`, and a task for every copy
/// that starts catching up; true if it was written.
pub async fn write(node: &Node, old: &Volume, new: &Volume, events: &[(&str, String)]) -> bool {
    let names = super::naming::NodeNames::of(&super::node_records(node));
    let mut ops = vec![put(VOLUMES, &old.name, new)];
    ops.extend(
        events
            .iter()
            .map(|(kind, msg)| names.event(kind, &old.name, msg)),
    );
    ops.extend(super::copy_tasks::for_change(old, new));
    let txn = Command::Txn {
        require: vec![Require::equals(VOLUMES, &old.name, json!(old))],
        ops,
    };
    match node.write(txn).await {
        Ok(a) if a.conflict.is_none() => true,
        Ok(_) => {
            tracing::debug!(volume = %old.name, "volume changed meanwhile; next round");
            false
        }
        Err(e) => {
            tracing::debug!(volume = %old.name, error = %e, "change not committed yet");
            false
        }
    }
}

/// Applies [`decide`]'s answer; `stalled` remembers the (volume, generation) whose stall
/// was announced, so the event is written once.
pub async fn act(node: &Node, v: &Volume, step: Step, stalled: &mut Vec<(String, u64)>) {
    match step {
        Step::Change { volume, events } => {
            if write(node, v, &volume, &events).await && !events.is_empty() {
                tracing::warn!(volume = %v.name, generation = volume.generation, "{}", events[0].1);
            }
        }
        Step::Stalled { failed } => {
            let key = (v.name.clone(), v.generation);
            if stalled.contains(&key) {
                return;
            }
            let msg = format!(
                "the primary reported the copies on {} failed; removing them would leave fewer \
                 than {} copies in sync, so the volume's writes stay blocked until the copy is \
                 back or an administrator overrides (tessera volume override) (generation {})",
                failed.join(", "),
                v.min_in_sync(),
                v.generation
            );
            tracing::error!(volume = %v.name, "{msg}");
            let txn = Command::Txn {
                require: vec![],
                ops: vec![
                    super::naming::NodeNames::of(&super::node_records(node)).event(
                        "volume.replication_stalled",
                        &v.name,
                        &msg,
                    ),
                ],
            };
            if node.write(txn).await.is_ok() {
                stalled.push(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_volume::vol;
    use super::*;
    use tessera_store_admin::ReplicaStatus;

    fn report(generation: u64, replicas: &[(&str, ReplicaState)]) -> VolumeReplication {
        VolumeReplication {
            volume: "v".into(),
            generation,
            role: "primary".into(),
            configured: true,
            fenced_by: None,
            replicas: replicas
                .iter()
                .map(|(n, s)| ReplicaStatus {
                    node: format!("{n}.cert"),
                    addr: "127.0.0.1:7410".into(),
                    state: s.clone(),
                    missed_bytes: 0,
                    catch_up_sent_bytes: 0,
                    catch_up_wire_bytes: 0,
                })
                .collect(),
            last_applied: None,
            must_catch_up: false,
            repaired_blocks: 0,
            repairs: Vec::new(),
        }
    }

    fn node_of(cert: &str) -> Option<String> {
        cert.strip_suffix(".cert").map(str::to_string)
    }

    use CopyState::{CatchingUp, InSync, OutOfSync};

    fn failed() -> ReplicaState {
        ReplicaState::Failed {
            reason: "timed out".into(),
        }
    }

    #[test]
    fn a_replica_the_primary_reports_failed_leaves_the_in_sync_set() {
        let v = vol(&[("a", InSync), ("b", InSync), ("c", InSync)]);
        let r = report(4, &[("b", ReplicaState::InSync {}), ("c", failed())]);
        let Some(Step::Change { volume, events }) = decide(&v, &r, node_of, |_| false) else {
            panic!("no change");
        };
        assert_eq!(volume.generation, 5);
        assert_eq!(volume.copies[2].state, OutOfSync);
        assert_eq!(volume.node, "a");
        assert!(events[0].1.contains("timed out"), "{events:?}");
        // Nothing while the store reports another generation than the record's.
        assert_eq!(
            decide(&v, &report(3, &[("c", failed())]), node_of, |_| false),
            None
        );
        // Below two in sync: stalled, nothing written.
        let v = vol(&[("a", InSync), ("b", OutOfSync), ("c", InSync)]);
        assert_eq!(
            decide(&v, &report(4, &[("c", failed())]), node_of, |_| false),
            Some(Step::Stalled {
                failed: vec!["c".into()]
            })
        );
    }

    #[test]
    fn under_the_override_a_two_copy_volume_goes_on_alone_and_the_override_ends_at_rejoin() {
        let mut v = vol(&[("a", InSync), ("b", InSync)]);
        let r = report(4, &[("b", failed())]);
        assert_eq!(
            decide(&v, &r, node_of, |_| false),
            Some(Step::Stalled {
                failed: vec!["b".into()]
            })
        );
        v.operator_override = Some(Box::new(tessera_api::VolumeOverride {
            by: "admin".into(),
            at_ms: 1,
            reason: "node b is being repaired".into(),
        }));
        let Some(Step::Change { volume, .. }) = decide(&v, &r, node_of, |_| false) else {
            panic!("the override did not let the primary go on");
        };
        assert_eq!(volume.generation, 5);
        assert_eq!(volume.copies[1].state, OutOfSync);
        assert!(volume.operator_override.is_some(), "kept while alone");
        // b back and caught up: two in sync again, the override is cleared with the rejoin.
        let mut back = volume.clone();
        back.copies[1].state = CatchingUp;
        back.generation = 6;
        let r = report(6, &[("b", ReplicaState::CaughtUp {})]);
        let Some(Step::Change { volume: j, events }) = decide(&back, &r, node_of, |_| true) else {
            panic!("no rejoin");
        };
        assert_eq!(j.generation, 7);
        assert_eq!(j.copies[1].state, InSync);
        assert_eq!(j.operator_override, None);
        assert!(
            events.iter().any(|(k, _)| *k == "volume.override_cleared"),
            "{events:?}"
        );
    }

    #[test]
    fn an_out_of_sync_copy_whose_node_is_back_is_caught_up_then_rejoins() {
        let v = vol(&[("a", InSync), ("b", InSync), ("c", OutOfSync)]);
        let r = report(4, &[("b", ReplicaState::InSync {})]);
        assert_eq!(decide(&v, &r, node_of, |_| false), None, "c's node is down");
        let Some(Step::Change { volume, .. }) = decide(&v, &r, node_of, |n| n == "c") else {
            panic!("no catch-up");
        };
        assert_eq!(volume.generation, 5);
        assert_eq!(volume.copies[2].state, CatchingUp);
        // Progress is shown without a generation change.
        let r = report(
            5,
            &[
                ("b", ReplicaState::InSync {}),
                (
                    "c",
                    ReplicaState::CatchingUp {
                        done_bytes: 4096,
                        total_bytes: 8192,
                    },
                ),
            ],
        );
        let Some(Step::Change { volume: p, events }) = decide(&volume, &r, node_of, |_| true)
        else {
            panic!("no progress");
        };
        assert!(events.is_empty());
        assert_eq!(p.generation, 5);
        assert_eq!(
            p.copies[2].catch_up,
            Some(CatchUpProgress {
                done: 4096,
                total: 8192
            })
        );
        assert_eq!(decide(&p, &r, node_of, |_| true), None, "unchanged");
        // Caught up: in sync again in a newer generation, joining until confirmed.
        let r = report(
            5,
            &[
                ("b", ReplicaState::InSync {}),
                ("c", ReplicaState::CaughtUp {}),
            ],
        );
        let Some(Step::Change { volume: j, .. }) = decide(&p, &r, node_of, |_| true) else {
            panic!("no rejoin");
        };
        assert_eq!(j.generation, 6);
        assert_eq!(j.copies[2].state, InSync);
        assert!(j.copies[2].joining);
        assert_eq!(j.copies[2].catch_up, None);
    }

    #[test]
    fn only_a_configured_unfenced_primary_is_listened_to() {
        let v = vol(&[("a", InSync), ("b", InSync), ("c", InSync)]);
        let mut r = report(4, &[("c", failed())]);
        r.configured = false;
        assert_eq!(decide(&v, &r, node_of, |_| true), None);
        let mut r = report(4, &[("c", failed())]);
        r.fenced_by = Some(5);
        assert_eq!(decide(&v, &r, node_of, |_| true), None);
        let mut r = report(4, &[("c", failed())]);
        r.role = "replica".into();
        assert_eq!(decide(&v, &r, node_of, |_| true), None);
    }
}
