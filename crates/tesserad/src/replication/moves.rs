//! Moving a replicated volume's primary to the node that starts a VM on it, so the VM's
//! disk is its node's own store: the generation is raised with the new primary in one
//! compare-and-swap of the volume record, then the reconcilers tell the stores (the old
//! primary becomes a replica, the new one starts in the new generation and fences it).
//!
//! Only a node holding an in-sync copy that is not still joining takes the primary. A VM
//! on a node without such a copy uses the primary on its node remotely (NBD over TLS),
//! as for a one-copy volume elsewhere.
//!
//! [`plan`] is pure; [`primary_here`] is what the VM start path calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_api::CopyState;
use tessera_state::Node;
use tessera_store_admin::{AdminOp, AdminReply};

use crate::records::table::VOLUMES;
use crate::records::{Volume, VolumeState};
use crate::tables::get;

/// How long a VM start waits for its node's store to become the volume's primary.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(20);

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

/// Called by the VM start path on node `me` for the VM's disk `volume`: when this node
/// holds an in-sync copy of a replicated volume whose primary is elsewhere, the primary
/// moves here (generation raised through the cluster state first) and this waits, at
/// most [`TAKE_OVER_WAIT`], until the local store serves it as the primary. Returns
/// whether the primary is here (false: the VM uses the primary where it is).
pub async fn primary_here(node: &Arc<Node>, me: &str, volume: &str) -> bool {
    let Some(v) = get::<Volume>(node, VOLUMES, volume) else {
        return false;
    };
    if !v.is_replicated() {
        return v.node == me;
    }
    let deadline = Instant::now() + TAKE_OVER_WAIT;
    let mut moved = v.node == me;
    while !moved {
        let Some(v) = get::<Volume>(node, VOLUMES, volume) else {
            return false;
        };
        if v.node == me {
            break;
        }
        let Some(mut new) = plan(&v, me) else {
            return false;
        };
        new.nbd = super::nbd_uri(&super::node_records(node), me, &v.name);
        let msg = format!(
            "primary moved from {} to {me} for the VM starting there; generation {}",
            v.node, new.generation
        );
        moved = super::resync::write(node, &v, &new, &[("volume.primary_moved", msg)]).await;
        if !moved {
            if Instant::now() > deadline {
                return false;
            }
            // Changed meanwhile (or not committed): look again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The local store takes the primary role from this node's reconciler.
    let Some(socket) = super::ADMIN_SOCKET.get() else {
        return false;
    };
    while Instant::now() < deadline {
        let Some(v) = get::<Volume>(node, VOLUMES, volume) else {
            return false;
        };
        if v.node != me {
            return false;
        }
        if let Ok(AdminReply::Replication(held)) =
            super::roles::call(socket, AdminOp::ReplicationStatus {}).await
        {
            let serving = held.iter().any(|h| {
                h.volume == volume
                    && h.role == "primary"
                    && h.configured
                    && h.generation >= v.generation
                    && h.fenced_by.is_none()
            });
            if serving {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!(
        volume,
        "the local store did not become the primary within {} s",
        TAKE_OVER_WAIT.as_secs()
    );
    false
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
