//! Roles given at once, outside the reconciler's round, for a live migration's
//! switch-over ([`give_now`]).

use std::path::Path;
use std::sync::OnceLock;

use tessera_state::Node;
use tessera_store_admin::ReplicationRole;

use super::{applied, desired, tell};
use crate::records::table::VOLUMES;
use crate::records::{Volume, VolumeState};
use crate::replication::node_records;
use crate::tables::get;

/// Held by the reconciler's round and by [`give_now`]: a store told the same primary role
/// twice would restart that primary.
pub(super) fn giving() -> &'static tokio::sync::Mutex<()> {
    static GIVING: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    GIVING.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// Gives `me`'s store the role the cluster state now gives it for `volume` at once,
/// rather than in the reconciler's next round: a live migration's switch-over, whose
/// guest waits for both stores. Only the two roles a primary's move gives, in a
/// generation newer than the one this process last gave (the move raised it): the new
/// primary, and the previous primary becoming an in-sync replica (no serving replica, so
/// told at once, as the reconciler would); anything else is left to the reconciler. True
/// if the store holds that role now.
pub async fn give_now(node: &Node, me: &str, socket: &Path, volume: &str) -> bool {
    let _giving = giving().lock().await;
    let Some(v) = get::<Volume>(node, VOLUMES, volume)
        .filter(|v| v.state == VolumeState::Ready && v.is_replicated())
    else {
        return false;
    };
    let Some(want) = desired(&v, me, &node_records(node)) else {
        return false;
    };
    let have = applied()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(volume)
        .cloned();
    if have.as_ref() == Some(&(v.generation, want.clone())) {
        return true;
    }
    let moved = match (&want, &have) {
        (ReplicationRole::Primary { .. }, Some((g, _))) => v.node == me && *g < v.generation,
        (
            ReplicationRole::Replica { catching_up: false },
            Some((g, ReplicationRole::Primary { .. })),
        ) => v.node != me && *g < v.generation,
        _ => false,
    };
    if !moved {
        return false;
    }
    let (what, told) = tell(socket, &v, &want).await;
    match told {
        Ok(_) => {
            tracing::info!(volume, "{what}: done (switch-over)");
            true
        }
        Err(e) => {
            tracing::warn!(volume, error = %e, "{what}: left to the reconciler");
            false
        }
    }
}
