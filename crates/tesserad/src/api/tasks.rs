//! Tasks: every long operation is one, with state, progress and a log.

use axum::Json;
use tessera_api::TaskQuery;
use tessera_state::Require;

use super::auth::{random_id, Principal};
use super::extract::{Auditor, Auth, Param, Synced, Q};
use super::{now_ms, put, read_all, ApiError, ApiState, ErrorBody};
use crate::records::table::TASKS;
use crate::records::{Task, TaskLog, TaskOp, TaskState};

/// Tasks, oldest first.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", operation_id = "list_tasks",
    params(TaskQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Task]), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn list(
    _: Auth<Auditor>,
    Q(q): Q<TaskQuery>,
    n: Synced,
) -> Result<Json<Vec<Task>>, ApiError> {
    let mut out: Vec<Task> = read_all::<Task>(&n, TASKS)?
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| q.state.is_none_or(|s| t.state == s))
        .collect();
    out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(Json(out))
}

/// One task.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks", operation_id = "get_task",
    params(("id" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    _: Auth<Auditor>,
    Param(id): Param<String>,
    n: Synced,
) -> Result<Json<Task>, ApiError> {
    super::show_one(&n, TASKS, &id, "task")
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
    require.push(Require::absent(TASKS, &task.id));
    ops.push(put(TASKS, &task.id, task));
    super::commit(st, require, ops, conflict).await
}
