//! The disk's hand-over at the switch-over: both stores are told their new roles at
//! once, and the new primary waits for the old one.
//!
//! The switch-over moves the volume's primary to the target in a new generation, and
//! each node's migration then tells its own store directly (`roles::give_now`, not
//! waiting for the roles reconciler's round): the target's becomes the primary, the
//! source's a replica. The two nodes race. A new primary's first
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
//! released (its store a replica, then a Raft commit marking the record released): a
//! second Raft commit and two reconciler rounds in a row while the guest was paused. The
//! source still watches its store become a replica, for the task's timeline only.

use std::time::{Duration, Instant};

use tessera_api::{MigrationPhase, Vm};
use tessera_state::Node;
use tessera_store_admin::{AdminOp, AdminReply, ReplicationRole, VolumeReplication};

use super::progress::{mark, Marks};
use super::{record, Local, Migration};
use crate::records::table::{VMS, VOLUMES};
use crate::records::Volume;
use crate::tables::get;

/// How long the source waits for its store to become a replica.
const DEMOTE_LIMIT: Duration = Duration::from_secs(10);
/// How often either side asks its store meanwhile (the guest is paused: every
/// millisecond here is downtime).
const ASK_EVERY: Duration = Duration::from_millis(2);

/// Source side: runs beside the migration; returns once its store serves the volume as
/// a replica of the new generation, or the record is gone or failed, or the store did
/// not become a replica in time, with the moments it saw (`switched_over_seen`,
/// `store_replica`) for the task's timeline. Nothing waits for it.
pub(super) async fn source(node: &Node, local: &Local, m: &Migration) -> Marks {
    let mut marks = Marks::new();
    let mut rx = node.state.subscribe();
    loop {
        match record(node, &m.vm, &m.task) {
            None => return marks,
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
        // Told directly, not at the reconciler's next round: the new primary asks this
        // store again until it is a replica, and the guest's first disk request waits.
        crate::replication::roles::give_now(node, &local.me, &local.admin_socket, &volume).await;
        let replica = |h: &VolumeReplication| {
            h.role == "replica" && h.configured && h.generation >= generation
        };
        if !wait_store(local, &volume, DEMOTE_LIMIT, replica).await {
            tracing::warn!(vm = %m.vm, %volume, "the source's store did not become a replica in time; the new primary counts its copy failed");
            return marks;
        }
        mark(&mut marks, "store_replica");
        tracing::info!(vm = %m.vm, waited_ms = started.elapsed().as_millis() as u64, "the source's store serves the VM's disk as a replica");
    }
    marks
}

/// The VM's disk and the generation this node's copy becomes a replica of: `None` when
/// there is nothing to watch (no disk, not replicated, the primary did not move away, or
/// no in-sync copy here).
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
