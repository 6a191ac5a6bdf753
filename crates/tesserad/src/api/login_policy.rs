//! The login policy (`settings/login`): the default realm of login names without
//! `@realm`, and which realms and roles must log in with a second factor. Read and
//! changed by administrators. A cluster that never set one has no record: `local` is the
//! default realm and nobody is required to use a second factor.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use tessera_api::{LoginPolicy, Role};
use tessera_state::Require;

use super::directory::{RealmRecord, REALMS};
use super::events::event;
use super::extract::{Administrator, Auth, Body, Synced};
use super::realms::LOCAL;
use super::{commit, put, read, ApiError, ErrorBody, St};
use crate::records::table::SETTINGS;

/// The key of the one record in `settings`.
pub(super) const KEY: &str = "login";

/// The policy as stored, the defaults when none is.
pub(super) fn current(n: &tessera_state::Node) -> Result<LoginPolicy, ApiError> {
    Ok(read(n, SETTINGS, KEY)?.unwrap_or_default())
}

/// The requirement that the policy is still `p` when a change that relied on it applies.
pub(super) fn unchanged(n: &tessera_state::Node) -> Result<Require, ApiError> {
    let old: Option<LoginPolicy> = read(n, SETTINGS, KEY)?;
    Ok(match old {
        Some(o) => Require::equals(SETTINGS, KEY, json!(o)),
        None => Require::absent(SETTINGS, KEY),
    })
}

/// The realm of a session's user name: after the last `@`, else `local`.
pub(super) fn realm_of(user: &str) -> &str {
    user.rsplit_once('@').map_or(LOCAL, |(_, realm)| realm)
}

/// The login policy.
#[utoipa::path(get, path = "/api/v1/login-policy", tag = "auth",
    operation_id = "get_login_policy",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = LoginPolicy), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(_: Auth<Administrator>, n: Synced) -> Result<Json<LoginPolicy>, ApiError> {
    Ok(Json(current(&n)?))
}

/// Replace the login policy. Every realm named must exist (`local` always does). Refused
/// (409) when the caller would itself need a second factor it has not enrolled: it would
/// be locked out at its next login.
#[utoipa::path(put, path = "/api/v1/login-policy", tag = "auth",
    operation_id = "replace_login_policy", request_body = LoginPolicy,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = LoginPolicy), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn replace(
    State(st): St,
    p: Auth<Administrator>,
    n: Synced,
    Body(mut req): Body<LoginPolicy>,
) -> Result<Json<LoginPolicy>, ApiError> {
    req.two_factor_realms.sort();
    req.two_factor_realms.dedup();
    req.two_factor_roles.sort();
    req.two_factor_roles.dedup();
    if req.two_factor_realms.len() > 64 {
        return Err(ApiError::bad("two_factor_realms: at most 64"));
    }
    let mut require = vec![unchanged(&n)?];
    let named = std::iter::once(("default_realm", &req.default_realm)).chain(
        req.two_factor_realms
            .iter()
            .map(|r| ("two_factor_realms", r)),
    );
    for (field, realm) in named {
        if realm == LOCAL {
            continue;
        }
        if read::<RealmRecord>(&n, REALMS, realm)?.is_none() {
            return Err(ApiError::bad(format!("{field}: no realm {realm}")));
        }
        require.push(Require::exists(REALMS, realm));
    }
    let me = realm_of(&p.user);
    if req.requires_two_factor(me, p.role) && !super::second_factor::enrolled(&n, &p.user)? {
        return Err(ApiError::conflict(format!(
            "this policy requires a second factor of {} (realm {me}, role {:?}), who has \
             none: enroll an authenticator first (POST /api/v1/totp), or you could not log \
             in again",
            p.user, p.role
        )));
    }
    let what = format!(
        "login policy: default realm {}, second factor required for realms [{}] and roles [{}]",
        req.default_realm,
        req.two_factor_realms.join(", "),
        req.two_factor_roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", ")
    );
    commit(
        &st,
        require,
        vec![
            put(SETTINGS, KEY, &req),
            event("login_policy.update", KEY, &p.user, &what),
        ],
        |_| "the login policy or a realm it names changed meanwhile; try again".into(),
    )
    .await?;
    Ok(Json(req))
}

/// The refusal of a login that needs a second factor its user has not enrolled.
pub(super) fn refusal(user: &str, realm: &str, role: Role, policy: &LoginPolicy) -> ApiError {
    let why = if policy.two_factor_realms.iter().any(|r| r == realm) {
        format!("realm {realm}")
    } else {
        format!("the {role:?} role")
    };
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "two-factor login is required for {why}, and {user} has no authenticator \
             enrolled: only users with a second factor can log in (enroll one with an API \
             token of this user, or ask an administrator to lift the requirement while you \
             enroll)"
        ),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_user_is_of_its_realm_and_others_are_local() {
        assert_eq!(super::realm_of("bob@corp"), "corp");
        assert_eq!(super::realm_of("admin"), "local");
    }
}
