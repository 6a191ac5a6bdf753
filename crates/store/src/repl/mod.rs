//! Replication between stores (issue #8): the QUIC endpoint with mutual TLS (`quic`),
//! the replica service (`replica`) and the primary's forwarding (`primary`). The wire
//! codec and the primary/replica state machines are `tessera-replication`'s; this module
//! is the I/O around them. `tesserad` (later: from its Raft state) tells the store each
//! volume's role with the admin op `set_replication`.

mod catchup;
pub mod primary;
pub mod quic;
mod recent;
pub mod replica;
pub mod reset_key;
mod resize;
mod scrub;
mod snapshot;
mod status;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tessera_blockstore::{Store, StoreError};
use tessera_store_admin::ReplicationRole;

use primary::{Peer, Primaries, PrimarySpec};
use quic::ReplEndpoint;
use replica::ReplicaService;

/// A replica's default timeout (a request it leaves unanswered this long fails).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a role cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The block store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else, in words.
    #[error("{0}")]
    Refused(String),
}

/// Every volume's replication role on this store.
pub struct Replication {
    store: Store,
    endpoint: Option<Arc<ReplEndpoint>>,
    /// The replicas this store holds.
    pub replicas: Arc<ReplicaService>,
    /// The volumes this store is the primary of.
    pub primaries: Arc<Primaries>,
    runtime: tokio::runtime::Handle,
    missed_dir: PathBuf,
    /// Volumes restored from the catalog after a restart and not configured since.
    unconfigured: Mutex<HashSet<String>>,
    /// Volumes this store was the primary of before a restart: NBD writes are refused
    /// until `tesserad` sends the configuration again (it may have moved the primary).
    waiting_primaries: Mutex<HashSet<String>>,
    /// Held while a replicated snapshot goes through a primary's stream.
    snapshot_lock: Mutex<()>,
    /// Snapshots taken from write streams (primary's and replicas').
    taken: snapshot::Taken,
    /// The last changes applied to each volume's copy here, in any role.
    recent: recent::Recent,
    /// Role changes under way, and how many began or ended so far (see
    /// [`Replication::settled_epoch`]).
    changes: Mutex<RoleChanges>,
    changes_done: Condvar,
}

/// Between a role change's first step (a replica disabled, a primary stopped) and its
/// new role taking effect, a volume is neither primary nor replica here. An export's
/// write must not take that for a volume without replication and write this copy alone
/// (seen: a second NBD connection's write landing during a move of the primary reached
/// no replica, and the next primary's reconciliation spread its older content).
#[derive(Default)]
struct RoleChanges {
    under_way: u32,
    epoch: u64,
}

impl Replication {
    /// Roles over `store`; without an endpoint (no `--repl-quic`) only `standalone` and
    /// `replica` (which then cannot be reached) can be set. Must run inside the runtime.
    pub fn new(store: Store, endpoint: Option<Arc<ReplEndpoint>>) -> Arc<Replication> {
        let missed_dir = store.dir().join("replication");
        let taken = snapshot::Taken::default();
        let recent = recent::Recent::default();
        Arc::new(Replication {
            replicas: ReplicaService::new(store.clone(), taken.clone(), recent.clone()),
            recent,
            taken,
            primaries: Arc::new(Primaries::default()),
            store,
            endpoint,
            runtime: tokio::runtime::Handle::current(),
            missed_dir,
            unconfigured: Mutex::new(HashSet::new()),
            waiting_primaries: Mutex::new(HashSet::new()),
            snapshot_lock: Mutex::new(()),
            changes: Mutex::new(RoleChanges::default()),
            changes_done: Condvar::new(),
        })
    }

