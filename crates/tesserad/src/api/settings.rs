//! The cluster's settings (`settings/cluster`): read by anyone logged in, changed by
//! administrators. Today one: the scheduler's vCPU overcommit ratio. A cluster that never
//! set one has no record; the defaults apply.

use axum::extract::State;
use axum::Json;
use serde_json::json;
use tessera_api::{ClusterSettings, SettingsUpdate, VCPU_OVERCOMMIT_RANGE};
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
/// applies to the next placements.
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
    let old: Option<ClusterSettings> = read(&n, SETTINGS, KEY)?;
    let mut new = old.clone().unwrap_or_else(defaults);
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
    let require = match &old {
        Some(o) => Require::equals(SETTINGS, KEY, json!(o)),
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
                &format!("cluster settings: vcpu_overcommit {}", new.vcpu_overcommit),
            ),
        ],
        |_| "the settings changed meanwhile; try again".into(),
    )
    .await?;
    Ok(Json(new))
}
