//! Moving a replicated volume's primary to the node that starts a VM on it, so the VM's
//! disk is its node's own store: the generation is raised with the new primary in one
//! compare-and-swap of the volume record, then the reconcilers tell the stores (the old
//! primary becomes a replica, the new one starts in the new generation and fences it).
//!
//! Only a node holding an in-sync copy that is not still joining takes the primary. A VM
//! on a node without such a copy uses the primary on its node remotely (NBD over TLS),
//! as for a one-copy volume elsewhere.
//!
//! [`plan`] is pure; [`primary_step`] is what the VM start path calls, once per round of
//! its reconciler.

use std::sync::Arc;
use std::time::Duration;

use tessera_api::CopyState;
use tessera_state::Node;
use tessera_store_admin::{AdminOp, AdminReply};

use crate::records::table::VOLUMES;
use crate::records::{Volume, VolumeState};
use crate::tables::get;

/// How long a VM start waits for its node's store to become the volume's primary.
pub const TAKE_OVER_WAIT: Duration = Duration::from_secs(20);
/// How long one step asks the local store whether it serves the volume.
const STORE_ASK: Duration = Duration::from_secs(2);

/// The record that makes `to` the primary of `v`, or `None` when it should not move:
/// not replicated or not ready, already there, or `to` holds no in-sync copy that is
/// not joining.
pub fn plan(v: &Volume, to: &str) -> Option<Volume> {
    if !v.is_replicated() || v.state != VolumeState::Ready || v.node == to {
        return None;
    }
    let i = v
        .copies
        .iter()
        .position(|c| c.node == to && c.state == CopyState::InSync && !c.joining)?;
    let mut new = v.clone();
    let c = new.copies.remove(i);
    new.copies.insert(0, c);
    new.node = to.to_string();
    new.generation += 1;
    Some(new)
}

/// Where the primary of a VM's disk stands for the VM starting on this node.
#[derive(Debug, PartialEq)]
pub enum PrimaryHere {
    /// This node's store serves it (or it is a one-copy volume on this node).
    Here,
    /// It stays where it is (not replicated, or no in-sync copy here that is not joining,
    /// or moved away meanwhile): the VM uses it on its node, remotely.
    Elsewhere,
    /// Moving here, not done yet: why, for the VM's state reason. Ask again shortly.
    Moving(String),
}

/// One step of moving the VM's disk `volume` to node `me`, which never waits: the VM
/// start path calls it on every round of its node's reconciler until it says `Here` or
/// `Elsewhere`, giving up after [`TAKE_OVER_WAIT`] (then the VM starts with the primary
/// where the record says), so one VM waiting for its store never holds up the others.
/// When this node holds an in-sync copy of a replicated volume whose primary is
/// elsewhere, the first step moves the primary here (the generation raised through the
/// cluster state); then each step asks the local store whether it serves the volume as
/// the configured, unfenced primary in that generation.
pub async fn primary_step(node: &Arc<Node>, me: &str, volume: &str) -> PrimaryHere {
    let Some(v) = get::<Volume>(node, VOLUMES, volume) else {
        return PrimaryHere::Elsewhere;
    };
    if !v.is_replicated() {
        return if v.node == me {
            PrimaryHere::Here
        } else {
            PrimaryHere::Elsewhere
        };
    }
    let v = if v.node == me {
        v
    } else {
        let Some(mut new) = plan(&v, me) else {
            return PrimaryHere::Elsewhere;
        };
        new.nbd = super::nbd_uri(&super::node_records(node), me, &v.name);
        let msg = format!(
            "primary moved from {} to {me} for the VM starting there; generation {}",
            v.node, new.generation
        );
        if !super::resync::write(node, &v, &new, &[("volume.primary_moved", msg)]).await {
            return PrimaryHere::Moving(format!(
                "moving volume {volume}'s primary to this node: the volume changed meanwhile; trying again"
            ));
        }
        new
    };
    // The local store takes the primary role from this node's reconciler.
    let Some(socket) = super::ADMIN_SOCKET.get() else {
        return PrimaryHere::Elsewhere;
    };
    let waiting = || {
        PrimaryHere::Moving(format!(
            "waiting for this node's store to serve volume {volume} as its primary (generation {})",
            v.generation
        ))
    };
    // Bounded well below the store calls' own limit: the reconciler waits for it.
    let asked = tokio::time::timeout(
        STORE_ASK,
        super::roles::call(socket, AdminOp::ReplicationStatus {}),
    )
    .await;
    let Ok(Ok(AdminReply::Replication(held))) = asked else {
        return waiting();
    };
    if serves_as_primary(&held, volume, v.generation) {
        PrimaryHere::Here
    } else {
        waiting()
    }
}

/// Whether a store reporting `held` serves `volume` as its configured, unfenced primary
/// in `generation` or a later one.
pub(super) fn serves_as_primary(
    held: &[tessera_store_admin::VolumeReplication],
    volume: &str,
    generation: u64,
) -> bool {
    held.iter().any(|h| {
        h.volume == volume
            && h.role == "primary"
            && h.configured
            && h.generation >= generation
            && h.fenced_by.is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(copies: &[(&str, CopyState, bool)]) -> Volume {
        super::super::test_volume::volume(7, copies)
    }

    use CopyState::{CatchingUp, InSync, OutOfSync};

    #[test]
    fn the_primary_moves_only_to_an_in_sync_copy_that_is_not_joining() {
        let v = vol(&[
            ("a", InSync, false),
            ("b", InSync, false),
            ("c", InSync, true),
        ]);
        let new = plan(&v, "b").unwrap();
        assert_eq!(new.node, "b");
        assert_eq!(new.copies[0].node, "b");
        assert_eq!(new.copies.len(), 3);
        assert_eq!(new.generation, 8);
        assert_eq!(plan(&v, "a"), None, "already there");
        assert_eq!(plan(&v, "c"), None, "joining");
        assert_eq!(plan(&v, "d"), None, "no copy there");
        let v = vol(&[
            ("a", InSync, false),
            ("b", OutOfSync, false),
            ("c", CatchingUp, false),
        ]);
        assert_eq!(plan(&v, "b"), None);
        assert_eq!(plan(&v, "c"), None);
    }
}
