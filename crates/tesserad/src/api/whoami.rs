//! "Who am I" (`GET /api/v1/session`): the user, realm, role and expiry of the credentials
//! a request carries, so the console and scripts learn their rights without trying calls.

use axum::Json;
use tessera_api::SessionInfo;

use super::extract::{Anyone, Auth};
use super::{ApiError, ErrorBody};

/// The caller's user, realm, role in effect, kind of credentials (login session or API
/// token) and expiry. Answers even while a password change is required (it says so).
#[utoipa::path(get, path = "/api/v1/session", tag = "auth", operation_id = "whoami",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = SessionInfo), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn whoami(p: Auth<Anyone>) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(info(&p)))
}

fn info(p: &super::auth::Principal) -> SessionInfo {
    SessionInfo {
        user: p.user.clone(),
        realm: realm_of(&p.user).to_string(),
        role: p.role,
        kind: p.kind.clone(),
        expires_ms: p.expires_ms,
        must_change_password: p.must_change_password,
    }
}

/// The realm of a user name: after the last `@` for a directory user, else `local`.
fn realm_of(user: &str) -> &str {
    user.rsplit_once('@')
        .map_or(super::realms::LOCAL, |(_, realm)| realm)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_user_is_of_its_realm_and_others_are_local() {
        assert_eq!(super::realm_of("bob@corp"), "corp");
        assert_eq!(super::realm_of("a@b@corp"), "corp");
        assert_eq!(super::realm_of("admin"), "local");
    }
}
