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
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{AppendHeaders, IntoResponse};
use axum::Json;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_api::{LoggedOut, NewToken, PasswordChange, PasswordChanged, Revoked, TokenInfo};
use tessera_state::{Command, Require};

pub use tessera_api::Role;

use super::extract::{Administrator, Anyone, Auth, Body, IdempotencyKey, Param, Synced};
use super::login_limit;
use super::tasks::{commit_idempotent, Idempotent};
use super::{commit, del, node, now_ms, put, read, read_all, ApiError, ApiState, ErrorBody, St};
use crate::records::table::{SESSIONS, TOKENS, USERS};

/// The session cookie's name.
pub const COOKIE: &str = "tessera_session";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct User {
    pub password_hash: String,
    pub role: Role,
    pub must_change_password: bool,
    /// Which credentials of this user are valid: a random id given when the user is
    /// created and replaced when an administrator resets its password. Sessions and tokens
    /// carry the id they were made under and stop working when it changes, so a deleted
    /// user re-created under the same name does not get its old sessions back. (Empty in
    /// records from before it existed, and in their sessions: those still match.)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credentials: String,
}

pub use crate::records::Session;

pub(super) const SESSION_MS: u64 = 8 * 3600 * 1000;

pub(super) fn secret_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) use crate::tables::random_id;

pub(super) fn key_of(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

pub(super) fn hash_password(pw: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("hashing: {e}")))
}

/// The answer when argon2's turns stay taken (see [`login_limit::argon2_turn`]).
fn argon2_busy() -> ApiError {
    ApiError::unavailable("too many password checks in progress; try again in a second")
}

/// Hashes off the async threads (argon2 takes tens of milliseconds on purpose), when a
/// turn is free.
pub(super) async fn hash_password_async(pw: String) -> Result<String, ApiError> {
    let _turn = login_limit::argon2_turn().await.ok_or_else(argon2_busy)?;
    tokio::task::spawn_blocking(move || hash_password(&pw))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// A hash of a random password nobody knows, made once: logins of unknown users are
/// checked against it, so they cost the same argon2 work as a wrong password of a real
/// user and the answer's timing does not tell which usernames exist.
pub(super) fn unknown_user_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password(&secret_hex(32)).unwrap_or_default())
}

fn password_ok(pw: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .is_ok_and(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
}

/// Checks off the async threads, when a turn is free (503 after waiting too long).
pub(super) async fn password_ok_async(pw: String, hash: String) -> Result<bool, ApiError> {
    let _turn = login_limit::argon2_turn().await.ok_or_else(argon2_busy)?;
    Ok(tokio::task::spawn_blocking(move || password_ok(&pw, &hash))
        .await
        .unwrap_or(false))
}

/// The rules for new passwords: 12 to 1024 characters, none a control character (a
/// newline or an escape cannot be typed back at a prompt: an administrator locked itself
/// out that way).
pub(super) fn check_password(field: &str, pw: &str) -> Result<(), ApiError> {
    if tessera_api::limits::is_password(pw) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{field}: 12 to 1024 characters, no control characters"
        )))
    }
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
    /// The user's credentials id (see [`User::credentials`]), for tokens it creates.
    credentials: String,
    /// When the credentials expire (ms since the epoch).
    pub expires_ms: u64,
    /// `session` or `token`.
    pub kind: String,
    /// Whether the user must change its password first.
    pub must_change_password: bool,
}

/// Checks the credentials of a request (bearer token, else session cookie): 401 without
/// valid ones, 403 when the role is too small or the password must change first.
pub(super) async fn authorize(
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
    let mut session: Option<Session> = read(&n, SESSIONS, &key)?;
    if session.is_none() {
        // Logged in on another node a moment ago? Catch up with the leader.
        n.sync().await.map_err(|e| super::sync_error(&e))?;
        session = read(&n, SESSIONS, &key)?;
    }
    let s = session
        .filter(|s| s.expires_ms > now_ms())
        .ok_or_else(|| unauthorized("invalid, expired or revoked credentials"))?;
    // Refusals from here on name who asked (see `audit`).
    super::audit::caller(&s.user);
    // Directory users (`name@realm`) have their role from the directory's last answer.
    let user: User = if s.user.contains('@') {
        super::realms::account(&n, &s.user)?.map(|(role, credentials)| User {
            password_hash: String::new(),
            role,
            must_change_password: false,
            credentials,
        })
    } else {
        read(&n, USERS, &s.user)?
    }
    .ok_or_else(|| unauthorized("the user no longer exists"))?;
    if s.credentials != user.credentials {
        return Err(unauthorized(
            "revoked credentials: the user was deleted and created again, or its password \
             was reset, since they were issued",
        ));
    }
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
        credentials: user.credentials,
        expires_ms: s.expires_ms,
        kind: s.kind,
        must_change_password: user.must_change_password,
    })
}

