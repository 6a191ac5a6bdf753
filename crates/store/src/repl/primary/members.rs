//! Which replicas a running primary has: a newer configuration may add a replica (a new
//! copy the cluster is building on another node, or an out-of-sync copy it never knew)
//! and drop one (a copy the cluster replaced), without stopping the primary, so the
//! clients' requests in flight complete instead of failing with the old primary.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tessera_replication::primary::{Config, ReplicaId};
use tessera_replication::wire::Generation;
use tessera_store_admin::ReplicaState;
use tokio::sync::Notify;

use super::driver::Driver;
use super::link::link;
use super::missed::append_synced;
use super::{Peer, PrimaryHandle};

/// Replicas added to or dropped from a running primary with a configuration.
#[derive(Default)]
pub(super) struct Members {
    /// New replicas: id, peer, and what makes its link open a new stream.
    pub added: Vec<(ReplicaId, Peer, Arc<Notify>)>,
    /// Replicas that are no longer copies of the volume.
    pub dropped: Vec<ReplicaId>,
    /// Replicas whose copy is new, or whose misses this primary never recorded: their
    /// record becomes the whole volume.
    pub whole: Vec<ReplicaId>,
}

/// A newer configuration for a running primary (see [`PrimaryHandle::change`]).
pub struct Change<'a> {
    /// Its generation.
    pub generation: u64,
    /// The in-sync replicas (all known to the primary).
    pub in_sync: &'a [Peer],
    /// The out-of-sync replicas to catch up now.
    pub catching_up: &'a [Peer],
    /// Of those, the nodes whose copy is new.
    pub rebuilding: &'a [String],
    /// The other out-of-sync replicas; `None`: every known replica not listed.
    pub out_of_sync: Option<&'a [Peer]>,
    /// Fewer than 2 copies in sync allowed.
    pub operator_override: bool,
}

impl PrimaryHandle {
    /// Takes a newer configuration; `None` if an in-sync replica of it is not one of
    /// this primary's (the caller then starts a new primary). Replicas to catch up or
    /// out of sync that it does not know are added (with a link each; their record is
    /// the durable one if any, else the whole volume), and with `out_of_sync` given,
    /// the replicas in none of the lists are dropped. Blocking; must run inside the
    /// tokio runtime (links are spawned).
    pub fn change(&self, c: Change<'_>) -> Option<Result<(), String>> {
        let in_sync: BTreeSet<ReplicaId> = c
            .in_sync
            .iter()
            .map(|p| self.replica_of(&p.node))
            .collect::<Option<_>>()?;
        let mut members = Members::default();
        let id_of = |p: &Peer, members: &mut Members| match self.replica_of(&p.node) {
            Some(r) => r,
            None => {
                let r = ReplicaId(self.next_replica.fetch_add(1, Ordering::AcqRel));
                let restart = Arc::new(Notify::new());
                let task = tokio::spawn(link(
                    self.ep.clone(),
                    r,
                    p.clone(),
                    self.tx.clone(),
                    restart.clone(),
                    self.serving.clone(),
                ));
                self.links.lock().insert(r, task);
                self.peers.write().push((r, p.clone()));
                members.added.push((r, p.clone(), restart));
                r
            }
        };
        let catching: BTreeSet<ReplicaId> = c
            .catching_up
            .iter()
            .map(|p| id_of(p, &mut members))
            .collect();
        let lagging: Option<BTreeSet<ReplicaId>> = c
            .out_of_sync
            .map(|l| l.iter().map(|p| id_of(p, &mut members)).collect());
        let known = self.replica_ids();
        if let Some(lagging) = &lagging {
            members.dropped = known
                .iter()
                .filter(|r| !(in_sync.contains(r) || catching.contains(r) || lagging.contains(r)))
                .copied()
                .collect();
        }
        let states = self.shared.states.lock().clone();
        for (r, p, _) in &members.added {
            // A copy new to this primary and not being rebuilt keeps its durable record
            // if there is one (the driver loads it); a new copy starts from nothing.
            if c.rebuilding.contains(&p.node) {
                members.whole.push(*r);
            }
        }
        for p in c.catching_up {
            let r = self.replica_of(&p.node);
            let catching_now = r.and_then(|r| states.get(&r)).is_some_and(|s| {
                matches!(
                    s,
                    ReplicaState::CatchingUp { .. } | ReplicaState::CaughtUp {}
                )
            });
            if let Some(r) = r.filter(|r| !members.whole.contains(r)) {
                if c.rebuilding.contains(&p.node) && !catching_now {
                    members.whole.push(r);
                }
            }
        }
        let remaining: BTreeSet<ReplicaId> = known
            .difference(&members.dropped.iter().copied().collect())
            .copied()
            .collect();
        let config = Config {
            generation: Generation(c.generation),
            replica_count: (remaining.len() + 1).min(3) as u8,
            out_of_sync: remaining.difference(&in_sync).copied().collect(),
            in_sync,
            operator_override: c.operator_override,
        };
        let added: Vec<ReplicaId> = members.added.iter().map(|(r, _, _)| *r).collect();
        let dropped = members.dropped.clone();
        let outcome = self.reconfigure(config, catching, members);
        // The machine took it or not: the links of whoever is not a replica now go.
        let gone: Vec<ReplicaId> = if outcome.is_ok() { dropped } else { added };
        for r in &gone {
            if let Some(t) = self.links.lock().remove(r) {
                t.abort();
            }
        }
        self.peers.write().retain(|(r, _)| !gone.contains(r));
        Some(outcome)
    }
}

