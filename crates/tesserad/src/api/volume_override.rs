//! The operator override of a replicated volume: `POST /volumes/{name}/override`
//! (administrators). A replicated volume never has fewer than 2 copies in sync on its own
//! (a copy failing then blocks its writes); the override, with who gave it and why kept in
//! the record and in the event `volume.override`, lets its primary go on with 1. It is
//! Ceph's `min_size 1`, scoped to one volume and one incident: the cluster clears it once
//! two copies are in sync again (`replication::resync`).
//!
//! One compare-and-swap of the volume record: the override recorded, and the copies whose
//! nodes this node sees down (or whose stores are unreachable or degraded) taken out of the
//! in-sync set at once by the leader's rule (`replication::failover::decide`, which now
//! allows 1), a new primary chosen if the primary's was among them; the generation raised
//! either way, so the primary's store takes the new configuration (`operator_override` in
//! its role). A copy that only its primary's store reports failed (its node up) is taken
//! out by the primary's node within a second, under the same rule.

use axum::extract::State;
use axum::Json;
use serde_json::json;
use tessera_api::{NewOverride, VolumeOverride, VolumeView};
use tessera_state::Require;

use super::events::event;
use super::extract::{Administrator, Auth, Body, Param};
use super::{commit, now_ms, put, read, ApiError, ErrorBody, St};
use crate::records::table::VOLUMES;
use crate::records::{Volume, VolumeState};
use crate::replication::failover::{decide, Decision};
use crate::replication::{liveness, nbd_uri, node_records, store_trouble, Liveness};

/// The longest reason kept.
const MAX_REASON: usize = 200;

/// Let a replicated volume's primary write with fewer than 2 copies in sync.
#[utoipa::path(post, path = "/api/v1/volumes/{name}/override", tag = "volumes",
    operation_id = "override_volume",
    params(("name" = String, Path)), request_body = NewOverride,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = VolumeView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody,
            description = "One copy only, not ready, or changed meanwhile"),
        (status = 503, body = ErrorBody)))]
pub async fn override_volume(
    State(st): St,
    p: Auth<Administrator>,
    Param(name): Param<String>,
    Body(req): Body<NewOverride>,
) -> Result<Json<VolumeView>, ApiError> {
    // As the schema's pattern says: the whole reason free of control characters, and
    // something besides (Unicode) white space in it.
    let reason = req.reason.trim();
    if reason.is_empty()
        || req.reason.chars().count() > MAX_REASON
        || req.reason.chars().any(char::is_control)
    {
        return Err(ApiError::bad(format!(
            "reason: 1-{MAX_REASON} characters on one line, no control characters, not only spaces"
        )));
    }
    let n = super::synced(&st).await?;
    let old: Volume = read(&n, VOLUMES, &name)?
        .ok_or_else(|| ApiError::not_found(format!("no volume {name}")))?;
    if !old.is_replicated() {
        return Err(ApiError::conflict(format!(
            "volume {name} has one copy: there is no in-sync minimum to override"
        )));
    }
    if old.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!(
            "volume {name} is {:?}; wait for its task",
            old.state
        )));
    }
    let mut new = old.clone();
    new.operator_override = Some(Box::new(VolumeOverride {
        by: p.user.clone(),
        at_ms: now_ms(),
        reason: reason.to_string(),
    }));
    let records = node_records(&n);
    let failed = |id: &str| {
        liveness(&st.me.0, id) == Liveness::Down
            || records.get(id).is_some_and(|r| store_trouble(r).is_some())
    };
    let what = match decide(&new, failed) {
        Some(Decision::Change {
            volume,
            failed,
            new_primary,
        }) => {
            new = volume;
            match new_primary {
                Some(np) => {
                    new.nbd = nbd_uri(&records, &np, &name);
                    format!(
                        "the copies on {} left the in-sync set and the primary moved to {np}",
                        failed.join(", ")
                    )
                }
                None => format!("the copies on {} left the in-sync set", failed.join(", ")),
            }
        }
        // Nothing down as this node sees it: the override waits for the failure (or the
        // primary's report of one); the raised generation gives the primary's store the
        // override now.
        _ => {
            new.generation = old.generation + 1;
            "no copy is seen down from here; a copy that fails leaves the in-sync set without \
             blocking writes"
                .to_string()
        }
    };
    let in_sync = new
        .copies
        .iter()
        .filter(|c| c.state == tessera_api::CopyState::InSync)
        .count();
    let msg = format!(
        "{} allowed fewer than 2 copies in sync ({reason}); {what}; {in_sync} of {} copies in \
         sync; generation {}",
        p.user, new.replicas, new.generation
    );
    tracing::warn!(volume = %name, user = %p.user, "{msg}");
    commit(
        &st,
        vec![Require::equals(VOLUMES, &name, json!(old))],
        vec![
            put(VOLUMES, &name, &new),
            event("volume.override", &name, &p.user, &msg),
        ],
        |_| format!("volume {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(super::volumes::view(&n, new)?))
}
