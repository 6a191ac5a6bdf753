//! Users' credentials, sessions and API tokens, all in the replicated state.
//!
//! - `users/<name>`: argon2id password hash, role, whether the password must change.
//! - `sessions/<blake3 of the secret>`: a login session or an API token: user, role,
//!   expiry, kind and id. Secrets are never stored.
//! - `tokens/<id>`: the session key of an API token, for listing and revocation.
//!
//! Roles are ordered Auditor < Operator < Administrator; an endpoint names the least role
//! it needs. A principal acts with the smaller of its session's role and its user's
//! current role, so demoting or deleting a user takes effect on its sessions and tokens at
//! once. A session whose user must change the password may only change it.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{AppendHeaders, IntoResponse};
use axum::Json;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_state::{Command, Require};
use utoipa::ToSchema;

use super::{all, body, commit, del, get, node, now_ms, put, ApiError, ApiState, ErrorBody, St};

/// The session cookie's name.
pub const COOKIE: &str = "tessera_session";

/// What a principal may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything.
    Auditor,
    /// Read, and operate resources.
    Operator,
    /// Everything, including users and tokens.
    Administrator,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct User {
    pub password_hash: String,
    pub role: Role,
    pub must_change_password: bool,
}

/// A login session or an API token, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// Whose.
    pub user: String,
    /// The role it was created with (the user's current role may be smaller).
    pub role: Role,
    expires_ms: u64,
    kind: String,
    id: String,
}

const SESSION_MS: u64 = 8 * 3600 * 1000;

fn secret_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A short random id (tasks, events, tokens).
pub(super) fn random_id() -> String {
    secret_hex(8)
}

fn key_of(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

pub(super) fn hash_password(pw: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("hashing: {e}")))
}

/// Hashes off the async threads (argon2 takes tens of milliseconds on purpose).
pub(super) async fn hash_password_async(pw: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_password(&pw))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn password_ok(pw: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .is_ok_and(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
}

async fn password_ok_async(pw: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || password_ok(&pw, &hash))
        .await
        .unwrap_or(false)
}

/// The rules for new passwords.
pub(super) fn check_password(field: &str, pw: &str) -> Result<(), ApiError> {
    let n = pw.chars().count();
    if !(12..=1024).contains(&n) {
        return Err(ApiError::bad(format!("{field}: 12 to 1024 characters")));
    }
    Ok(())
}

/// The session secret in the `tessera_session` cookie, if any.
pub fn cookie_secret(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string())
}

/// Who is calling, and with which role.
pub struct Principal {
    /// The user.
    pub user: String,
    /// The role in effect.
    pub role: Role,
    /// The stored session's key (logout deletes it).
    key: String,
}

/// Checks the credentials of a request (bearer token, else session cookie): 401 without
/// valid ones, 403 when the role is too small or the password must change first.
pub async fn authorize(
    st: &ApiState,
    headers: &HeaderMap,
    least: Role,
    allow_must_change: bool,
) -> Result<Principal, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let secret = bearer(headers)
        .or_else(|| cookie_secret(headers))
        .ok_or_else(|| {
            unauthorized("missing credentials (Authorization: Bearer <token>, or log in)")
        })?;
    let key = key_of(&secret);
    let n = node(st)?;
    let mut session: Option<Session> = get(&n, "sessions", &key);
    if session.is_none() {
        // Logged in on another node a moment ago? Catch up with the leader.
        n.sync()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        session = get(&n, "sessions", &key);
    }
    let s = session
        .filter(|s| s.expires_ms > now_ms())
        .ok_or_else(|| unauthorized("invalid, expired or revoked credentials"))?;
    let user: User =
        get(&n, "users", &s.user).ok_or_else(|| unauthorized("the user no longer exists"))?;
    if !allow_must_change && user.must_change_password {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "password change required (POST /api/v1/password)",
        ));
    }
    let role = s.role.min(user.role);
    if role < least {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("requires the {least:?} role"),
        ));
    }
    Ok(Principal {
        user: s.user,
        role,
        key,
    })
}

/// Credentials to log in with.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    username: String,
    password: String,
}

/// A new session.
#[derive(Serialize, ToSchema)]
pub struct LoginReply {
    /// The session secret: send it as `Authorization: Bearer <token>`.
    token: String,
    /// When it expires (ms since the epoch).
    expires_ms: u64,
    /// Whether the password must be changed before anything else.
    must_change_password: bool,
}

