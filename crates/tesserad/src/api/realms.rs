//! Realms (administrators only): LDAP directories users log in from as `user@realm`,
//! their CRUD, a `test` that binds and shows what a sample user would get, and the sync
//! that checks directory users again (every realm's interval on the leader, or on demand)
//! and ends the sessions of those whose role changed or who lost access.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use tessera_api::{Deleted, Realm, RealmSynced, RealmTest, RealmTestReply, Role};
use tessera_state::{Command, Require};

use super::directory::{self, DirectoryUser, RealmRecord, DIRECTORY_USERS, REALMS};
use super::events::event;
use super::extract::{Administrator, Auth, Body, Param, Synced};
use super::{check_name, commit, del, put, read, read_all, ApiError, ApiState, ErrorBody, St};
use crate::records::table::SESSIONS;
use crate::records::Session;

/// The realm of the cluster's own users.
pub const LOCAL: &str = "local";
const DEFAULT_SYNC_S: u64 = 300;

fn no_realm(name: &str) -> ApiError {
    ApiError::not_found(format!("no realm {name}"))
}

fn shown(rec: &RealmRecord) -> Realm {
    let mut r = rec.realm.clone();
    r.bind_password = None;
    r.has_bind_password = rec.sealed_bind_password.is_some();
    r
}

/// The record to store for `r`; `old`'s sealed password is kept when `r` gives none.
async fn record(
    st: &ApiState,
    mut r: Realm,
    old: Option<&RealmRecord>,
) -> Result<RealmRecord, ApiError> {
    check_name("name", &r.name, &[])?;
    if r.name == LOCAL {
        // The built-in realm exists already: a clash, like any other taken name.
        return Err(ApiError::conflict(
            "name: `local` is the cluster's own users",
        ));
    }
    // A password without a DN to bind as would never be used: not kept.
    if r.bind_dn.is_none() {
        r.bind_password = None;
    }
    directory::check(&r)?;
    let sealed = match r.bind_password.take() {
        Some(pw) => Some(directory::seal(st, &r.name, &pw).await?),
        None if r.bind_dn.is_some() => old.and_then(|o| o.sealed_bind_password.clone()),
        None => None,
    };
    r.has_bind_password = sealed.is_some();
    Ok(RealmRecord {
        realm: r,
        sealed_bind_password: sealed,
    })
}

/// List realms.
#[utoipa::path(get, path = "/api/v1/realms", tag = "realms", operation_id = "list_realms",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Realm]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(_: Auth<Administrator>, n: Synced) -> Result<Json<Vec<Realm>>, ApiError> {
    Ok(Json(
        read_all::<RealmRecord>(&n, REALMS)?
            .iter()
            .map(|(_, r)| shown(r))
            .collect(),
    ))
}

/// Create an LDAP realm (its bind password is stored sealed).
#[utoipa::path(post, path = "/api/v1/realms", tag = "realms", operation_id = "create_realm",
    request_body = Realm,
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = Realm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    p: Auth<Administrator>,
    Body(req): Body<Realm>,
) -> Result<(StatusCode, Json<Realm>), ApiError> {
    let rec = record(&st, req, None).await?;
    let name = rec.realm.name.clone();
    commit(
        &st,
        vec![Require::absent(REALMS, &name)],
        vec![
            put(REALMS, &name, &rec),
            event("realm.create", &name, &p.user, "realm created"),
        ],
        |_| format!("name: realm {name} already exists"),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(shown(&rec))))
}

/// Show a realm.
#[utoipa::path(get, path = "/api/v1/realms/{name}", tag = "realms", operation_id = "show_realm",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Realm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    _: Auth<Administrator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Realm>, ApiError> {
    let rec: RealmRecord = read(&n, REALMS, &name)?.ok_or_else(|| no_realm(&name))?;
    Ok(Json(shown(&rec)))
}

