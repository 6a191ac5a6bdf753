//! The disk's hand-over at the switch-over: both stores are told their new roles at
//! once, and the new primary waits for the old one.
//!
//! The switch-over moves the volume's primary to the target in a new generation, and
//! each node's roles reconciler then tells its own store: the target's becomes the
//! primary, the source's a replica. The two reconcilers race. A new primary's first
//! message to each in-sync replica is its reconciliation's `Unsettled` question (which
//! fences the replica in the new generation); a source store still serving as the old
//! primary answers it "not a replica", and the new primary asks again every 2 ms (up to
//! 2 s, `tessera-store`'s `repl/primary/reconcile.rs`) until that store is a replica of
//! the new generation, before its first client request and before any replication
//! message. So the copy is never counted failed for the race (which used to cost a
//! catch-up and two or three generations more for one move), and the hand-over runs in
//! parallel on both nodes instead of one after the other.
//!
//! Until 2026-12-03 the target's store started as primary only after the source had
//! released (its store a replica, then a Raft commit marking the record
//! `source_released`): a second Raft commit and two reconciler rounds in a row while the
//! guest was paused. The source still waits for its store to become a replica and marks
//! the record so (the task's timeline shows when), but nothing waits for that mark.

use std::time::{Duration, Instant};

use tessera_api::{MigrationPhase, Vm};
use tessera_state::Node;
use tessera_store_admin::{AdminOp, AdminReply, ReplicationRole, VolumeReplication};

use super::progress::{mark, Marks};
use super::{record, swap, Local, Migration};
use crate::records::table::{VMS, VOLUMES};
use crate::records::Volume;
use crate::tables::get;

/// How long the source waits for its store to become a replica.
const DEMOTE_LIMIT: Duration = Duration::from_secs(10);
/// How often either side asks its store meanwhile (the guest is paused: every
/// millisecond here is downtime).
const ASK_EVERY: Duration = Duration::from_millis(2);

/// Source side: runs beside the migration; returns once the record is released, gone,
/// failed, or the store did not become a replica in time, with the moments it saw
/// (`switched_over_seen`, `store_replica`, `released`) for the task's timeline.
pub(super) async fn source(node: &Node, local: &Local, m: &Migration) -> Marks {
    let mut marks = Marks::new();
    let mut rx = node.state.subscribe();
    loop {
        match record(node, &m.vm, &m.task) {
            None => return marks,
            Some(r) if r.source_released => return marks,
            Some(r) if r.phase == MigrationPhase::SwitchedOver => break,
            Some(r) if matches!(r.phase, MigrationPhase::Failed | MigrationPhase::Done) => {
                return marks
            }
            Some(_) => {}
        }
        if tokio::time::timeout(Duration::from_millis(500), rx.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            return marks;
        }
    }
    mark(&mut marks, "switched_over_seen");
    let started = Instant::now();
    if let Some((volume, generation)) = demoted_role(node, &local.me, &m.vm) {
        let replica = |h: &VolumeReplication| {
            h.role == "replica" && h.configured && h.generation >= generation
        };
        if !wait_store(local, &volume, DEMOTE_LIMIT, replica).await {
            tracing::warn!(vm = %m.vm, %volume, "the source's store did not become a replica in time; the new primary counts its copy failed");
            return marks;
        }
        mark(&mut marks, "store_replica");
    }
    for _ in 0..20 {
        let Some(now) = record(node, &m.vm, &m.task) else {
            return marks;
        };
        let mut released = now.clone();
        released.source_released = true;
        if swap(node, &now, &released, Vec::new()).await {
            mark(&mut marks, "released");
            tracing::info!(vm = %m.vm, waited_ms = started.elapsed().as_millis() as u64, "the source's store released the VM's disk");
            return marks;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    marks
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

/// Waits until the local store reports `volume` so that `ok` holds, asking every
/// [`ASK_EVERY`], at most `limit`; whether it did. Both sides' hand-over waits use it
/// while the guest is paused.
pub(super) async fn wait_store(
    local: &Local,
    volume: &str,
    limit: Duration,
    ok: impl Fn(&VolumeReplication) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let sock = local.admin_socket.clone();
        let held = tokio::task::spawn_blocking(move || {
            let mut c = tessera_store::admin_client::AdminClient::connect(&sock)?;
            c.set_timeout(Some(Duration::from_secs(2)))?;
            c.call(AdminOp::ReplicationStatus {})
        })
        .await;
        if let Ok(Ok(AdminReply::Replication(held))) = held {
            if held.iter().any(|h| h.volume == volume && ok(h)) {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}