fn session_cookie(secret: &str, max_age_s: u64) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&format!(
        "{COOKIE}={secret}; Path=/api; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age_s}"
    ))
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Log in with a username and password: returns a session token and sets the session
/// cookie.
#[utoipa::path(post, path = "/api/v1/login", tag = "auth", request_body = Login,
    responses((status = 200, body = LoginReply), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn login(
    State(st): St,
    b: Result<Json<Login>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = body(b)?;
    let n = node(&st)?;
    let mut user: Option<User> = get(&n, "users", &req.username);
    if user.is_none() {
        // Created through another node a moment ago? Catch up with the leader.
        n.sync()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        user = get(&n, "users", &req.username);
    }
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_default();
    // Verify even for unknown users so timing does not tell which names exist.
    let ok = password_ok_async(req.password.clone(), hash).await;
    let Some(user) = user.filter(|_| ok) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid username or password",
        ));
    };
    let secret = secret_hex(32);
    let s = Session {
        user: req.username.clone(),
        role: user.role,
        expires_ms: now_ms() + SESSION_MS,
        kind: "session".into(),
        id: random_id(),
    };
    let ops = vec![
        put("sessions", &key_of(&secret), &s),
        super::events::event("login", &req.username, &req.username, "logged in"),
    ];
    commit(&st, vec![], ops, |_| String::new()).await?;
    let cookie = session_cookie(&secret, SESSION_MS / 1000)?;
    Ok((
        AppendHeaders([(header::SET_COOKIE, cookie)]),
        Json(LoginReply {
            token: secret,
            expires_ms: s.expires_ms,
            must_change_password: user.must_change_password,
        }),
    ))
}

/// End the calling session (or revoke the calling token) and clear the cookie.
#[utoipa::path(post, path = "/api/v1/logout", tag = "auth",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "Logged out"), (status = 401, body = ErrorBody)))]
pub async fn logout(State(st): St, headers: HeaderMap) -> Result<impl IntoResponse, ApiError> {
    let p = authorize(&st, &headers, Role::Auditor, true).await?;
    commit(&st, vec![], vec![del("sessions", &p.key)], |_| {
        String::new()
    })
    .await?;
    Ok((
        AppendHeaders([(header::SET_COOKIE, session_cookie("", 0)?)]),
        Json(json!({ "logged_out": p.user })),
    ))
}

/// A password change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    old_password: String,
    /// At least 12 characters.
    new_password: String,
}

/// Change the caller's own password (the only call allowed while a change is required).
#[utoipa::path(post, path = "/api/v1/password", tag = "auth", request_body = PasswordChange,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "Changed"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn change_password(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = authorize(&st, &headers, Role::Auditor, true).await?;
    let req = body(b)?;
    check_password("new_password", &req.new_password)?;
    let n = node(&st)?;
    let old_user: User = get(&n, "users", &p.user)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the user no longer exists"))?;
    if !password_ok_async(req.old_password.clone(), old_user.password_hash.clone()).await {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "old_password is wrong",
        ));
    }
    let mut user = old_user.clone();
    user.password_hash = hash_password_async(req.new_password.clone()).await?;
    user.must_change_password = false;
    commit(
        &st,
        vec![Require::equals("users", &p.user, json!(old_user))],
        vec![
            put("users", &p.user, &user),
            super::events::event("user.password", &p.user, &p.user, "password changed"),
        ],
        |_| "the user changed meanwhile; try again".into(),
    )
    .await?;
    Ok(Json(json!({ "changed": true })))
}

/// A new API token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Its role (at most the caller's).
    role: Role,
    /// Lifetime in seconds, 60 to 31622400 (366 days).
    expires_in_s: u64,
}

/// An API token; the secret is only shown when it is created.
#[derive(Serialize, ToSchema)]
pub struct TokenInfo {
    id: String,
    user: String,
    role: Role,
    expires_ms: u64,
    /// Only in the reply to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

/// Create an API token for the caller.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth", request_body = NewToken,
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = TokenInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn create_token(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenInfo>), ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let req = body(b)?;
    if !(60..=366 * 24 * 3600).contains(&req.expires_in_s) {
        return Err(ApiError::bad("expires_in_s: must be 60 to 31622400"));
    }
    let secret = secret_hex(32);
    let id = random_id();
    let t = Session {
        user: p.user.clone(),
        role: req.role.min(p.role),
        expires_ms: now_ms() + req.expires_in_s * 1000,
        kind: "token".into(),
        id: id.clone(),
    };
    let key = key_of(&secret);
    commit(
        &st,
        vec![Require::absent("tokens", &id)],
        vec![
            put("sessions", &key, &t),
            put("tokens", &id, &key),
            super::events::event("token.create", &id, &p.user, "API token created"),
        ],
        |_| "token id collision; try again".into(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenInfo {
            id,
            user: t.user,
            role: t.role,
            expires_ms: t.expires_ms,
            token: Some(secret),
        }),
    ))
}

