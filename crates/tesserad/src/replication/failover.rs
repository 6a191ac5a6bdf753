//! What the leader changes when a node holding an in-sync copy fails: the copy leaves the
//! in-sync set, and if it was the primary's, an in-sync replica becomes the primary; each
//! change raises the generation (the stores' fence) in the same compare-and-swap of the
//! volume record, before any store hears of it. Never fewer than 2 copies stay in sync:
//! a change that would leave fewer is not made (the volume's I/O stays blocked, an event
//! says why) unless the record carries the operator's override
//! (`POST /volumes/{name}/override`), which allows 1.
//!
//! [`decide`] is pure; [`start`] is the leader's loop around it.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::json;
use tessera_state::{Command, Node, Require};

use super::naming::NodeNames;
use super::{liveness, node_records, store_trouble, volumes, Liveness, ROUND};
use crate::records::table::VOLUMES;
use crate::records::{Volume, VolumeState};
use crate::tables::put;
use tessera_api::CopyState;

/// What to do about one volume.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Write this record (generation raised): `failed` left the in-sync set, and
    /// `new_primary` took over if the primary's copy was among them.
    Change {
        /// The new record.
        volume: Volume,
        /// The nodes whose copies left the in-sync set.
        failed: Vec<String>,
        /// The new primary, if it changed.
        new_primary: Option<String>,
    },
    /// Copies failed, but removing them would leave fewer than the volume's minimum
    /// ([`Volume::min_in_sync`]: 2, 1 under the operator override) in sync.
    Stalled {
        /// The nodes whose copies failed.
        failed: Vec<String>,
    },
}

/// The change a replicated, ready volume needs when the copies on nodes for which
/// `failed` says so cannot answer; `None` if every in-sync copy's node is fine.
pub fn decide(v: &Volume, failed: impl Fn(&str) -> bool) -> Option<Decision> {
    if !v.is_replicated() || v.state != VolumeState::Ready {
        return None;
    }
    let in_sync: Vec<&str> = v
        .copies
        .iter()
        .filter(|c| c.state == CopyState::InSync)
        .map(|c| c.node.as_str())
        .collect();
    let bad: Vec<String> = in_sync
        .iter()
        .filter(|n| failed(n))
        .map(|n| n.to_string())
        .collect();
    if bad.is_empty() {
        return None;
    }
    let primary_fails = bad.contains(&v.node);
    // A copy still joining may lack the last writes if the primary goes before it took
    // the rejoin configuration: with a new primary it is out of sync again, and it is
    // never the new primary.
    let joining = |n: &str| v.copies.iter().any(|c| c.node == n && c.joining);
    let left: Vec<&str> = in_sync
        .iter()
        .copied()
        .filter(|n| !(bad.iter().any(|b| b == n) || primary_fails && joining(n)))
        .collect();
    if left.len() < v.min_in_sync() {
        return Some(Decision::Stalled { failed: bad });
    }
    let mut new = v.clone();
    for c in &mut new.copies {
        if bad.contains(&c.node) || (primary_fails && c.joining) {
            c.state = CopyState::OutOfSync;
            c.catch_up = None;
            c.joining = false;
        } else if primary_fails && c.state == CopyState::CatchingUp {
            // The old primary was catching it up; the new one starts again.
            c.state = CopyState::OutOfSync;
            c.catch_up = None;
        }
    }
    let new_primary = if primary_fails {
        // The first in-sync copy after the primary's, in the record's order.
        let p = left[0].to_string();
        new.node = p.clone();
        if let Some(i) = new.copies.iter().position(|c| c.node == p) {
            let c = new.copies.remove(i);
            new.copies.insert(0, c);
        }
        Some(p)
    } else {
        None
    };
    new.generation = v.generation + 1;
    Some(Decision::Change {
        volume: new,
        failed: bad,
        new_primary,
    })
}

