//! Tasks: every long operation is one, with state, progress and a log.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use tessera_state::Require;
use utoipa::IntoParams;

use super::auth::{authorize, random_id, Principal, Role};
use super::{all, now_ms, put, synced, ApiError, ApiState, ErrorBody, St};
use crate::records::{Task, TaskLog, TaskOp, TaskState};

/// Which tasks.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TaskQuery {
    /// Only tasks in this state.
    state: Option<TaskState>,
}

/// Tasks, oldest first.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(TaskQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Task]), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(st): St,
    headers: HeaderMap,
    q: Result<Query<TaskQuery>, QueryRejection>,
) -> Result<Json<Vec<Task>>, ApiError> {
    authorize(&st, &headers, Role::Auditor, false).await?;
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let n = synced(&st).await?;
    let mut out: Vec<Task> = all::<Task>(&n, "tasks")
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| q.state.is_none_or(|s| t.state == s))
        .collect();
    out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(Json(out))
}

/// One task.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Task), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): St,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Task>, ApiError> {
    super::show_one(&st, &headers, id, "tasks", "task").await
}

/// A new queued task for `node` (not yet committed: the caller commits it together with
/// the records it reserves).
pub fn queued(p: &Principal, node: &str, op: TaskOp) -> Task {
    let now = now_ms();
    Task {
        id: format!("{now:013}-{}", random_id()),
        op,
        node: node.into(),
        user: p.user.clone(),
        state: TaskState::Queued,
        progress: 0,
        log: vec![TaskLog {
            time_ms: now,
            message: format!("queued for node {node} by {}", p.user),
        }],
        error: None,
        created_ms: now,
        finished_ms: None,
    }
}

/// Commits a task with the records it reserves; the task's own id must be free.
pub async fn submit(
    st: &ApiState,
    task: &Task,
    mut require: Vec<Require>,
    mut ops: Vec<tessera_state::Command>,
    conflict: impl FnOnce(&Require) -> String,
) -> Result<(), ApiError> {
    require.push(Require::absent("tasks", &task.id));
    ops.push(put("tasks", &task.id, task));
    super::commit(st, require, ops, conflict).await
}
