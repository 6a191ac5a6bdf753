//! Two-factor login with TOTP (`super::totp`): a user enrolls an authenticator app
//! (`POST /totp`, the secret sealed like bind passwords), confirms it with one code
//! (`POST /totp/confirm`, which answers recovery codes once, stored as argon2id hashes),
//! and from then on logs in with `totp` as well as the password. A code is accepted one
//! step early or late, and once: the last step used is kept per user and the login's
//! commit requires the record unchanged, so two logins with one code cannot both pass.
//! API tokens are not affected (they are the automation path).
//!
//! `totp/<user>`: [`TotpRecord`] (`user` is `name` or `name@realm`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_api::{Deleted, Role, TotpConfirm, TotpConfirmed, TotpEnrollment};
use tessera_state::{Command, Require};

use super::directory::{self, SealedHex};
use super::events::event;
use super::extract::{Administrator, Auditor, Auth, Body, Param, Synced};
use super::{commit, del, now_ms, put, read, ApiError, ApiState, ErrorBody, St};

/// `totp/<user>`: [`TotpRecord`].
pub const TOTP: &str = "totp";
const RECOVERY_CODES: usize = 8;

/// A user's authenticator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TotpRecord {
    /// The secret, sealed.
    sealed: SealedHex,
    /// Whether a code confirmed it (until then it is not asked at login).
    confirmed: bool,
    /// The last step a code was accepted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_step: Option<u64>,
    /// argon2id hashes of the unused recovery codes.
    #[serde(default)]
    recovery: Vec<String>,
}

fn context(user: &str) -> Vec<u8> {
    format!("tessera totp secret of {user}").into_bytes()
}

fn now_s() -> u64 {
    now_ms() / 1000
}

/// Start enrolling an authenticator app for the caller: a new secret, not asked at login
/// until confirmed. 409 while one is confirmed (delete it first).
#[utoipa::path(post, path = "/api/v1/totp", tag = "auth", operation_id = "enroll_totp",
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = TotpEnrollment), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn enroll(
    State(st): St,
    p: Auth<Auditor>,
    n: Synced,
) -> Result<(StatusCode, Json<TotpEnrollment>), ApiError> {
    let old: Option<TotpRecord> = read(&n, TOTP, &p.user)?;
    if old.as_ref().is_some_and(|o| o.confirmed) {
        return Err(ApiError::conflict(
            "an authenticator is enrolled; DELETE /api/v1/totp first",
        ));
    }
    let mut secret = vec![0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let rec = TotpRecord {
        sealed: directory::seal_bytes(&st, context(&p.user), secret.clone()).await?,
        confirmed: false,
        last_step: None,
        recovery: Vec::new(),
    };
    let require = match &old {
        Some(o) => Require::equals(TOTP, &p.user, json!(o)),
        None => Require::absent(TOTP, &p.user),
    };
    commit(
        &st,
        vec![require],
        vec![
            put(TOTP, &p.user, &rec),
            event(
                "totp.enroll",
                &p.user,
                &p.user,
                "authenticator enrollment started",
            ),
        ],
        |_| "the authenticator changed meanwhile; try again".into(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(TotpEnrollment {
            otpauth_uri: super::totp::otpauth_uri("Tessera", &p.user, &secret),
            secret: super::totp::base32(&secret),
        }),
    ))
}

fn recovery_code() -> String {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}",
        &hex[0..4],
        &hex[4..8],
        &hex[8..12],
        &hex[12..16]
    )
}

/// Confirm the enrollment with a code from the app; answers the recovery codes, once.
#[utoipa::path(post, path = "/api/v1/totp/confirm", tag = "auth", operation_id = "confirm_totp",
    request_body = TotpConfirm,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = TotpConfirmed), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn confirm(
    State(st): St,
    p: Auth<Auditor>,
    n: Synced,
    Body(req): Body<TotpConfirm>,
) -> Result<Json<TotpConfirmed>, ApiError> {
    let old: TotpRecord = read(&n, TOTP, &p.user)?
        .ok_or_else(|| ApiError::not_found("no enrollment: POST /api/v1/totp first"))?;
    if old.confirmed {
        return Err(ApiError::conflict("already confirmed"));
    }
    let secret = directory::open_bytes(&st, context(&p.user), &old.sealed).await?;
    let step = super::totp::verify(&secret, &req.code, now_s(), None)
        // A wrong code is a refused credential, not a malformed request.
        .ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "code: not the app's current code"))?;
    let codes: Vec<String> = (0..RECOVERY_CODES).map(|_| recovery_code()).collect();
    let mut hashes = Vec::new();
    for c in &codes {
        hashes.push(super::auth::hash_password_async(c.clone()).await?);
    }
    let rec = TotpRecord {
        confirmed: true,
        last_step: Some(step),
        recovery: hashes,
        ..old.clone()
    };
    commit(
        &st,
        vec![Require::equals(TOTP, &p.user, json!(old))],
        vec![
            put(TOTP, &p.user, &rec),
            event("totp.confirm", &p.user, &p.user, "two-factor login enabled"),
        ],
        |_| "the enrollment changed meanwhile; start again".into(),
    )
    .await?;
    Ok(Json(TotpConfirmed {
        recovery_codes: codes,
    }))
}

