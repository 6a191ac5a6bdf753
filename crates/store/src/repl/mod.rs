//! Replication between stores (issue #8): the QUIC endpoint with mutual TLS (`quic`),
//! the replica service (`replica`) and the primary's forwarding (`primary`). The wire
//! codec and the primary/replica state machines are `tessera-replication`'s; this module
//! is the I/O around them. `tesserad` (later: from its Raft state) tells the store each
//! volume's role with the admin op `set_replication`.

pub mod primary;
pub mod quic;
pub mod replica;
mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_blockstore::{Store, StoreError};
use tessera_replication::primary::Config;
use tessera_replication::wire::Generation;
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
}

impl Replication {
    /// Roles over `store`; without an endpoint (no `--repl-quic`) only `standalone` and
    /// `replica` (which then cannot be reached) can be set. Must run inside the runtime.
    pub fn new(store: Store, endpoint: Option<Arc<ReplEndpoint>>) -> Arc<Replication> {
        let missed_dir = store.dir().join("replication");
        Arc::new(Replication {
            replicas: ReplicaService::new(store.clone()),
            primaries: Arc::new(Primaries::default()),
            store,
            endpoint,
            runtime: tokio::runtime::Handle::current(),
            missed_dir,
        })
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
        match role {
            ReplicationRole::Replica { .. } => {
                self.primaries.stop(volume);
                Ok(self.replicas.enable(volume, generation)?)
            }
            ReplicationRole::Standalone {} => {
                self.primaries.stop(volume);
                self.replicas.disable(volume);
                Ok(self.store.raise_generation(volume, generation)?)
            }
            ReplicationRole::Primary {
                replicas,
                timeout_ms,
                ..
            } => {
                let ep = self.endpoint.clone().ok_or_else(|| {
                    RoleError::Refused(
                        "this store has no replication endpoint (start it with --repl-quic)".into(),
                    )
                })?;
                let mut peers = Vec::new();
                for r in replicas {
                    let addr = r.addr.parse().map_err(|e| {
                        RoleError::Refused(format!("replica {}: address {:?}: {e}", r.node, r.addr))
                    })?;
                    tessera_pki::node_dns_name(&r.node)
                        .map_err(|e| RoleError::Refused(format!("replica node id: {e}")))?;
                    peers.push(Peer {
                        node: r.node.clone(),
                        addr,
                    });
                }
                let timeout = timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_TIMEOUT);
                self.replicas.disable(volume);
                // The same replicas in a newer generation: the running primary takes the
                // configuration (in-sync set shrunk: what the others miss is recorded).
                if let Some(p) = self.primaries.get(volume) {
                    let ids: Option<Vec<_>> = peers.iter().map(|x| p.replica_of(&x.node)).collect();
                    if let (Some(ids), true) = (ids, generation > p.generation().0) {
                        let in_sync = ids.into_iter().collect();
                        let known = p.replica_ids();
                        let out_of_sync = known.difference(&in_sync).copied().collect();
                        p.reconfigure(Config {
                            generation: Generation(generation),
                            replica_count: (known.len() + 1).min(3) as u8,
                            in_sync,
                            out_of_sync,
                            operator_override: false,
                        })
                        .map_err(RoleError::Refused)?;
                        // After the driver re-bound its copy to the new generation, so no
                        // local apply in between is refused as stale.
                        return Ok(self.store.raise_generation(volume, generation)?);
                    }
                    self.primaries.stop(volume);
                }
                let now = self.store.raise_generation(volume, generation)?;
                let _guard = self.runtime.enter();
                self.primaries
                    .start(
                        ep,
                        &self.store,
                        PrimarySpec {
                            volume: volume.to_string(),
                            generation: now,
                            peers,
                            timeout,
                        },
                        self.missed_dir.clone(),
                    )
                    .map_err(RoleError::Refused)?;
                Ok(now)
            }
        }
    }
}