    /// Waits (until `deadline`) for no role change to be under way and returns the count
    /// of changes begun or ended so far; `None` if one is still under way at `deadline`.
    /// A decision taken from the roles between this and an equal
    /// [`Replication::role_epoch`] saw no role change.
    pub fn settled_epoch(&self, deadline: Instant) -> Option<u64> {
        let mut c = self.changes.lock();
        while c.under_way > 0 {
            if self.changes_done.wait_until(&mut c, deadline).timed_out() && c.under_way > 0 {
                return None;
            }
        }
        Some(c.epoch)
    }

    /// [`Self::settled_epoch`] without waiting: `None` while a role change is under way.
    pub fn settled_epoch_now(&self) -> Option<u64> {
        let c = self.changes.lock();
        (c.under_way == 0).then_some(c.epoch)
    }

    /// The count of role changes begun or ended so far.
    pub fn role_epoch(&self) -> u64 {
        self.changes.lock().epoch
    }

    /// After a start: every volume takes the role it last held, unconfigured. A replica
    /// refuses writes until caught up; a primary refuses NBD writes until `tesserad`
    /// configures it again. A role that does not parse is logged and left standalone
    /// with writes refused like a waiting primary, the safe side.
    pub fn restore(&self) {
        for (volume, role) in self.store.replication_roles() {
            self.unconfigured.lock().insert(volume.clone());
            match serde_json::from_value::<ReplicationRole>(role) {
                Ok(ReplicationRole::Replica { .. }) => match self.replicas.restore(&volume) {
                    Ok(()) => {
                        tracing::info!(volume, "restored as a replica that must be caught up")
                    }
                    Err(e) => tracing::error!(volume, error = %e, "could not restore the replica"),
                },
                Ok(ReplicationRole::Primary { .. }) => {
                    tracing::info!(volume, "was the primary before the restart: NBD writes wait for tesserad's configuration");
                    self.waiting_primaries.lock().insert(volume);
                }
                Ok(ReplicationRole::Standalone {}) => {
                    self.unconfigured.lock().remove(&volume);
                }
                Err(e) => {
                    tracing::error!(volume, error = %e, "unreadable replication role in the catalog: writes refused until configured");
                    self.waiting_primaries.lock().insert(volume);
                }
            }
        }
    }

    /// True while `volume` was this store's primary before a restart and nobody said
    /// since what it is: its NBD writes are refused.
    pub fn waits_for_configuration(&self, volume: &str) -> bool {
        self.waiting_primaries.lock().contains(volume)
    }

    /// Persists `role` with `generation` (synced) before the role takes effect.
    fn persist(
        &self,
        volume: &str,
        generation: u64,
        role: &ReplicationRole,
    ) -> Result<u64, RoleError> {
        let value = match role {
            ReplicationRole::Standalone {} => None,
            other => Some(
                serde_json::to_value(other)
                    .map_err(|e| RoleError::Refused(format!("encoding the role: {e}")))?,
            ),
        };
        Ok(self.store.set_replication_role(volume, generation, value)?)
    }

    /// Makes this store `role` of `volume` in `generation`, persisting the generation
    /// first. Blocking (it may sync the catalog and wait for the primary's driver).
    pub fn set_role(
        &self,
        volume: &str,
        generation: u64,
        role: &ReplicationRole,
    ) -> Result<u64, RoleError> {
        let current = self.store.generation(volume)?;
        if generation < current {
            return Err(StoreError::StaleGeneration {
                volume: volume.to_string(),
                held: generation,
                current,
            }
            .into());
        }
        {
            let mut c = self.changes.lock();
            c.under_way += 1;
            c.epoch += 1;
        }
        let done = self.take_role(volume, generation, role);
        {
            let mut c = self.changes.lock();
            c.under_way -= 1;
            c.epoch += 1;
        }
        self.changes_done.notify_all();
        if done.is_ok() {
            self.unconfigured.lock().remove(volume);
            self.waiting_primaries.lock().remove(volume);
        }
        done
    }