/// Remove the caller's authenticator (logins need the password only again).
#[utoipa::path(delete, path = "/api/v1/totp", tag = "auth", operation_id = "delete_totp",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Deleted), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn remove(State(st): St, p: Auth<Auditor>, n: Synced) -> Result<Json<Deleted>, ApiError> {
    let _: TotpRecord =
        read(&n, TOTP, &p.user)?.ok_or_else(|| ApiError::not_found("no authenticator"))?;
    commit(
        &st,
        vec![Require::exists(TOTP, &p.user)],
        vec![
            del(TOTP, &p.user),
            event("totp.delete", &p.user, &p.user, "two-factor login disabled"),
        ],
        |_| "the authenticator was removed meanwhile".into(),
    )
    .await?;
    Ok(Json(Deleted {
        deleted: p.user.clone(),
    }))
}

/// Remove another user's authenticator (administrators): for a user who lost its app
/// and its recovery codes. Its next login needs the password only (unless the login
/// policy requires a second factor: then it is refused until it enrolls again).
#[utoipa::path(delete, path = "/api/v1/users/{username}/totp", tag = "users",
    operation_id = "delete_user_totp",
    params(("username" = String, Path, description = "`name`, or `name@realm` for a directory user")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove_for(
    State(st): St,
    p: Auth<Administrator>,
    Param(user): Param<String>,
    n: Synced,
) -> Result<Json<Deleted>, ApiError> {
    let _: TotpRecord = read(&n, TOTP, &user)?
        .ok_or_else(|| ApiError::not_found(format!("{user} has no authenticator")))?;
    commit(
        &st,
        vec![Require::exists(TOTP, &user)],
        vec![
            del(TOTP, &user),
            event(
                "totp.delete",
                &user,
                &p.user,
                &format!("authenticator of {user} removed by {}", p.user),
            ),
        ],
        |_| "the authenticator was removed meanwhile".into(),
    )
    .await?;
    tracing::info!(%user, by = %p.user, "authenticator removed by an administrator");
    Ok(Json(Deleted { deleted: user }))
}

/// Whether `user` has a confirmed authenticator.
pub(super) fn enrolled(n: &tessera_state::Node, user: &str) -> Result<bool, ApiError> {
    Ok(read::<TotpRecord>(n, TOTP, user)?.is_some_and(|r| r.confirmed))
}

/// The refusal of a right password without the second factor its user enrolled. The
/// login's answer marks it (`"second_factor": "totp"`) so clients know to ask for a code.
pub(super) const NEEDED: &str = "a second factor is required: send `totp` (the \
    authenticator app's code, or a recovery code)";

/// After a right password: whether `user` (of `realm`, about to get `role`) needs a
/// second factor and `code` is one. Gives what the login's commit must require and write
/// (the step or recovery code used up; the login policy unchanged when it decided). A
/// user the login policy requires to use one who has none is refused (403).
pub(super) async fn check(
    st: &ApiState,
    (user, realm, role): (&str, &str, Role),
    code: Option<&str>,
) -> Result<(Vec<Require>, Vec<Command>), ApiError> {
    let n = super::node(st)?;
    let rec: Option<TotpRecord> = read(&n, TOTP, user)?;
    let Some(rec) = rec.filter(|r| r.confirmed) else {
        let policy = super::login_policy::current(&n)?;
        if policy.requires_two_factor(realm, role) {
            return Err(super::login_policy::refusal(user, realm, role, &policy));
        }
        // Not enrolled meanwhile, and the policy as it was when this was decided.
        let mut require = vec![super::login_policy::unchanged(&n)?];
        require.push(match read::<TotpRecord>(&n, TOTP, user)? {
            Some(r) => Require::equals(TOTP, user, json!(r)),
            None => Require::absent(TOTP, user),
        });
        return Ok((require, Vec::new()));
    };
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let code = code
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| unauthorized(NEEDED))?;
    let require = vec![Require::equals(TOTP, user, json!(rec))];
    let secret = directory::open_bytes(st, context(user), &rec.sealed).await?;
    if let Some(step) = super::totp::verify(&secret, code, now_s(), rec.last_step) {
        let new = TotpRecord {
            last_step: Some(step),
            ..rec.clone()
        };
        return Ok((require, vec![put(TOTP, user, &new)]));
    }
    // Recovery codes are longer than app codes: only those cost argon2 checks.
    if code.len() > super::totp::DIGITS as usize {
        for (i, h) in rec.recovery.iter().enumerate() {
            if super::auth::password_ok_async(code.to_string(), h.clone()).await? {
                let mut new = rec.clone();
                new.recovery.remove(i);
                let left = new.recovery.len();
                tracing::info!(%user, left, "login with a recovery code");
                return Ok((require, vec![put(TOTP, user, &new)]));
            }
        }
    }
    Err(unauthorized("wrong or already used second factor code"))
}