/// Replace a realm's settings (`bind_password` absent: the stored one is kept).
#[utoipa::path(put, path = "/api/v1/realms/{name}", tag = "realms", operation_id = "replace_realm",
    params(("name" = String, Path)), request_body = Realm,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Realm), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn replace(
    State(st): St,
    p: Auth<Administrator>,
    Param(name): Param<String>,
    n: Synced,
    Body(req): Body<Realm>,
) -> Result<Json<Realm>, ApiError> {
    if req.name != name {
        return Err(ApiError::bad("name: must be the realm's name in the path"));
    }
    let old: RealmRecord = read(&n, REALMS, &name)?.ok_or_else(|| no_realm(&name))?;
    let rec = record(&st, req, Some(&old)).await?;
    commit(
        &st,
        vec![Require::equals(REALMS, &name, json!(old))],
        vec![
            put(REALMS, &name, &rec),
            event("realm.update", &name, &p.user, "realm changed"),
        ],
        |_| format!("realm {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(shown(&rec)))
}

/// Delete a realm: its users' sessions end and their records go.
#[utoipa::path(delete, path = "/api/v1/realms/{name}", tag = "realms", operation_id = "delete_realm",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Administrator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Deleted>, ApiError> {
    let _: RealmRecord = read(&n, REALMS, &name)?.ok_or_else(|| no_realm(&name))?;
    let policy = super::login_policy::current(&n)?;
    if policy.default_realm == name || policy.two_factor_realms.contains(&name) {
        return Err(ApiError::conflict(format!(
            "realm {name} is named in the login policy (as the default realm or one \
             requiring a second factor): change the policy first (PUT /api/v1/login-policy)"
        )));
    }
    let mut ops = vec![
        del(REALMS, &name),
        event("realm.delete", &name, &p.user, "realm deleted"),
    ];
    for (key, u) in read_all::<DirectoryUser>(&n, DIRECTORY_USERS)? {
        if u.realm == name {
            ops.extend(end_user(&n, &key)?);
        }
    }
    let require = vec![
        Require::exists(REALMS, &name),
        super::login_policy::unchanged(&n)?,
    ];
    commit(&st, require, ops, |_| {
        format!("realm {name} or the login policy changed meanwhile; try again")
    })
    .await?;
    Ok(Json(Deleted { deleted: name }))
}

/// Try a realm: bind, find a sample user and its groups and role, and (given a
/// password) check it. Saves nothing.
#[utoipa::path(post, path = "/api/v1/realms/{name}/test", tag = "realms",
    operation_id = "test_realm",
    params(("name" = String, Path)), request_body = RealmTest,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = RealmTestReply), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn test(
    State(st): St,
    _: Auth<Administrator>,
    Param(name): Param<String>,
    n: Synced,
    Body(req): Body<RealmTest>,
) -> Result<Json<RealmTestReply>, ApiError> {
    let rec: RealmRecord = read(&n, REALMS, &name)?.ok_or_else(|| no_realm(&name))?;
    let pw = directory::bind_password(&st, &rec).await?;
    let mut c = directory::connect(&rec.realm, pw.as_deref()).await?;
    let found = directory::lookup(&mut c, &rec.realm, &req.username).await?;
    let password_ok = match (&req.password, &found.dn) {
        (Some(p), Some(dn)) => Some(c.check_password(dn, p).await?),
        (Some(_), None) => Some(false),
        (None, _) => None,
    };
    let server = c.server.clone();
    c.close().await;
    Ok(Json(RealmTestReply {
        server,
        dn: found.dn,
        groups: found.groups,
        role: found.role,
        password_ok,
    }))
}