impl Driver {
    /// Takes `m`'s replicas in or out (after the machine took the configuration).
    pub(super) async fn apply_members(&mut self, m: Members) {
        for (r, peer, restart) in m.added {
            self.nodes.insert(r, peer.node.clone());
            self.peers.insert(r, peer);
            self.restarts.insert(r, restart);
            self.shared
                .states
                .lock()
                .insert(r, ReplicaState::OutOfSync {});
            if !m.whole.contains(&r) {
                let file = self.missed_file(r);
                let size = self.export.size();
                let loaded = tokio::task::spawn_blocking(move || super::missed::load_missed(&file))
                    .await
                    .ok()
                    .flatten();
                match loaded {
                    Some(set) => self.shared.missed.lock().entry(r).or_default().recorded = set,
                    // Nothing recorded: what it lacks is unknown, so everything.
                    None => self.record_whole(r, size).await,
                }
            }
        }
        let size = self.export.size();
        for r in m.whole {
            self.record_whole(r, size).await;
        }
        for r in m.dropped {
            if let Some((task, _)) = self.catchups.remove(&r) {
                task.abort();
            }
            self.links.remove(&r);
            self.restarts.remove(&r);
            self.peers.remove(&r);
            self.shared.states.lock().remove(&r);
            self.shared.counters.lock().remove(&r);
            self.shared.missed.lock().remove(&r);
            let file = self.missed_file(r);
            self.nodes.remove(&r);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(file)).await;
        }
    }

    /// Records the whole volume as missed by `r`, durably (a line covering it appended
    /// to its record), so a restart of this primary compares everything too.
    async fn record_whole(&mut self, r: ReplicaId, size: u64) {
        let (dir, file) = (self.missed_dir.clone(), self.missed_file(r));
        let line = format!("0 {size}\n");
        let written = tokio::task::spawn_blocking(move || append_synced(&dir, &file, &line)).await;
        if !matches!(written, Ok(Ok(()))) {
            // In memory it is whole either way. A restarted primary told the copy is new
            // (`rebuilding`) compares everything again; one that is not would take the
            // older record alone, so say so.
            tracing::error!(volume = %self.volume, replica = r.0,
                "could not record durably that a replica lacks the whole volume");
        }
        self.shared.missed.lock().entry(r).or_default().recorded = super::missed::whole(size);
    }
}