    fn take_role(
        &self,
        volume: &str,
        generation: u64,
        role: &ReplicationRole,
    ) -> Result<u64, RoleError> {
        match role {
            ReplicationRole::Replica { catching_up } => {
                self.primaries.stop(volume);
                self.persist(volume, generation, role)?;
                if *catching_up {
                    Ok(self.replicas.begin_catch_up(volume, generation)?)
                } else {
                    if self.replicas.end_catch_up(volume, generation) {
                        tracing::info!(volume, generation, "caught up: in sync again");
                    }
                    Ok(self.replicas.enable(volume, generation)?)
                }
            }
            ReplicationRole::Standalone {} => {
                self.primaries.stop(volume);
                self.replicas.disable(volume);
                self.persist(volume, generation, role)
            }
            ReplicationRole::Primary {
                replicas,
                timeout_ms,
                cluster_wait_ms,
                catching_up,
                catch_up_bytes_per_sec,
                operator_override,
                rebuilding,
                out_of_sync,
            } => {
                let ep = self.endpoint.clone().ok_or_else(|| {
                    RoleError::Refused(
                        "this store has no replication endpoint (start it with --repl-quic)".into(),
                    )
                })?;
                let peers = parse_peers(replicas)?;
                let catching = parse_peers(catching_up)?;
                let lagging = out_of_sync.as_deref().map(parse_peers).transpose()?;
                let timeout = timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_TIMEOUT);
                self.replicas.disable(volume);
                // The same in-sync replicas in a newer generation: the running primary
                // takes the configuration (in-sync set shrunk: what the others miss is
                // recorded; replicas to catch up or out of sync that it does not know are
                // added, those the cluster no longer lists dropped). Replicas listed for
                // catch-up are caught up in the background; one joining `replicas` gets
                // its last pass first.
                if let Some(p) = self.primaries.get(volume) {
                    if generation > p.generation().0 {
                        let _guard = self.runtime.enter();
                        let changed = p.change(primary::Change {
                            generation,
                            in_sync: &peers,
                            catching_up: &catching,
                            rebuilding,
                            out_of_sync: lagging.as_deref(),
                            operator_override: *operator_override,
                        });
                        if let Some(outcome) = changed {
                            outcome.map_err(RoleError::Refused)?;
                            // After the driver re-bound its copy to the new generation, so
                            // no local apply in between is refused as stale.
                            return self.persist(volume, generation, role);
                        }
                    }
                    self.primaries.stop(volume);
                }
                let now = self.persist(volume, generation, role)?;
                let _guard = self.runtime.enter();
                self.primaries
                    .start(
                        ep,
                        &self.store,
                        PrimarySpec {
                            volume: volume.to_string(),
                            generation: now,
                            peers,
                            catching_up: catching,
                            rebuilding: rebuilding.clone(),
                            out_of_sync: lagging.unwrap_or_default(),
                            rate: *catch_up_bytes_per_sec,
                            timeout,
                            cluster_wait: cluster_wait_ms
                                .map_or(primary::DEFAULT_CLUSTER_WAIT, Duration::from_millis),
                            taken: self.taken.clone(),
                            operator_override: *operator_override,
                            recent: self.recent.clone(),
                        },
                        self.missed_dir.clone(),
                    )
                    .map_err(RoleError::Refused)?;
                Ok(now)
            }
        }
    }
}

/// Checks and resolves the replicas' addresses and node ids.
fn parse_peers(list: &[tessera_store_admin::ReplicaPeer]) -> Result<Vec<Peer>, RoleError> {
    list.iter()
        .map(|r| {
            let addr = r.addr.parse().map_err(|e| {
                RoleError::Refused(format!("replica {}: address {:?}: {e}", r.node, r.addr))
            })?;
            tessera_pki::node_dns_name(&r.node)
                .map_err(|e| RoleError::Refused(format!("replica node id: {e}")))?;
            Ok(Peer {
                node: r.node.clone(),
                addr,
            })
        })
        .collect()
}