/// Check a realm's directory users again now; those whose role changed or who lost
/// access have their sessions ended.
#[utoipa::path(post, path = "/api/v1/realms/{name}/sync", tag = "realms",
    operation_id = "sync_realm",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = RealmSynced), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn sync(
    State(st): St,
    p: Auth<Administrator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<RealmSynced>, ApiError> {
    let rec: RealmRecord = read(&n, REALMS, &name)?.ok_or_else(|| no_realm(&name))?;
    sync_realm(&st, &rec, &p.user).await.map(Json)
}

/// The deletions that end directory user `key`'s sessions and its record.
fn end_user(n: &tessera_state::Node, key: &str) -> Result<Vec<Command>, ApiError> {
    let mut ops = vec![del(DIRECTORY_USERS, key)];
    ops.extend(end_sessions(n, key)?);
    Ok(ops)
}

/// The deletions of `user`'s login sessions (its API tokens stop working through the
/// credentials id instead; their records go with the housekeeping of expired ones).
fn end_sessions(n: &tessera_state::Node, user: &str) -> Result<Vec<Command>, ApiError> {
    Ok(read_all::<Session>(n, SESSIONS)?
        .into_iter()
        .filter(|(_, s)| s.user == user)
        .map(|(k, _)| del(SESSIONS, &k))
        .collect())
}

/// Checks every directory user of `rec`'s realm against the directory: a user no longer
/// found or without a mapped role loses its record and sessions; one whose role changed
/// gets the new role and new credentials (its sessions end; the next login gets the new
/// role). Nothing changes when the directory cannot be reached.
async fn sync_realm(st: &ApiState, rec: &RealmRecord, by: &str) -> Result<RealmSynced, ApiError> {
    let n = super::synced(st).await?;
    let users: Vec<(String, DirectoryUser)> = read_all::<DirectoryUser>(&n, DIRECTORY_USERS)?
        .into_iter()
        .filter(|(_, u)| u.realm == rec.realm.name)
        .collect();
    let mut changed = Vec::new();
    if users.is_empty() {
        return Ok(RealmSynced {
            checked: 0,
            changed,
        });
    }
    let pw = directory::bind_password(st, rec).await?;
    let mut c = directory::connect(&rec.realm, pw.as_deref()).await?;
    for (key, old) in &users {
        let Some((name, _)) = key.rsplit_once('@') else {
            continue;
        };
        let now = directory::lookup(&mut c, &rec.realm, name).await?;
        let (require, mut ops, what) = match (now.dn, now.role) {
            (Some(dn), Some(role)) if role == old.role => {
                if dn == old.dn && now.groups == old.groups {
                    continue;
                }
                // Same role, other groups: record them, keep the sessions.
                let u = DirectoryUser {
                    dn,
                    groups: now.groups,
                    ..old.clone()
                };
                let r = vec![Require::equals(DIRECTORY_USERS, key, json!(old))];
                (r, vec![put(DIRECTORY_USERS, key, &u)], None)
            }
            (Some(dn), Some(role)) => {
                let u = DirectoryUser {
                    realm: old.realm.clone(),
                    dn,
                    role,
                    groups: now.groups,
                    credentials: super::auth::random_id(),
                };
                let mut ops = vec![put(DIRECTORY_USERS, key, &u)];
                ops.extend(end_sessions(&n, key)?);
                let r = vec![Require::equals(DIRECTORY_USERS, key, json!(old))];
                (
                    r,
                    ops,
                    Some(format!("role {:?} -> {role:?}: sessions ended", old.role)),
                )
            }
            _ => {
                let r = vec![Require::equals(DIRECTORY_USERS, key, json!(old))];
                let what = "no longer in the directory or without a mapped group: sessions ended";
                (r, end_user(&n, key)?, Some(what.to_string()))
            }
        };
        if let Some(w) = &what {
            ops.push(event("realm.sync", key, by, w));
            changed.push(key.clone());
            tracing::info!(user = %key, change = %w, "directory sync");
        }
        // A conflict: the user logged in again meanwhile; the next sync looks again.
        commit(st, require, ops, |_| String::new())
            .await
            .or_else(|e| {
                if e.0 == StatusCode::CONFLICT {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
    }
    c.close().await;
    Ok(RealmSynced {
        checked: users.len(),
        changed,
    })
}

/// Runs each realm's sync at its interval, on the leader only, until the process ends.
pub fn start_sync(st: Arc<ApiState>) {
    tokio::spawn(async move {
        let mut last: HashMap<String, Instant> = HashMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let Ok(n) = super::node(&st) else { continue };
            if n.raft.metrics().borrow().current_leader != Some(n.id) {
                continue;
            }
            let realms = match read_all::<RealmRecord>(&n, REALMS) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e.1, "realms unreadable; no directory sync");
                    continue;
                }
            };
            for (name, rec) in realms {
                let every =
                    Duration::from_secs(rec.realm.sync_interval_s.unwrap_or(DEFAULT_SYNC_S));
                let due = last.get(&name).is_none_or(|t| t.elapsed() >= every);
                if !due {
                    continue;
                }
                last.insert(name.clone(), Instant::now());
                match sync_realm(&st, &rec, "tesserad").await {
                    Ok(s) if !s.changed.is_empty() => {
                        tracing::info!(realm = %name, changed = ?s.changed, "directory sync ended sessions")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(realm = %name, error = %e.1, "directory sync failed; will try at the next interval")
                    }
                }
            }
        }
    });
}

/// A directory login: `name` in realm `realm` with `password`. Refuses an empty password
/// before talking to the directory (an LDAP bind with a DN and no password is an
/// "unauthenticated bind" that succeeds). Returns the session's user (`name@realm`) and
/// its record, written here.
pub(super) async fn login(
    st: &ApiState,
    peer: Option<std::net::IpAddr>,
    name: &str,
    realm: &str,
    password: &str,
) -> Result<(String, DirectoryUser), ApiError> {
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "invalid username or password");
    let key = format!("{name}@{realm}");
    if directory::looks_like_injection(name) {
        tracing::warn!(user = ?name, %realm, ?peer, "directory login with LDAP filter characters in the name (escaped; an injection attempt?)");
    }
    if password.is_empty() || name.is_empty() {
        return Err(refused());
    }
    let Some(rec) = directory::realm(st, realm).await? else {
        return Err(refused());
    };
    let pw = directory::bind_password(st, &rec).await?;
    let mut c = directory::connect(&rec.realm, pw.as_deref()).await?;
    let found = directory::lookup(&mut c, &rec.realm, name).await?;
    let Some(dn) = found.dn else {
        tracing::info!(user = ?name, %realm, ?peer, "directory login: no such user");
        c.close().await;
        return Err(refused());
    };
    let ok = c.check_password(&dn, password).await?;
    c.close().await;
    if !ok {
        return Err(refused());
    }
    let Some(role) = found.role else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{key}: none of the user's groups maps to a role in realm {realm}"),
        ));
    };
    let n = super::node(st)?;
    let old: Option<DirectoryUser> = read(&n, DIRECTORY_USERS, &key)?;
    let credentials = match &old {
        Some(o) if o.dn == dn && o.role == role => o.credentials.clone(),
        _ => super::auth::random_id(),
    };
    let user = DirectoryUser {
        realm: realm.to_string(),
        dn,
        role,
        groups: found.groups,
        credentials,
    };
    Ok((key, user))
}

/// The role and credentials id of directory user `key` (`name@realm`), if it has a record.
pub(super) fn account(
    n: &tessera_state::Node,
    key: &str,
) -> Result<Option<(Role, String)>, ApiError> {
    Ok(read::<DirectoryUser>(n, DIRECTORY_USERS, key)?.map(|u| (u.role, u.credentials)))
}
