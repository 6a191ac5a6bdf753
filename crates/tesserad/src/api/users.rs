//! User management (administrators only): list, create, change role or reset the
//! password, delete. The last administrator cannot be deleted or demoted, and nobody can
//! delete themselves.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_state::Require;
use utoipa::ToSchema;

use super::auth::{authorize, check_password, hash_password_async, Role, User};
use super::events::event;
use super::{all, body, check_name, commit, del, get, path, put, synced, ApiError, ErrorBody, St};

/// A user, without secrets.
#[derive(Serialize, ToSchema)]
pub struct UserInfo {
    username: String,
    role: Role,
    must_change_password: bool,
}

/// A new user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// 1-63 of a-z, 0-9, '-', '.', '_'.
    username: String,
    /// Initial password (12+ characters); the user must change it at first login.
    password: String,
    role: Role,
}

/// Changes to a user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    role: Option<Role>,
    /// A new password, which the user must change at next login.
    password: Option<String>,
}

fn info(username: String, u: &User) -> UserInfo {
    UserInfo {
        username,
        role: u.role,
        must_change_password: u.must_change_password,
    }
}

/// List users.
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [UserInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn list(State(st): St, headers: HeaderMap) -> Result<Json<Vec<UserInfo>>, ApiError> {
    authorize(&st, &headers, Role::Administrator, false).await?;
    let n = synced(&st).await?;
    Ok(Json(
        all::<User>(&n, "users")
            .into_iter()
            .map(|(k, u)| info(k, &u))
            .collect(),
    ))
}

/// Create a user.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = UserInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<UserInfo>), ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let req = body(b)?;
    check_name("username", &req.username, b"._")?;
    check_password("password", &req.password)?;
    let user = User {
        password_hash: hash_password_async(req.password).await?,
        role: req.role,
        must_change_password: true,
    };
    commit(
        &st,
        vec![Require::absent("users", &req.username)],
        vec![
            put("users", &req.username, &user),
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
    Ok((StatusCode::CREATED, Json(info(req.username, &user))))
}

fn administrators(n: &tessera_state::Node) -> Vec<String> {
    all::<User>(n, "users")
        .into_iter()
        .filter(|(_, u)| u.role == Role::Administrator)
        .map(|(k, _)| k)
        .collect()
}

/// Change a user's role, or reset its password.
#[utoipa::path(patch, path = "/api/v1/users/{username}", tag = "users",
    params(("username" = String, Path)), request_body = UserUpdate,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = UserInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    b: Result<Json<UserUpdate>, JsonRejection>,
) -> Result<Json<UserInfo>, ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let name = path(name)?;
    let req = body(b)?;
    let n = synced(&st).await?;
    let old: User =
        get(&n, "users", &name).ok_or_else(|| ApiError::not_found(format!("no user {name}")))?;
    let mut user = old.clone();
    let mut require = vec![Require::equals("users", &name, json!(old))];
    if let Some(role) = req.role {
        if old.role == Role::Administrator && role != Role::Administrator {
            let admins = administrators(&n);
            if admins.len() <= 1 {
                return Err(ApiError::conflict(
                    "role: cannot demote the last administrator",
                ));
            }
            // Another administrator must still be there when this applies.
            if let Some(other) = admins.iter().find(|a| **a != name) {
                require.push(Require::exists("users", other));
            }
        }
        user.role = role;
    }
    if let Some(pw) = req.password {
        check_password("password", &pw)?;
        user.password_hash = hash_password_async(pw).await?;
        user.must_change_password = true;
    }
    commit(
        &st,
        require,
        vec![
            put("users", &name, &user),
            event("user.update", &name, &p.user, "user changed"),
        ],
        |_| format!("user {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(info(name, &user)))
}

/// Delete a user (its sessions and tokens stop working at once).
#[utoipa::path(delete, path = "/api/v1/users/{username}", tag = "users",
    params(("username" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "Deleted"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = authorize(&st, &headers, Role::Administrator, false).await?;
    let name = path(name)?;
    if name == p.user {
        return Err(ApiError::conflict("you cannot delete yourself"));
    }
    let n = synced(&st).await?;
    let old: User =
        get(&n, "users", &name).ok_or_else(|| ApiError::not_found(format!("no user {name}")))?;
    let mut require = vec![Require::exists("users", &name)];
    if old.role == Role::Administrator {
        // The caller is an administrator too; it must still be one when this applies.
        require.push(Require::exists("users", &p.user));
    }
    commit(
        &st,
        require,
        vec![
            del("users", &name),
            event("user.delete", &name, &p.user, "user deleted"),
        ],
        |_| format!("user {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(json!({ "deleted": name })))
}
