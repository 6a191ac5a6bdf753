//! Users, sessions and API tokens, all in the replicated state.
//!
//! - `users/<name>`: argon2id password hash, role, whether the password must change.
//! - `sessions/<blake3 of the secret>`: a login session or an API token: user, role,
//!   expiry, kind and id. Secrets are never stored.
//! - `tokens/<id>`: the session key of an API token, for revocation.
//!
//! Roles are ordered Auditor < Operator < Administrator; an endpoint names the least role
//! it needs. A session whose user must change the password may only change it.

use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tessera_state::Command;

use super::{body, node, ApiError, ApiState, IdPath, St};

/// What a principal may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
struct User {
    password_hash: String,
    role: Role,
    must_change_password: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    user: String,
    role: Role,
    expires_ms: u64,
    kind: String,
    id: String,
}

const SESSION_MS: u64 = 8 * 3600 * 1000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn secret_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key_of(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

fn hash_password(pw: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("hashing: {e}")))
}

fn password_ok(pw: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .is_ok_and(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
}

fn record<T: serde::de::DeserializeOwned>(
    st: &ApiState,
    table: &str,
    key: &str,
) -> Result<Option<T>, ApiError> {
    let n = node(st)?;
    Ok(n.state
        .read(|t| t.get(table).and_then(|t| t.get(key)).cloned())
        .and_then(|v| serde_json::from_value(v).ok()))
}

async fn linearizable<T: serde::de::DeserializeOwned>(
    st: &ApiState,
    table: &str,
    key: &str,
) -> Result<Option<T>, ApiError> {
    let v = node(st)?
        .read_linearizable(table, key)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(v.and_then(|v| serde_json::from_value(v).ok()))
}

async fn write(st: &ApiState, cmd: Command) -> Result<(), ApiError> {
    node(st)?
        .write(cmd)
        .await
        .map(|_| ())
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

/// Checks the bearer credentials of a request: 401 without valid ones, 403 when the role
/// is too small or the password must change first.
pub async fn authorize(
    st: &ApiState,
    headers: &HeaderMap,
    least: Role,
    allow_must_change: bool,
) -> Result<Session, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let secret = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("missing credentials (Authorization: Bearer <token>)"))?;
    let key = key_of(secret.trim());
    let mut session: Option<Session> = record(st, "sessions", &key)?;
    if session.is_none() {
        // Logged in on another node a moment ago? Ask the leader.
        session = linearizable(st, "sessions", &key).await?;
    }
    let s = session.ok_or_else(|| unauthorized("invalid, expired or revoked credentials"))?;
    if s.expires_ms <= now_ms() {
        return Err(unauthorized("invalid, expired or revoked credentials"));
    }
    if !allow_must_change {
        let user: Option<User> = record(st, "users", &s.user)?;
        if user.is_some_and(|u| u.must_change_password) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "password change required (POST /api/v1/password)",
            ));
        }
    }
    if s.role < least {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("requires the {least:?} role"),
        ));
    }
    Ok(s)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    username: String,
    password: String,
}

pub async fn login(
    State(st): St,
    b: Result<Json<Login>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(b)?;
    let mut user: Option<User> = record(&st, "users", &req.username)?;
    if user.is_none() {
        // Created through another node a moment ago? Ask the leader.
        user = linearizable(&st, "users", &req.username).await?;
    }
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_default();
    let pw = req.password.clone();
    // Verify even for unknown users so timing does not tell which names exist.
    let ok = tokio::task::spawn_blocking(move || password_ok(&pw, &hash))
        .await
        .unwrap_or(false);
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
        id: secret_hex(8),
    };
    write(
        &st,
        Command::Put {
            table: "sessions".into(),
            key: key_of(&secret),
            value: json!(s),
        },
    )
    .await?;
    Ok(Json(
        json!({ "token": secret, "expires_ms": s.expires_ms, "must_change_password": user.must_change_password }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    old_password: String,
    new_password: String,
}

pub async fn change_password(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let s = authorize(&st, &headers, Role::Auditor, true).await?;
    let req = body(b)?;
    if req.new_password.chars().count() < 12 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "new_password: at least 12 characters",
        ));
    }
    let mut user: User = record(&st, "users", &s.user)?
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the user no longer exists"))?;
    let (old, hash) = (req.old_password.clone(), user.password_hash.clone());
    if !tokio::task::spawn_blocking(move || password_ok(&old, &hash))
        .await
        .unwrap_or(false)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "old_password is wrong",
        ));
    }
    let new = req.new_password.clone();
    user.password_hash = tokio::task::spawn_blocking(move || hash_password(&new))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    user.must_change_password = false;
    write(
        &st,
        Command::Put {
            table: "users".into(),
            key: s.user.clone(),
            value: json!(user),
        },
    )
    .await?;
    Ok(Json(json!({ "changed": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    role: Role,
    expires_in_s: u64,
}

pub async fn create_token(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let s = authorize(&st, &headers, Role::Administrator, false).await?;
    let req = body(b)?;
    if !(60..=366 * 24 * 3600).contains(&req.expires_in_s) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "expires_in_s: must be 60 to 31622400",
        ));
    }
    let secret = secret_hex(32);
    let id = secret_hex(8);
    let t = Session {
        user: s.user,
        role: req.role.min(s.role),
        expires_ms: now_ms() + req.expires_in_s * 1000,
        kind: "token".into(),
        id: id.clone(),
    };
    let key = key_of(&secret);
    write(
        &st,
        Command::Put {
            table: "sessions".into(),
            key: key.clone(),
            value: json!(t),
        },
    )
    .await?;
    write(
        &st,
        Command::Put {
            table: "tokens".into(),
            key: id.clone(),
            value: json!(key),
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "token": secret, "role": t.role, "expires_ms": t.expires_ms })),
    ))
}

pub async fn revoke_token(
    State(st): St,
    headers: HeaderMap,
    id: IdPath,
) -> Result<Json<Value>, ApiError> {
    authorize(&st, &headers, Role::Administrator, false).await?;
    let key: String = record(&st, "tokens", &id.0)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no token {}", id.0)))?;
    write(
        &st,
        Command::Delete {
            table: "sessions".into(),
            key,
        },
    )
    .await?;
    write(
        &st,
        Command::Delete {
            table: "tokens".into(),
            key: id.0.clone(),
        },
    )
    .await?;
    Ok(Json(json!({ "revoked": id.0 })))
}

/// Creates the first administrator (user `admin`) with a random password, once, and
/// writes the password to `file` (mode 0600) and the log. The password must be changed
/// at first use.
pub async fn create_first_admin(
    node: std::sync::Arc<tessera_state::Node>,
    file: std::path::PathBuf,
) {
    use std::os::unix::fs::OpenOptionsExt;
    let exists = |n: &tessera_state::Node| {
        n.state
            .read(|t| t.get("users").is_some_and(|u| u.contains_key("admin")))
    };
    let alphabet: Vec<char> = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
        .chars()
        .collect();
    let password: String = (0..20)
        .map(|_| alphabet[rand::rngs::OsRng.gen_range(0..alphabet.len())])
        .collect();
    let Ok(Ok(hash)) = tokio::task::spawn_blocking({
        let pw = password.clone();
        move || hash_password(&pw).map_err(|e| e.1)
    })
    .await
    else {
        tracing::error!("could not hash the initial admin password");
        return;
    };
    let user = User {
        password_hash: hash,
        role: Role::Administrator,
        must_change_password: true,
    };
    loop {
        if exists(&node) {
            return;
        }
        match node
            .write(Command::Put {
                table: "users".into(),
                key: "admin".into(),
                value: json!(user),
            })
            .await
        {
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