/// On the leader, every round and on every change of the state: applies [`decide`] to
/// every volume. A node counts as failed when the management network has not heard it
/// for [`crate::health::DOWN_AFTER`], or its record says its store is unreachable or
/// degraded.
pub fn start(node: Arc<Node>, me: String) {
    tokio::spawn(async move {
        let mut rx = node.state.subscribe();
        // Stalls already announced (volume, generation), so the event is written once.
        let mut announced: HashSet<(String, u64)> = HashSet::new();
        let mut rebuilds = super::rebuild::State::default();
        loop {
            let leader = node.raft.metrics().borrow().current_leader == Some(node.id);
            if leader {
                round(&node, &me, &mut announced).await;
                super::rebuild::round(&node, &me, &mut rebuilds).await;
                super::copy_tasks::follow(&node).await;
            }
            if tokio::time::timeout(ROUND, rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
    });
}

async fn round(node: &Node, me: &str, announced: &mut HashSet<(String, u64)>) {
    let records = node_records(node);
    let names = NodeNames::of(&records);
    // A node removed from the cluster (no record) is gone for good.
    let failed = |id: &str| {
        liveness(me, id) == Liveness::Down
            || records.get(id).is_none_or(|r| store_trouble(r).is_some())
    };
    for v in volumes(node) {
        match decide(&v, failed) {
            None => {}
            Some(Decision::Stalled { failed })
                if announced.insert((v.name.clone(), v.generation)) =>
            {
                let msg = format!(
                        "copies on {} failed; removing them would leave fewer than {} \
                         copies in sync, so the volume's writes stay blocked until a node comes back \
                         or an administrator overrides (tessera volume override) (generation {})",
                        failed.join(", "),
                        v.min_in_sync(),
                        v.generation
                    );
                tracing::error!(volume = %v.name, "{msg}");
                let txn = Command::Txn {
                    require: vec![],
                    ops: vec![names.event("volume.replication_stalled", &v.name, &msg)],
                };
                if node.write(txn).await.is_err() {
                    announced.remove(&(v.name.clone(), v.generation));
                }
            }
            Some(Decision::Stalled { .. }) => {}
            Some(Decision::Change {
                mut volume,
                failed,
                new_primary,
            }) => {
                let mut ops = Vec::new();
                if let Some(p) = &new_primary {
                    volume.nbd = super::nbd_uri(&records, p, &volume.name);
                    ops.push(names.event(
                        "volume.primary_moved",
                        &v.name,
                        &format!(
                            "primary moved from {} to {p} (its node failed); generation {}",
                            v.node, volume.generation
                        ),
                    ));
                }
                ops.push(names.event(
                    "volume.replica_out_of_sync",
                    &v.name,
                    &format!(
                        "the copies on {} left the in-sync set (node down or store unreachable); \
                         generation {}",
                        failed.join(", "),
                        volume.generation
                    ),
                ));
                ops.insert(0, put(VOLUMES, &v.name, &volume));
                let txn = Command::Txn {
                    require: vec![Require::equals(VOLUMES, &v.name, json!(v))],
                    ops,
                };
                match node.write(txn).await {
                    Ok(a) if a.conflict.is_none() => tracing::warn!(
                        volume = %v.name, failed = ?failed, new_primary = ?new_primary,
                        generation = volume.generation, "replicated volume reconfigured"
                    ),
                    Ok(_) => {
                        tracing::debug!(volume = %v.name, "volume changed meanwhile; next round")
                    }
                    Err(e) => tracing::debug!(error = %e, "reconfiguration not committed yet"),
                }
            }
        }
    }
    announced.retain(|(name, _)| {
        node.state
            .read(|t| t.get(VOLUMES).is_some_and(|v| v.contains_key(name)))
    });
}

#[cfg(test)]
mod tests {
    use super::super::test_volume::vol;
    use super::*;

    use CopyState::{CatchingUp, InSync, OutOfSync};

    #[test]
    fn a_failed_replica_leaves_the_in_sync_set_with_a_new_generation() {
        let v = vol(&[("a", InSync), ("b", InSync), ("c", InSync)]);
        assert_eq!(decide(&v, |_| false), None);
        let Some(Decision::Change {
            volume,
            failed,
            new_primary,
        }) = decide(&v, |n| n == "c")
        else {
            panic!("no change");
        };
        assert_eq!(failed, ["c"]);
        assert_eq!(new_primary, None);
        assert_eq!(volume.generation, 5);
        assert_eq!(volume.node, "a");
        assert_eq!(volume.copies[2].state, OutOfSync);
        // Already out of sync: nothing more to do for it.
        assert_eq!(decide(&volume, |n| n == "c"), None);
    }

    #[test]
    fn a_failed_primary_hands_over_to_an_in_sync_replica() {
        let v = vol(&[("a", InSync), ("b", OutOfSync), ("c", InSync)]);
        // b is out of sync: without a, only c would be in sync, below the minimum.
        assert_eq!(
            decide(&v, |n| n == "a"),
            Some(Decision::Stalled {
                failed: vec!["a".into()]
            })
        );
        let v = vol(&[("a", InSync), ("b", InSync), ("c", InSync)]);
        let Some(Decision::Change {
            volume,
            new_primary,
            ..
        }) = decide(&v, |n| n == "a")
        else {
            panic!("no change");
        };
        assert_eq!(new_primary.as_deref(), Some("b"));
        assert_eq!(volume.node, "b");
        assert_eq!(volume.copies[0].node, "b");
        assert_eq!(volume.generation, 5);
        let a = volume.copies.iter().find(|c| c.node == "a").unwrap();
        assert_eq!(a.state, OutOfSync);
    }

    #[test]
    fn a_joining_copy_is_never_made_the_primary() {
        let mut v = vol(&[("a", InSync), ("b", InSync), ("c", InSync)]);
        v.copies[1].joining = true;
        // Without a, b (joining) may lack the last writes: only c is surely in sync.
        assert_eq!(
            decide(&v, |n| n == "a"),
            Some(Decision::Stalled {
                failed: vec!["a".into()]
            })
        );
        // The primary stays: the joining copy is counted, its rejoin goes on.
        let Some(Decision::Change { volume, .. }) = decide(&v, |n| n == "c") else {
            panic!("no change");
        };
        assert_eq!(volume.copies[1].state, InSync);
        assert!(volume.copies[1].joining);
        // A copy being caught up by a failed primary is out of sync with the new one.
        let v = vol(&[
            ("a", InSync),
            ("b", InSync),
            ("c", InSync),
            ("d", CatchingUp),
        ]);
        let Some(Decision::Change { volume, .. }) = decide(&v, |n| n == "a") else {
            panic!("no change");
        };
        assert_eq!(volume.node, "b");
        let d = volume.copies.iter().find(|c| c.node == "d").unwrap();
        assert_eq!(d.state, OutOfSync);
    }

    #[test]
    fn never_below_two_in_sync_and_never_for_one_copy_or_unready_volumes() {
        let v = vol(&[("a", InSync), ("b", InSync)]);
        assert!(matches!(
            decide(&v, |n| n == "b"),
            Some(Decision::Stalled { .. })
        ));
        let v = vol(&[("a", InSync), ("b", InSync), ("c", InSync)]);
        assert!(matches!(
            decide(&v, |n| n != "a"),
            Some(Decision::Stalled { .. })
        ));
        // Under the operator override, one copy may go on alone, even a replica whose
        // primary failed.
        let mut v = vol(&[("a", InSync), ("b", InSync)]);
        v.operator_override = Some(Box::new(tessera_api::VolumeOverride {
            by: "admin".into(),
            at_ms: 1,
            reason: "test".into(),
        }));
        let Some(Decision::Change {
            volume,
            new_primary,
            ..
        }) = decide(&v, |n| n == "a")
        else {
            panic!("no change under the override");
        };
        assert_eq!(new_primary.as_deref(), Some("b"));
        assert_eq!(volume.generation, 5);
        assert!(matches!(
            decide(&v, |_| true),
            Some(Decision::Stalled { .. })
        ));
        let mut single = vol(&[("a", InSync)]);
        single.copies.clear();
        assert_eq!(decide(&single, |_| true), None);
        let mut creating = vol(&[("a", InSync), ("b", InSync), ("c", InSync)]);
        creating.state = VolumeState::Creating;
        assert_eq!(decide(&creating, |_| true), None);
    }
}
