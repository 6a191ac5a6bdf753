//! Logging in: a password (checked against the local user's argon2id hash, or by binding
//! to the realm's directory), then the second factor when the user enrolled one or the
//! login policy requires it, then a session. A name without `@realm` belongs to the
//! login policy's default realm (`local` unless an administrator chose another).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{AppendHeaders, IntoResponse};
use axum::Json;
use serde_json::json;
use tessera_api::{Login, LoginReply, Role};
use tessera_state::{Command, Require};

use super::auth::{key_of, secret_hex, Session, SESSION_MS};
use super::auth::{password_ok_async, random_id, session_cookie, unknown_user_hash, User};
use super::extract::{Body, Peer};
use super::realms::LOCAL;
use super::{commit, login_limit, node, now_ms, put, read, ApiError, ApiState, ErrorBody, St};
use crate::records::table::{SESSIONS, USERS};

/// An answer with `Retry-After` (whole seconds, at least 1).
fn retry_after(e: ApiError, wait: std::time::Duration) -> axum::response::Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    (
        AppendHeaders([(header::RETRY_AFTER, secs.max(1).to_string())]),
        e,
    )
        .into_response()
}

/// Log in with a username (`name`, or `name@realm`) and password, and the second factor
/// when one is needed: returns a session token and sets the session cookie. A right
/// password without a needed code is 401 with `"second_factor": "totp"` in the body.
/// Failed logins slow down further attempts from the same address and for the same
/// username (429 with `Retry-After`).
#[utoipa::path(post, path = "/api/v1/login", tag = "auth", operation_id = "login",
    request_body = Login,
    responses((status = 200, body = LoginReply), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "The password was right but the \
            login is not allowed: no role, or a second factor the login policy requires \
            is not enrolled"),
        (status = 429, body = ErrorBody, description = "Too many failed logins from this \
            address or for this user: wait as long as `Retry-After` says"),
        (status = 503, body = ErrorBody)))]
pub async fn login(
    State(st): St,
    Peer(peer): Peer,
    Body(req): Body<Login>,
) -> Result<axum::response::Response, axum::response::Response> {
    let throttle = login_limit::throttle();
    if let Err(wait) = throttle.begin(peer, &req.username, std::time::Instant::now()) {
        tracing::debug!(?peer, "login refused: back-off after failed logins");
        return Err(retry_after(
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins from this address or for this user; wait and try again",
            ),
            wait,
        ));
    }
    // The name as the audit event records it: bounded (a refusal is an event, and the
    // request body may be far larger than any real name).
    let asked: String = req.username.chars().take(128).collect();
    let reply = login_checked(&st, peer, req).await;
    match &reply {
        Ok((_, user)) => throttle.succeeded(peer, user),
        // Refusals are audited (the throttle bounds how many a caller can cause).
        Err(e) if e.0 == StatusCode::UNAUTHORIZED || e.0 == StatusCode::FORBIDDEN => {
            let from = peer.map_or("an unknown address".to_string(), |p| p.to_string());
            let ev = super::events::event(
                "login.failed",
                &asked,
                &asked,
                &format!("login refused from {from}: {}", e.1),
            );
            if let Err(e) = commit(&st, vec![], vec![ev], |_| String::new()).await {
                tracing::warn!(error = %e.1, user = ?asked, ?peer, "login refused; its event was not written");
            }
        }
        Err(_) => {}
    }
    match reply {
        Ok((r, _)) => Ok(r),
        Err(e) if e.0 == StatusCode::SERVICE_UNAVAILABLE => {
            Err(retry_after(e, std::time::Duration::from_secs(1)))
        }
        Err(e) if e.0 == StatusCode::UNAUTHORIZED && e.1 == super::second_factor::NEEDED => {
            let body = json!({ "error": e.1, "second_factor": "totp" });
            Err((StatusCode::UNAUTHORIZED, Json(body)).into_response())
        }
        Err(e) => Err(e.into_response()),
    }
}

/// Login once the throttle let it through: the answer and the user logged in.
async fn login_checked(
    st: &ApiState,
    peer: Option<std::net::IpAddr>,
    mut req: Login,
) -> Result<(axum::response::Response, String), ApiError> {
    let from = peer.map_or("an unknown address".to_string(), |p| p.to_string());
    let n = node(st)?;
    let (name, realm) = match req.username.rsplit_once('@') {
        Some((name, realm)) => (name.to_string(), realm.to_string()),
        None => (
            req.username.clone(),
            super::login_policy::current(&n)?.default_realm,
        ),
    };
    if realm != LOCAL {
        let (key, du) = super::realms::login(st, peer, &name, &realm, &req.password).await?;
        let (require, mut extra) = super::second_factor::check(
            st,
            (key.as_str(), realm.as_str(), du.role),
            req.totp.as_deref(),
        )
        .await?;
        let (role, credentials) = (du.role, du.credentials.clone());
        extra.push(put(super::directory::DIRECTORY_USERS, &key, &du));
        let s = (key, role, credentials, false);
        return start_session(st, s, require, extra, &from).await;
    }
    req.username = name;
    let mut user: Option<User> = read(&n, USERS, &req.username)?;
    if user.is_none() {
        // Created through another node a moment ago? Catch up with the leader.
        n.sync().await.map_err(|e| super::sync_error(&e))?;
        user = read(&n, USERS, &req.username)?;
    }
    // Verify even for unknown users (against a hash nobody's password matches), so timing
    // does not tell which names exist.
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| unknown_user_hash().to_string());
    let ok = password_ok_async(req.password.clone(), hash).await?;
    let Some(user) = user.filter(|_| ok) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid username or password",
        ));
    };
    let (require, extra) = super::second_factor::check(
        st,
        (req.username.as_str(), LOCAL, user.role),
        req.totp.as_deref(),
    )
    .await?;
    let s = (
        req.username,
        user.role,
        user.credentials,
        user.must_change_password,
    );
    start_session(st, s, require, extra, &from).await
}

/// Commits a new login session of `user` with `role`, `credentials` and
/// `must_change_password` (plus `extra` ops, if `require` holds) and answers with it.
async fn start_session(
    st: &ApiState,
    (user, role, credentials, must_change_password): (String, Role, String, bool),
    require: Vec<Require>,
    extra: Vec<Command>,
    from: &str,
) -> Result<(axum::response::Response, String), ApiError> {
    let secret = secret_hex(32);
    let s = Session {
        user: user.clone(),
        role,
        expires_ms: now_ms() + SESSION_MS,
        kind: "session".into(),
        id: random_id(),
        credentials,
    };
    let mut ops = extra;
    ops.push(put(SESSIONS, &key_of(&secret), &s));
    ops.push(super::events::event(
        "login",
        &user,
        &user,
        &format!("logged in as {role:?} from {from}"),
    ));
    commit(st, require, ops, |_| {
        "the second factor code was used by another login, or the user's authenticator or \
         the login policy changed, meanwhile; log in again"
            .into()
    })
    .await?;
    let cookie = session_cookie(&secret, SESSION_MS / 1000)?;
    Ok((
        (
            AppendHeaders([(header::SET_COOKIE, cookie)]),
            Json(LoginReply {
                token: secret,
                expires_ms: s.expires_ms,
                must_change_password,
            }),
        )
            .into_response(),
        user,
    ))
}
