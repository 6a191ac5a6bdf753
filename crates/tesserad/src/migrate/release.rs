//! The disk's hand-over at the switch-over: the source's store stops being the volume's
//! primary before the target's starts as one.
//!
//! The switch-over moves the volume's primary to the target in a new generation, and
//! each node's roles reconciler then tells its own store: the target's becomes the
//! primary, the source's a replica. The two reconcilers race. A new primary's first
//! message to each replica is its generation's fence; a source store still serving as
//! the old primary answers it "not a replica", the new primary counts that copy failed,
//! and the cluster takes it out of the in-sync set and catches it up again: two or three
//! generations more for one move, and a copy out of sync for a while (vm_migrate saw it
//! 2 runs of 5 under load). So the order is made explicit:
//!
//! - the source, once the record says `switched_over`, waits until its store reports
//!   the volume as a configured replica of the new generation (its reconciler did it),
//!   and marks the record `source_released`;
//! - the target's reconciler does not make its store the primary of a volume a
//!   switched-over migration to it holds until the record says so, or [`RELEASE_LIMIT`]
//!   passed (a source that died: its copy then fails and is caught up, as before).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tessera_api::{MigrationPhase, Vm};
use tessera_state::Node;
use tessera_store_admin::{AdminOp, AdminReply, ReplicationRole};

use super::{record, swap, Local, Migration};
use crate::records::table::{MIGRATIONS, VMS, VOLUMES};
use crate::records::Volume;
use crate::tables::get;

/// How long the target's store waits for the source's before it starts as primary
/// anyway.
pub const RELEASE_LIMIT: Duration = Duration::from_secs(5);
/// How long the source waits for its store to become a replica.
const DEMOTE_LIMIT: Duration = Duration::from_secs(10);
/// How often the source asks its store meanwhile (the guest is paused: every
/// millisecond here is downtime).
const ASK_EVERY: Duration = Duration::from_millis(2);

/// Source side: runs beside the migration; returns once the record is released, gone,
/// failed, or the store did not become a replica in time.
pub(super) async fn source(node: &Node, local: &Local, m: &Migration) {
    let mut rx = node.state.subscribe();
    loop {
        match record(node, &m.vm, &m.task) {
            None => return,
            Some(r) if r.source_released => return,
            Some(r) if r.phase == MigrationPhase::SwitchedOver => break,
            Some(r) if matches!(r.phase, MigrationPhase::Failed | MigrationPhase::Done) => return,
            Some(_) => {}
        }
        if tokio::time::timeout(Duration::from_millis(500), rx.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            return;
        }
    }
    let started = Instant::now();
    if let Some((volume, generation)) = demoted_role(node, &local.me, &m.vm) {
        loop {
            if store_is_replica(local, &volume, generation).await {
                break;
            }
            if started.elapsed() > DEMOTE_LIMIT {
                tracing::warn!(vm = %m.vm, %volume, "the source's store did not become a replica in time; the target's store starts as primary after its own limit");
                return;
            }
            tokio::time::sleep(ASK_EVERY).await;
        }
    }
    for _ in 0..20 {
        let Some(now) = record(node, &m.vm, &m.task) else {
            return;
        };
        let mut released = now.clone();
        released.source_released = true;
        if swap(node, &now, &released, Vec::new()).await {
            tracing::info!(vm = %m.vm, waited_ms = started.elapsed().as_millis() as u64, "the source's store released the VM's disk");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The VM's disk and the generation this node's copy must be a replica of before the
/// target's store may start as primary: `None` when there is nothing to wait for (no
/// disk, not replicated, the primary did not move away, or no in-sync copy here).
fn demoted_role(node: &Node, me: &str, vm: &str) -> Option<(String, u64)> {
    let vm: Vm = get(node, VMS, vm)?;
    let d = vm.disks.first()?;
    let v: Volume = get(node, VOLUMES, d)?;
    if !v.is_replicated() || v.node == me {
        return None;
    }
    let role = crate::replication::roles::desired(&v, me, &crate::replication::node_records(node))?;
    matches!(role, ReplicationRole::Replica { catching_up: false })
        .then(|| (v.name.clone(), v.generation))
}

/// Whether the local store serves `volume` as a configured replica of `generation` or
/// later.
async fn store_is_replica(local: &Local, volume: &str, generation: u64) -> bool {
    let sock = local.admin_socket.clone();
    let held = tokio::task::spawn_blocking(move || {
        let mut c = tessera_store::admin_client::AdminClient::connect(&sock)?;
        c.set_timeout(Some(Duration::from_secs(2)))?;
        c.call(AdminOp::ReplicationStatus {})
    })
    .await;
    matches!(held, Ok(Ok(AdminReply::Replication(held))) if held.iter().any(|h| {
        h.volume == volume && h.role == "replica" && h.configured && h.generation >= generation
    }))
}

/// Target side, for its roles reconciler: whether this node's store must not start yet
/// as the primary of `volume` (generation `generation`), because a migration to this
/// node switched over with it and the source's store has not released it. Bounded by
/// [`RELEASE_LIMIT`] from the first time this node asked while that migration held it.
pub fn primary_waits(node: &Node, me: &str, volume: &str, generation: u64) -> bool {
    let held = node.state.read(|t| {
        t.get(MIGRATIONS).is_some_and(|ms| {
            ms.values()
                .filter_map(|v| serde_json::from_value::<Migration>(v.clone()).ok())
                .any(|m| {
                    m.to == me
                        && m.phase == MigrationPhase::SwitchedOver
                        && !m.source_released
                        && t.get(VMS)
                            .and_then(|vms| vms.get(&m.vm))
                            .and_then(|v| serde_json::from_value::<Vm>(v.clone()).ok())
                            .is_some_and(|v| v.disks.first().is_some_and(|d| d == volume))
                })
        })
    });
    // When this node first held the volume back, per volume: once the limit passed it
    // is not held back again while the same migration holds it.
    static FIRST: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    let mut first = FIRST
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !held {
        first.remove(volume);
        return false;
    }
    let since = *first.entry(volume.to_string()).or_insert_with(Instant::now);
    if since.elapsed() < RELEASE_LIMIT {
        return true;
    }
    tracing::warn!(%volume, generation, "the migration's source did not release the volume within {} s; its store starts as primary anyway", RELEASE_LIMIT.as_secs());
    false
}
