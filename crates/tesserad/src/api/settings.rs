//! The cluster's settings (`settings/cluster`): read by anyone logged in, changed by
//! administrators. Today two: the scheduler's vCPU overcommit ratio, and how long a copy
//! of a replicated volume may stay away before it is rebuilt on another node. A cluster
//! that never set one has no record; the defaults apply (also to a field a record
//! written by an older version lacks).

use axum::extract::State;
use axum::Json;
use tessera_api::{
    ClusterSettings, SettingsUpdate, DEFAULT_REPLICA_REPLACE_AFTER_S, REPLICA_REPLACE_AFTER_RANGE,
    VCPU_OVERCOMMIT_RANGE,
};
use tessera_state::Require;

use super::events::event;
use super::extract::{Administrator, Auditor, Auth, Body, Synced};
use super::{commit, put, read, ApiError, ErrorBody, St};
use crate::records::table::SETTINGS;
use crate::vmrun::scheduler::DEFAULT_VCPU_OVERCOMMIT;

/// The key of the one record.
const KEY: &str = "cluster";

fn defaults() -> ClusterSettings {
    ClusterSettings {
        vcpu_overcommit: DEFAULT_VCPU_OVERCOMMIT,
        replica_replace_after_s: DEFAULT_REPLICA_REPLACE_AFTER_S,
    }
}

/// The cluster's settings as stored, the defaults when none are.
pub(crate) fn current(n: &tessera_state::Node) -> Result<ClusterSettings, ApiError> {
    Ok(read(n, SETTINGS, KEY)?.unwrap_or_else(defaults))
}

/// The cluster's settings.
#[utoipa::path(get, path = "/api/v1/settings", tag = "cluster", operation_id = "get_settings",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = ClusterSettings), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(_: Auth<Auditor>, n: Synced) -> Result<Json<ClusterSettings>, ApiError> {
    Ok(Json(current(&n)?))
}

/// Change the cluster's settings. A lower `vcpu_overcommit` stops nothing that runs; it
/// applies to the next placements. `replica_replace_after_s` applies at once to copies
/// already away.
#[utoipa::path(patch, path = "/api/v1/settings", tag = "cluster",
    operation_id = "update_settings", request_body = SettingsUpdate,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = ClusterSettings), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn update(
    State(st): St,
    p: Auth<Administrator>,
    n: Synced,
    Body(req): Body<SettingsUpdate>,
) -> Result<Json<ClusterSettings>, ApiError> {
    // The record as stored: the compare-and-swap compares it as written (one written by
    // an older version lacks the newer fields, which read as their defaults).
    let old: Option<serde_json::Value> = read(&n, SETTINGS, KEY)?;
    let mut new = match &old {
        Some(o) => serde_json::from_value(o.clone())
            .map_err(|e| ApiError::internal(format!("the settings record is unreadable: {e}")))?,
        None => defaults(),
    };
    if let Some(r) = req.vcpu_overcommit {
        if !VCPU_OVERCOMMIT_RANGE.contains(&r) {
            return Err(ApiError::bad(format!(
                "vcpu_overcommit: {r} is not between {} and {}",
                VCPU_OVERCOMMIT_RANGE.start(),
                VCPU_OVERCOMMIT_RANGE.end()
            )));
        }
        new.vcpu_overcommit = r;
    }
    if let Some(r) = req.replica_replace_after_s {
        if !REPLICA_REPLACE_AFTER_RANGE.contains(&r) {
            return Err(ApiError::bad(format!(
                "replica_replace_after_s: {r} is not between {} and {}",
                REPLICA_REPLACE_AFTER_RANGE.start(),
                REPLICA_REPLACE_AFTER_RANGE.end()
            )));
        }
        new.replica_replace_after_s = r;
    }
    let require = match &old {
        Some(o) => Require::equals(SETTINGS, KEY, o.clone()),
        None => Require::absent(SETTINGS, KEY),
    };
    commit(
        &st,
        vec![require],
        vec![
            put(SETTINGS, KEY, &new),
            event(
                "settings.update",
                KEY,
                &p.user,
                &format!(
                    "cluster settings: vcpu_overcommit {}, replica_replace_after_s {}",
                    new.vcpu_overcommit, new.replica_replace_after_s
                ),
            ),
        ],
        |_| "the settings changed meanwhile; try again".into(),
    )
    .await?;
    Ok(Json(new))
}