pub(super) fn session_cookie(secret: &str, max_age_s: u64) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&format!(
        "{COOKIE}={secret}; Path=/api; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age_s}"
    ))
    .map_err(|e| ApiError::internal(e.to_string()))
}

/// End the calling session (or revoke the calling token) and clear the cookie.
#[utoipa::path(post, path = "/api/v1/logout", tag = "auth", operation_id = "logout",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = LoggedOut), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn logout(State(st): St, p: Auth<Anyone>) -> Result<impl IntoResponse, ApiError> {
    commit(&st, vec![], vec![del(SESSIONS, &p.key)], |_| String::new()).await?;
    Ok((
        AppendHeaders([(header::SET_COOKIE, session_cookie("", 0)?)]),
        Json(LoggedOut {
            logged_out: p.0.user,
        }),
    ))
}

/// Change the caller's own password (the only call allowed while a change is required).
#[utoipa::path(post, path = "/api/v1/password", tag = "auth", operation_id = "change_password",
    request_body = PasswordChange,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = PasswordChanged), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn change_password(
    State(st): St,
    p: Auth<Anyone>,
    Body(req): Body<PasswordChange>,
) -> Result<Json<PasswordChanged>, ApiError> {
    check_password("new_password", &req.new_password)?;
    let n = node(&st)?;
    let old_user: User = read(&n, USERS, &p.user)?
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the user no longer exists"))?;
    if !password_ok_async(req.old_password.clone(), old_user.password_hash.clone()).await? {
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
        vec![Require::equals(USERS, &p.user, json!(old_user))],
        vec![
            put(USERS, &p.user, &user),
            super::events::event("user.password", &p.user, &p.user, "password changed"),
        ],
        |_| "the user changed meanwhile; try again".into(),
    )
    .await?;
    Ok(Json(PasswordChanged { changed: true }))
}

/// Create an API token for the caller. With an `Idempotency-Key`, a retry of a create
/// that made its token is 409 naming that token: its secret is shown once and kept
/// nowhere, so it cannot be given again; revoke the token if the secret was lost.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth", operation_id = "create_token",
    request_body = NewToken,
    params(("Idempotency-Key" = Option<String>, Header,
        min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        description = "Makes a retry safe: a retry of a create that made its token is 409 naming it")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = TokenInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_token(
    State(st): St,
    p: Auth<Administrator>,
    IdempotencyKey(idem_key): IdempotencyKey,
    Body(req): Body<NewToken>,
) -> Result<(StatusCode, Json<TokenInfo>), ApiError> {
    if !tessera_api::limits::TOKEN_LIFETIME_S.contains(&req.expires_in_s) {
        return Err(ApiError::bad("expires_in_s: must be 60 to 31622400"));
    }
    let idem = idem_key.map(|k| Idempotent::new(&p.user, &k, &("token", &req)));
    if let Some(idem) = &idem {
        let n = super::synced(&st).await?;
        if let Some(first) = idem.replay_answer::<TokenInfo>(&n)? {
            return Err(token_made_already(&first));
        }
    }
    let secret = secret_hex(32);
    let id = random_id();
    let t = Session {
        user: p.user.clone(),
        role: req.role.min(p.role),
        expires_ms: now_ms() + req.expires_in_s * 1000,
        kind: "token".into(),
        id: id.clone(),
        credentials: p.credentials.clone(),
    };
    let key = key_of(&secret);
    // What is kept for the key: the token without its secret.
    let info = TokenInfo {
        id: id.clone(),
        user: t.user.clone(),
        role: t.role,
        expires_ms: t.expires_ms,
        token: None,
    };
    let made = commit_idempotent(
        &st,
        info,
        idem.as_ref(),
        vec![Require::absent(TOKENS, &id)],
        vec![
            put(SESSIONS, &key, &t),
            put(TOKENS, &id, &key),
            super::events::event("token.create", &id, &p.user, "API token created"),
        ],
        |_| "token id collision; try again".into(),
    )
    .await?;
    if made.id != id {
        // A concurrent request with the same key made its token first.
        return Err(token_made_already(&made));
    }
    Ok((
        StatusCode::CREATED,
        Json(TokenInfo {
            token: Some(secret),
            ..made
        }),
    ))
}

/// The answer to a retried token create: the token exists, its secret is not kept.
fn token_made_already(first: &TokenInfo) -> ApiError {
    ApiError::conflict(format!(
        "Idempotency-Key: this request already made token {id}; its secret was shown once \
         and is kept nowhere: if it was lost, revoke the token (DELETE /api/v1/tokens/{id}) \
         and create another",
        id = first.id
    ))
}

/// List API tokens (without their secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "auth", operation_id = "list_tokens",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [TokenInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_tokens(
    _: Auth<Administrator>,
    n: Synced,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    let mut out = Vec::new();
    for (id, key) in read_all::<String>(&n, TOKENS)? {
        if let Some(s) = read::<Session>(&n, SESSIONS, &key)? {
            out.push(TokenInfo {
                id,
                user: s.user,
                role: s.role,
                expires_ms: s.expires_ms,
                token: None,
            });
        }
    }
    Ok(Json(out))
}

