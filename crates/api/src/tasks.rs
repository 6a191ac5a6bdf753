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

/// What a task does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskOp {
    /// Create a volume.
    CreateVolume {
        /// Name.
        name: String,
        /// Size in bytes.
        size_bytes: u64,
    },
    /// Delete a volume and its snapshots.
    DeleteVolume {
        /// Name.
        name: String,
    },
    /// Snapshot a volume.
    CreateSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// Clone a snapshot into a new volume.
    CloneSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
        /// New volume.
        name: String,
    },
}

impl TaskOp {
    /// In words, for logs and events.
    pub fn describe(&self) -> String {
        match self {
            TaskOp::CreateVolume { name, size_bytes } => {
                format!("create volume {name} ({size_bytes} bytes)")
            }
            TaskOp::DeleteVolume { name } => format!("delete volume {name}"),
            TaskOp::CreateSnapshot { volume, snapshot } => {
                format!("snapshot {volume}@{snapshot}")
            }
            TaskOp::DeleteSnapshot { volume, snapshot } => {
                format!("delete snapshot {volume}@{snapshot}")
            }
            TaskOp::CloneSnapshot {
                volume,
                snapshot,
                name,
            } => format!("clone {volume}@{snapshot} to {name}"),
        }
    }
}

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
