//! Rebuilding a lost copy on another node (issue #8). A copy out of the in-sync set
//! (`out_of_sync`, or `catching_up` from a node that went away again) whose node has
//! been away longer than the cluster's `replica_replace_after_s` (down, or its store
//! unreachable or degraded), or whose node was removed from the cluster (at once), is
//! replaced, in one compare-and-swap of the volume's record: the copy leaves the volume
//! (a pending deletion is recorded for it, done if its node ever comes back: `orphans`),
//! a new copy takes its place on the node with the most free space among those up with a
//! healthy store and holding no copy of the volume, `catching_up` and marked `rebuild`,
//! and the generation is raised. A task follows the rebuild (`copy_tasks`).
//!
//! From there it is a catch-up: the new copy's node creates it empty and makes it a
//! catching-up replica (`roles`); the primary, told first, takes the new replica in while
//! its clients' I/O goes on, compares the whole volume (`rebuilding`) and sends what
//! differs; caught up, the copy rejoins the in-sync set as any other (`resync`).
//!
//! [`decide`] is pure; [`round`] is the leader's loop step around it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::{CopyState, VolumeCopy, DEFAULT_REPLICA_REPLACE_AFTER_S};
use tessera_state::{Command, Node, Require};

use super::naming::NodeNames;
use super::placement::{place, Candidate};
use super::{node_records, store_trouble, volumes};
use crate::records::table::{COPY_DELETIONS, SETTINGS, VOLUMES};
use crate::records::{Volume, VolumeState};
use crate::tables::{del, put};

/// How long a node has been away, as the leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Away {
    /// Removed from the cluster: for good.
    Removed,
    /// Down, or its store unreachable or degraded, this long.
    For(Duration),
}

/// What to do about one volume.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Write this record: `replaced`'s copy left, a new one on `on` is being built.
    Rebuild {
        /// The new record (generation raised).
        volume: Volume,
        /// The node whose copy left.
        replaced: String,
        /// The node of the new copy.
        on: String,
        /// Why, in words.
        why: String,
    },
    /// A copy is to be replaced but no node can take it now.
    NoRoom {
        /// The node whose copy is to be replaced.
        replaced: String,
        /// Why no node can.
        why: String,
    },
}

/// The rebuild `v` needs: its first copy out of the in-sync set whose node is away for
/// at least `after` (or removed), replaced on the best of `candidates` not holding a copy
/// of it. The primary's copy is never replaced here (failover moves the primary first).
pub fn decide(
    v: &Volume,
    after: Duration,
    away: impl Fn(&str) -> Option<Away>,
    candidates: &[Candidate],
) -> Option<Decision> {
    if !v.is_replicated() || v.state != VolumeState::Ready {
        return None;
    }
    let (lost, how) = v.copies.iter().find_map(|c| {
        if c.node == v.node || c.state == CopyState::InSync {
            return None;
        }
        match away(&c.node)? {
            Away::Removed => Some((c, Away::Removed)),
            Away::For(d) if d >= after => Some((c, Away::For(d))),
            Away::For(_) => None,
        }
    })?;
    let free: Vec<Candidate> = candidates
        .iter()
        .filter(|c| !v.copies.iter().any(|x| x.node == c.id))
        .cloned()
        .collect();
    let on = match place(&free, 1, None) {
        Ok(mut nodes) if !nodes.is_empty() => nodes.remove(0),
        Ok(_) => return None,
        Err(e) => {
            return Some(Decision::NoRoom {
                replaced: lost.node.clone(),
                why: e.to_string(),
            })
        }
    };
    let why = match how {
        Away::Removed => format!("its node {} was removed from the cluster", lost.node),
        Away::For(d) => format!(
            "its node {} has been away for {} s (replica_replace_after_s is {})",
            lost.node,
            d.as_secs(),
            after.as_secs()
        ),
    };
    let mut new = v.clone();
    new.generation += 1;
    for c in &mut new.copies {
        if c.node == lost.node {
            *c = VolumeCopy {
                node: on.clone(),
                state: CopyState::CatchingUp,
                catch_up: None,
                joining: false,
                rebuild: true,
            };
        }
    }
    Some(Decision::Rebuild {
        volume: new,
        replaced: lost.node.clone(),
        on,
        why,
    })
}

