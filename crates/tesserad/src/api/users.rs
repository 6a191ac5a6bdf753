//! User management (administrators only): list, create, change role or reset the
//! password, delete. The last administrator cannot be deleted or demoted, and nobody can
//! delete themselves.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use tessera_api::{Deleted, NewUser, UserInfo, UserUpdate};
use tessera_state::Require;

use super::auth::{check_password, hash_password_async, Role, User};
use super::events::event;
use super::extract::{Administrator, Auth, Body, IdempotencyKey, Param, Synced};
use super::tasks::{commit_idempotent, Idempotent};
use super::{check_name, commit, del, put, read, read_all, ApiError, ErrorBody, St};
use crate::records::table::USERS;

fn info(username: String, u: &User) -> UserInfo {
    UserInfo {
        username,
        role: u.role,
        must_change_password: u.must_change_password,
    }
}

fn no_user(name: &str) -> ApiError {
    ApiError::not_found(format!("no user {name}"))
}

/// List users.
#[utoipa::path(get, path = "/api/v1/users", tag = "users", operation_id = "list_users",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [UserInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(_: Auth<Administrator>, n: Synced) -> Result<Json<Vec<UserInfo>>, ApiError> {
    Ok(Json(
        read_all::<User>(&n, USERS)?
            .into_iter()
            .map(|(k, u)| info(k, &u))
            .collect(),
    ))
}

/// Create a user.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", operation_id = "create_user",
    request_body = NewUser,
    params(("Idempotency-Key" = Option<String>, Header,
        min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        description = "Makes a retry safe: the same key and body get the first answer")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = UserInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    p: Auth<Administrator>,
    IdempotencyKey(key): IdempotencyKey,
    Body(req): Body<NewUser>,
) -> Result<(StatusCode, Json<UserInfo>), ApiError> {
    check_name("username", &req.username, b"._")?;
    check_password("password", &req.password)?;
    // The key binds the username and role, not the password: no fast hash of a password
    // is kept in the replicated state.
    let idem = key.map(|k| Idempotent::new(&p.user, &k, &("user", &req.username, req.role)));
    if let Some(idem) = &idem {
        let n = super::synced(&st).await?;
        if let Some(first) = idem.replay_answer(&n)? {
            return Ok((StatusCode::CREATED, Json(first)));
        }
    }
    let user = User {
        password_hash: hash_password_async(req.password).await?,
        role: req.role,
        must_change_password: true,
        credentials: super::auth::random_id(),
    };
    let answer = commit_idempotent(
        &st,
        info(req.username.clone(), &user),
        idem.as_ref(),
        vec![Require::absent(USERS, &req.username)],
        vec![
            put(USERS, &req.username, &user),
            event(
                "user.create",
                &req.username,
                &p.user,
                &format!("user created with role {:?}", req.role),
            ),
        ],
        |_| format!("username: {} already exists", req.username),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

fn administrators(n: &tessera_state::Node) -> Result<Vec<String>, ApiError> {
    Ok(read_all::<User>(n, USERS)?
        .into_iter()
        .filter(|(_, u)| u.role == Role::Administrator)
        .map(|(k, _)| k)
        .collect())
}

/// Change a user's role, or reset its password.
#[utoipa::path(patch, path = "/api/v1/users/{username}", tag = "users",
    operation_id = "update_user",
    params(("username" = String, Path)), request_body = UserUpdate,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = UserInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn update(
    State(st): St,
    p: Auth<Administrator>,
    Param(name): Param<String>,
    n: Synced,
    Body(req): Body<UserUpdate>,
) -> Result<Json<UserInfo>, ApiError> {
    let old: User = read(&n, USERS, &name)?.ok_or_else(|| no_user(&name))?;
    let mut user = old.clone();
    let mut require = vec![Require::equals(USERS, &name, json!(old))];
    if let Some(role) = req.role {
        if old.role == Role::Administrator && role != Role::Administrator {
            let admins = administrators(&n)?;
            if admins.len() <= 1 {
                return Err(ApiError::conflict(
                    "role: cannot demote the last administrator",
                ));
            }
            // Another administrator must still be one when this applies: two demoting
            // each other at once must not both succeed, so its record must be unchanged.
            if let Some(other) = admins.iter().find(|a| **a != name) {
                let record: Option<User> = read(&n, USERS, other)?;
                match record {
                    Some(r) => require.push(Require::equals(USERS, other, json!(r))),
                    None => require.push(Require::exists(USERS, other)),
                }
            }
        }
        user.role = role;
    }
    if let Some(pw) = req.password {
        check_password("password", &pw)?;
        user.password_hash = hash_password_async(pw).await?;
        user.must_change_password = true;
        // A reset revokes every session and token the user had.
        user.credentials = super::auth::random_id();
    }
    commit(
        &st,
        require,
        vec![
            put(USERS, &name, &user),
            event("user.update", &name, &p.user, "user changed"),
        ],
        |_| format!("user {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(info(name, &user)))
}

/// Delete a user (its sessions and tokens stop working at once).
#[utoipa::path(delete, path = "/api/v1/users/{username}", tag = "users",
    operation_id = "delete_user",
    params(("username" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Administrator>,
    Param(name): Param<String>,
) -> Result<Json<Deleted>, ApiError> {
    if name == p.user {
        return Err(ApiError::conflict("you cannot delete yourself"));
    }
    let n = super::synced(&st).await?;
    let old: User = read(&n, USERS, &name)?.ok_or_else(|| no_user(&name))?;
    let mut require = vec![Require::exists(USERS, &name)];
    if old.role == Role::Administrator {
        // The caller is an administrator too; it must still be one when this applies (its
        // record unchanged: demoted meanwhile by the administrator deleted here, it would
        // leave the cluster without one).
        let caller: Option<User> = read(&n, USERS, &p.user)?;
        match caller {
            Some(r) => require.push(Require::equals(USERS, &p.user, json!(r))),
            None => require.push(Require::exists(USERS, &p.user)),
        }
    }
    commit(
        &st,
        require,
        vec![
            del(USERS, &name),
            event("user.delete", &name, &p.user, "user deleted"),
        ],
        |_| format!("user {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(Deleted { deleted: name }))
}
