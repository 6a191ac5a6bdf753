//! Tasks: every long operation is one, with state, progress and a log.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A task's life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for its node to pick it up.
    Queued,
    /// Being done.
    Running,
    /// Done.
    Succeeded,
    /// Failed; see `error`.
    Failed,
}

/// What a task does: the operation it asks its node's `tessera-store` for. One definition
/// with the store's admin protocol, so a task shows exactly what the store was asked.
pub use tessera_store_admin::AdminOp as TaskOp;

/// A line of a task's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskLog {
    /// When (ms since the epoch).
    pub time_ms: u64,
    /// What.
    pub message: String,
}

/// A long operation, run by the node that owns what it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    /// Id.
    pub id: String,
    /// The operation.
    pub op: TaskOp,
    /// The node that runs it.
    pub node: String,
    /// Who asked.
    pub user: String,
    /// Life cycle.
    pub state: TaskState,
    /// 0-100.
    #[schema(maximum = 100)]
    pub progress: u8,
    /// What happened, in order.
    pub log: Vec<TaskLog>,
    /// Why it failed.
    pub error: Option<String>,
    /// Created (ms since the epoch).
    pub created_ms: u64,
    /// Finished (ms since the epoch).
    pub finished_ms: Option<u64>,
}

/// Which tasks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// Only tasks in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
}