/// What the leader's rebuild step keeps between rounds.
#[derive(Default)]
pub struct State {
    /// Since when each node's store has been seen in trouble (while its node is up).
    trouble_since: HashMap<String, Instant>,
    /// (volume, generation) whose lack of room was announced.
    announced: Vec<(String, u64)>,
}

/// The cluster's `replica_replace_after_s`, its default if unset or unreadable.
pub fn replace_after(n: &Node) -> Duration {
    let s = crate::tables::get::<serde_json::Value>(n, SETTINGS, "cluster");
    Duration::from_secs(
        s.and_then(|s| s["replica_replace_after_s"].as_u64())
            .unwrap_or(DEFAULT_REPLICA_REPLACE_AFTER_S),
    )
}

/// On the leader, every round: rebuilds what [`decide`] says, and forgets the pending
/// deletions of nodes removed from the cluster (a removed node is wiped before it joins
/// again: nothing is left to delete).
pub async fn round(node: &Node, me: &str, st: &mut State) {
    let records = node_records(node);
    let names = NodeNames::of(&records);
    let now = Instant::now();
    st.trouble_since
        .retain(|id, _| records.get(id).is_some_and(|r| store_trouble(r).is_some()));
    for (id, r) in &records {
        if store_trouble(r).is_some() {
            st.trouble_since.entry(id.clone()).or_insert(now);
        }
    }
    let away = |id: &str| -> Option<Away> {
        if !records.contains_key(id) {
            return Some(Away::Removed);
        }
        let down = super::away_for(me, id);
        let troubled = st.trouble_since.get(id).map(|t| now.duration_since(*t));
        down.into_iter().chain(troubled).max().map(Away::For)
    };
    let after = replace_after(node);
    let candidates = super::candidates(node, me);
    let pending = super::orphans::all(node);
    let volumes = volumes(node);
    for v in &volumes {
        // A node still to delete an old copy of this name is no place for a new one.
        let usable: Vec<Candidate> = candidates
            .iter()
            .map(|c| {
                let mut c = c.clone();
                if c.unusable.is_none()
                    && pending.iter().any(|p| p.volume == v.name && p.node == c.id)
                {
                    c.unusable =
                        Some("an old copy of this volume is still to be deleted there".into());
                }
                c
            })
            .collect();
        match decide(v, after, away, &usable) {
            None => {}
            Some(Decision::NoRoom { replaced, why }) => {
                let k = (v.name.clone(), v.generation);
                if st.announced.contains(&k) {
                    continue;
                }
                let msg = format!(
                    "the copy on {replaced} is to be rebuilt on another node, but none can take \
                     it now: {why}"
                );
                tracing::warn!(volume = %v.name, "{msg}");
                let txn = Command::Txn {
                    require: vec![],
                    ops: vec![names.event("volume.rebuild_waiting", &v.name, &msg)],
                };
                if node.write(txn).await.is_ok() {
                    st.announced.push(k);
                }
            }
            Some(Decision::Rebuild {
                volume,
                replaced,
                on,
                why,
            }) => {
                let mut ops = vec![
                    put(VOLUMES, &v.name, &volume),
                    super::orphans::pending(&v.name, &replaced, "replaced by a rebuild elsewhere"),
                    names.event(
                        "volume.rebuild_started",
                        &v.name,
                        &format!(
                            "the copy on {replaced} is rebuilt on {on} ({why}); the primary on {} \
                             sends it a full copy while I/O goes on; generation {}",
                            v.node, volume.generation
                        ),
                    ),
                ];
                ops.extend(super::copy_tasks::for_change(v, &volume));
                let txn = Command::Txn {
                    require: vec![Require::equals(VOLUMES, &v.name, json!(v))],
                    ops,
                };
                match node.write(txn).await {
                    Ok(a) if a.conflict.is_none() => tracing::warn!(
                        volume = %v.name, %replaced, %on, generation = volume.generation,
                        "rebuilding a copy elsewhere: {why}"
                    ),
                    Ok(_) => {
                        tracing::debug!(volume = %v.name, "volume changed meanwhile; next round")
                    }
                    Err(e) => tracing::debug!(error = %e, "rebuild not committed yet"),
                }
            }
        }
    }
    st.announced
        .retain(|(n, g)| volumes.iter().any(|v| v.name == *n && v.generation == *g));
    for p in pending.iter().filter(|p| !records.contains_key(&p.node)) {
        let txn = Command::Txn {
            require: vec![Require::exists(
                COPY_DELETIONS,
                &super::orphans::key(&p.volume, &p.node),
            )],
            ops: vec![del(
                COPY_DELETIONS,
                &super::orphans::key(&p.volume, &p.node),
            )],
        };
        let _ = node.write(txn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_volume::vol;
    use super::*;
    use CopyState::{CatchingUp, InSync, OutOfSync};

    fn cand(id: &str, available: u64, unusable: Option<&str>) -> Candidate {
        Candidate {
            id: id.into(),
            available,
            unusable: unusable.map(String::from),
        }
    }

    const AFTER: Duration = Duration::from_secs(600);

    #[test]
    fn a_copy_away_longer_than_the_setting_is_rebuilt_on_the_freest_spare_node() {
        let v = vol(&[("a", InSync), ("b", InSync), ("c", OutOfSync)]);
        let nodes = [
            cand("a", 90, None),
            cand("b", 90, None),
            cand("d", 10, None),
            cand("e", 20, None),
            cand("f", 99, Some("down")),
        ];
        let away = |secs| move |n: &str| (n == "c").then_some(Away::For(Duration::from_secs(secs)));
        assert_eq!(
            decide(&v, AFTER, away(599), &nodes),
            None,
            "not long enough"
        );
        let Some(Decision::Rebuild {
            volume,
            replaced,
            on,
            ..
        }) = decide(&v, AFTER, away(600), &nodes)
        else {
            panic!("no rebuild");
        };
        assert_eq!((replaced.as_str(), on.as_str()), ("c", "e"));
        assert_eq!(volume.generation, 5);
        assert_eq!(volume.node, "a");
        assert_eq!(volume.copies[2].node, "e");
        assert_eq!(volume.copies[2].state, CatchingUp);
        assert!(volume.copies[2].rebuild);
        assert!(volume.copies.iter().all(|c| c.node != "c"));
    }

    #[test]
    fn a_removed_node_counts_at_once_and_in_sync_or_primary_copies_are_left_to_failover() {
        let v = vol(&[("a", InSync), ("b", InSync), ("c", CatchingUp)]);
        let nodes = [cand("d", 1, None)];
        let removed = |n: &str| (n == "c").then_some(Away::Removed);
        assert!(matches!(
            decide(&v, AFTER, removed, &nodes),
            Some(Decision::Rebuild { ref on, .. }) if on == "d"
        ));
        // In sync (failover takes it out first) or the primary's: not here.
        let v = vol(&[("a", OutOfSync), ("b", InSync), ("c", InSync)]);
        let all_removed = |_: &str| Some(Away::Removed);
        assert_eq!(decide(&v, AFTER, all_removed, &nodes), None);
        // Nowhere to go: said so.
        let v = vol(&[("a", InSync), ("b", InSync), ("c", OutOfSync)]);
        assert!(matches!(
            decide(&v, AFTER, removed, &[cand("d", 1, Some("down"))]),
            Some(Decision::NoRoom { ref replaced, .. }) if replaced == "c"
        ));
        // A node already holding a copy is no candidate.
        assert!(matches!(
            decide(&v, AFTER, removed, &[cand("b", 100, None)]),
            Some(Decision::NoRoom { .. })
        ));
    }
}
