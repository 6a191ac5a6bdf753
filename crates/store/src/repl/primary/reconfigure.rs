//! The driver's configuration changes: a newer generation or in-sync set, the last
//! catch-up pass of a replica rejoining, and which replicas are caught up.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tessera_replication::primary::{Config, PrimaryAction, ReplicaId};
use tessera_store_admin::ReplicaState;
use tokio::sync::mpsc;

use super::super::catchup::{CatchUp, Final, Missed};
use super::driver::Driver;
use super::missed::{append_synced, missed_path};
use super::FINAL_WAIT;

impl Driver {
    pub(super) fn missed_file(&self, replica: ReplicaId) -> PathBuf {
        let node = self.nodes.get(&replica).map_or("unknown", String::as_str);
        missed_path(&self.missed_dir, &self.volume, node)
    }

    pub(super) fn fenced_generation(&self) -> Option<u64> {
        self.machine.fenced_by().map(|g| g.0)
    }

    /// Takes the next configuration. Replicas joining the in-sync set get their last
    /// catch-up pass first; no request is taken meanwhile, so nothing they lack remains.
    /// Returns the machine's actions and, when the configuration was taken, the replicas
    /// to catch up: the caller starts their catch-ups once the actions are performed (the
    /// regions a replica leaving the in-sync set may lack are among them).
    pub(super) async fn reconfigure(
        &mut self,
        config: Config,
        catching_up: BTreeSet<ReplicaId>,
        members: super::members::Members,
        done: std::sync::mpsc::Sender<Result<(), String>>,
    ) -> (Vec<PrimaryAction>, Option<BTreeSet<ReplicaId>>) {
        let joining: Vec<ReplicaId> = config
            .in_sync
            .difference(&self.machine.config().in_sync)
            .copied()
            .collect();
        for r in &joining {
            if let Err(e) = self.last_pass(*r).await {
                let _ = done.send(Err(e));
                return (Vec::new(), None);
            }
        }
        let (in_sync, out_of_sync) = (config.in_sync.clone(), config.out_of_sync.clone());
        let generation = config.generation.0;
        let now = self.start.elapsed();
        match self.machine.reconfigure(now, config) {
            Ok(actions) => {
                // The local copy is fenced like a replica: it takes this primary's writes
                // only while no newer generation than the primary's own was accepted.
                self.export.bind_generation(generation);
                self.apply_members(members).await;
                {
                    let mut states = self.shared.states.lock();
                    for r in &in_sync {
                        states.insert(*r, ReplicaState::InSync {});
                    }
                    for r in &out_of_sync {
                        states.insert(*r, ReplicaState::OutOfSync {});
                    }
                }
                // A joining replica gets a new stream (the old one may be dead: a replica
                // killed without closing leaves it until QUIC's idle timeout); once it is
                // up the machine fences the replica and sends what is pending.
                for r in &joining {
                    self.links.remove(r);
                    if let Some(n) = self.restarts.get(r) {
                        n.notify_one();
                    }
                }
                // Newly out of sync: an empty record now, so a later catch-up examines
                // what it missed, not the whole volume.
                for r in &out_of_sync {
                    let fresh = !self.shared.missed.lock().contains_key(r);
                    if fresh {
                        self.shared.missed.lock().entry(*r).or_default();
                        let (dir, file) = (self.missed_dir.clone(), self.missed_file(*r));
                        let _ = tokio::task::spawn_blocking(move || append_synced(&dir, &file, ""))
                            .await;
                    }
                }
                let _ = done.send(Ok(()));
                (actions, Some(catching_up))
            }
            Err(e) => {
                let _ = done.send(Err(e.to_string()));
                (Vec::new(), None)
            }
        }
    }

    /// Runs replica `r`'s final catch-up pass; a replica that missed something and has
    /// no catch-up running cannot join.
    async fn last_pass(&mut self, r: ReplicaId) -> Result<(), String> {
        let node = self.nodes.get(&r).cloned().unwrap_or_default();
        let Some((task, ctl)) = self.catchups.remove(&r) else {
            let missed = self.shared.missed.lock().get(&r).map_or(0, Missed::bytes);
            if missed > 0 {
                return Err(format!(
                    "replica {node} missed {missed} bytes and is not being caught up: list it in catching_up first"
                ));
            }
            return Ok(());
        };
        let (done, rx) = tokio::sync::oneshot::channel();
        let asked = ctl.send(Final { done }).is_ok();
        let outcome = match tokio::time::timeout(FINAL_WAIT, rx).await {
            Ok(Ok(r)) if asked => r,
            Ok(_) => Err(format!("the catch-up of replica {node} stopped")),
            Err(_) => Err(format!(
                "the last catch-up pass of replica {node} took more than {FINAL_WAIT:?}"
            )),
        };
        if outcome.is_err() {
            task.abort();
            self.shared.missed.lock().entry(r).or_default().give_back();
        }
        outcome
    }

    /// Catches up exactly the replicas in `catching` (in the current generation): the
    /// others' catch-ups stop, these start again.
    pub(super) fn catch_up(&mut self, catching: &BTreeSet<ReplicaId>) {
        for (r, (task, _)) in self.catchups.drain() {
            task.abort();
            if let Some(m) = self.shared.missed.lock().get_mut(&r) {
                m.give_back();
            }
        }
        for r in catching {
            let Some(peer) = self.peers.get(r).cloned() else {
                continue;
            };
            let (ctl, rx) = mpsc::unbounded_channel();
            let task = CatchUp {
                ep: self.ep.clone(),
                replica: *r,
                peer,
                volume: self.name.clone(),
                generation: self.machine.generation().0,
                export: self.export.clone(),
                shared: self.shared.clone(),
                rate: self.rate,
                store: self.store.clone(),
                record: (self.missed_dir.clone(), self.missed_file(*r)),
            };
            self.catchups.insert(*r, (tokio::spawn(task.run(rx)), ctl));
        }
    }
}