/// Revoke an API token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "auth", operation_id = "revoke_token",
    params(("id" = String, Path, description = "Token id")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Revoked), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn revoke_token(
    State(st): St,
    p: Auth<Administrator>,
    Param(id): Param<String>,
    n: Synced,
) -> Result<Json<Revoked>, ApiError> {
    let key: String =
        read(&n, TOKENS, &id)?.ok_or_else(|| ApiError::not_found(format!("no token {id}")))?;
    commit(
        &st,
        vec![Require::exists(TOKENS, &id)],
        vec![
            del(SESSIONS, &key),
            del(TOKENS, &id),
            super::events::event("token.revoke", &id, &p.user, "API token revoked"),
        ],
        |_| format!("token {id} was revoked meanwhile"),
    )
    .await?;
    Ok(Json(Revoked { revoked: id }))
}

/// Creates the first administrator (user `admin`) with a random password, once, and
/// writes the password to `file` (mode 0600) and nowhere else: the log names the file,
/// never the password. The file is written (as a temporary) before the user is committed
/// and renamed into place after, so a committed administrator always has its password on
/// disk. The password must be changed at first use.
pub async fn create_first_admin(
    node: std::sync::Arc<tessera_state::Node>,
    file: std::path::PathBuf,
) {
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
    let tmp = file.with_extension("tmp");
    while let Err(e) = write_private_synced(&tmp, &format!("{password}\n")) {
        tracing::error!(error = %e, file = %tmp.display(), "cannot write the initial admin password; retrying in 10 s");
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    }
    let user = User {
        password_hash: hash,
        role: Role::Administrator,
        must_change_password: true,
        credentials: random_id(),
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
            Ok(a) if a.conflict.is_some() => {
                let _ = std::fs::remove_file(&tmp);
                return;
            }
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, "initial admin not written yet");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
    }
    match std::fs::rename(&tmp, &file) {
        Ok(()) => {
            tracing::warn!(user = "admin", file = %file.display(), "initial administrator created; its password is in the file (root only); change it at first login")
        }
        Err(e) => {
            tracing::error!(error = %e, file = %tmp.display(), "initial administrator created, its password is in this file (root only), which could not be renamed")
        }
    }
}

/// Writes `text` to a new file at `path` readable by its owner only, synced.
fn write_private_synced(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A leftover from an earlier attempt may have another mode; start from nothing.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_user_costs_a_full_argon2_check_that_never_succeeds() {
        let h = unknown_user_hash();
        // A real argon2id hash with the same parameters as users' (so the same work),
        // not an empty string that fails to parse at once (the timing oracle of #15).
        let parsed = PasswordHash::new(h).expect("a parsable hash");
        let real = hash_password("some user's password").unwrap();
        let real = PasswordHash::new(&real).unwrap();
        assert_eq!(parsed.algorithm, real.algorithm);
        assert_eq!(parsed.params, real.params);
        assert!(!password_ok("", h));
        assert!(!password_ok("some user's password", h));
        assert_eq!(unknown_user_hash(), h, "made once");
    }
}