/// List API tokens (without their secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "auth",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [TokenInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn list_tokens(
    State(st): St,
    headers: HeaderMap,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    authorize(&st, &headers, Role::Administrator, false).await?;
    let n = super::synced(&st).await?;
    let out = all::<String>(&n, "tokens")
        .into_iter()
        .filter_map(|(id, key)| {
            get::<Session>(&n, "sessions", &key).map(|s| TokenInfo {
                id,
                user: s.user,
                role: s.role,
                expires_ms: s.expires_ms,
                token: None,
            })
        })
        .collect();
    Ok(Json(out))
}

/// Revoke an API token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "auth",
    params(("id" = String, Path, description = "Token id")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "Revoked"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_token(
    State(st): St,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let id = super::path(id)?;
    let n = super::synced(&st).await?;
    let key: String =
        get(&n, "tokens", &id).ok_or_else(|| ApiError::not_found(format!("no token {id}")))?;
    commit(
        &st,
        vec![Require::exists("tokens", &id)],
        vec![
            del("sessions", &key),
            del("tokens", &id),
            super::events::event("token.revoke", &id, &p.user, "API token revoked"),
        ],
        |_| format!("token {id} was revoked meanwhile"),
    )
    .await?;
    Ok(Json(json!({ "revoked": id })))
}

/// Creates the first administrator (user `admin`) with a random password, once, and
/// writes the password to `file` (mode 0600) and the log. The password must be changed
/// at first use.
pub async fn create_first_admin(
    node: std::sync::Arc<tessera_state::Node>,
    file: std::path::PathBuf,
) {
    use std::os::unix::fs::OpenOptionsExt;
    let alphabet: Vec<char> = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
        .chars()
        .collect();
    let password: String = (0..20)
        .map(|_| alphabet[rand::rngs::OsRng.gen_range(0..alphabet.len())])
        .collect();
    let Ok(hash) = hash_password_async(password.clone()).await else {
        tracing::error!("could not hash the initial admin password");
        return;
    };
    let user = User {
        password_hash: hash,
        role: Role::Administrator,
        must_change_password: true,
    };
    let txn = Command::Txn {
        require: vec![Require::absent("users", "admin")],
        ops: vec![
            put("users", "admin", &user),
            super::events::event(
                "user.create",
                "admin",
                "tesserad",
                "first administrator created",
            ),
        ],
    };
    loop {
        match node.write(txn.clone()).await {
            Ok(a) if a.conflict.is_some() => return,
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, "initial admin not written yet");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{password}\n").as_bytes()));
    match written {
        Ok(()) => {
            tracing::warn!(user = "admin", %password, file = %file.display(), "initial administrator created; change the password at first login")
        }
        Err(e) => {
            tracing::error!(error = %e, %password, "initial administrator created, but its password file could not be written")
        }
    }
}

/// The deletions that drop expired sessions and tokens (at most `max`): expired
/// credentials are refused anyway; this keeps the tables from growing with every login.
pub(crate) fn expired(tables: &tessera_state::Tables, now_ms: u64, max: usize) -> Vec<Command> {
    let Some(sessions) = tables.get("sessions") else {
        return Vec::new();
    };
    let mut ops = Vec::new();
    for (key, v) in sessions.iter() {
        if ops.len() >= max {
            break;
        }
        let Ok(s) = serde_json::from_value::<Session>(v.clone()) else {
            continue;
        };
        if s.expires_ms > now_ms {
            continue;
        }
        ops.push(del("sessions", key));
        if s.kind == "token" {
            ops.push(del("tokens", &s.id));
        }
    }
    ops
}

/// The leader drops expired sessions and tokens.
pub async fn purge_expired(n: &tessera_state::Node) {
    let ops = n.state.read(|t| expired(t, now_ms(), 500));
    if ops.is_empty() {
        return;
    }
    if let Err(e) = n
        .write(Command::Txn {
            require: vec![],
            ops,
        })
        .await
    {
        tracing::debug!(error = %e, "purging expired sessions failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(kind: &str, id: &str, expires_ms: u64) -> serde_json::Value {
        json!(Session {
            user: "u".into(),
            role: Role::Auditor,
            expires_ms,
            kind: kind.into(),
            id: id.into(),
        })
    }

    #[test]
    fn only_expired_sessions_and_their_tokens_are_dropped() {
        let mut sessions = imbl::OrdMap::new();
        sessions.insert("k1".to_string(), session("session", "a", 100));
        sessions.insert("k2".to_string(), session("token", "t2", 100));
        sessions.insert("k3".to_string(), session("token", "t3", 10_000));
        sessions.insert("k4".to_string(), json!("not a session"));
        let mut tables = tessera_state::Tables::new();
        tables.insert("sessions".to_string(), sessions);
        let ops = expired(&tables, 1_000, 100);
        assert_eq!(
            ops,
            vec![
                del("sessions", "k1"),
                del("sessions", "k2"),
                del("tokens", "t2")
            ]
        );
        assert_eq!(expired(&tables, 1_000, 1).len(), 1);
        assert!(expired(&tables, 50, 100).is_empty());
    }
}
