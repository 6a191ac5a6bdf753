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

/// A VM lifecycle request a task follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    /// Start (placed by the scheduler).
    Start,
    /// Stop: a guest-visible request, forced after a timeout.
    Stop,
    /// Kill the VMM at once.
    Kill,
    /// Power off and start again on the same node.
    Reboot,
    /// Stop the vCPUs.
    Pause,
    /// Continue the vCPUs.
    Resume,
    /// Move the running VM to another node without stopping it (live migration).
    Migrate,
}

/// What a VM task waits for: its VM's node to report the state the request asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmTask {
    /// The VM.
    pub vm: String,
    /// The request.
    pub action: VmAction,
    /// The VM's `start_seq` after the request (a start is done when the node reports it).
    pub start_seq: u64,
    /// The VM's `reboot_seq` after the request.
    pub reboot_seq: u64,
    /// When the task fails if the state asked for is not reached (ms since the epoch).
    pub deadline_ms: u64,
    /// For a live migration: its figures as the VM's node sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::MigrationProgress>,
}

/// What a copy task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CopyWork {
    /// A copy that was away gets what it missed.
    CatchUp,
    /// A new copy, on a node that replaces a lost one, gets the whole volume.
    Rebuild,
}

/// What a catch-up or rebuild task follows: one copy of a replicated volume, from the
/// moment its primary starts sending it data until it is back in the in-sync set. No
/// store is asked for it: the cluster follows the copy's state in the volume's record,
/// and the task's progress is that of the copy's catch-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CopyTask {
    /// The volume.
    pub volume: String,
    /// The node whose copy it is.
    pub node: String,
    /// Catch-up or rebuild.
    pub work: CopyWork,
    /// For a rebuild: the node whose copy this one replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
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
    /// The store operation. A VM task (`vm` set) asks no store and carries `status`
    /// here, so records written before VM tasks existed read as they did.
    pub op: TaskOp,
    /// For a VM lifecycle request: the VM and what it asked; its node follows the VM's
    /// reported state instead of calling its store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmTask>,
    /// For the catch-up or rebuild of a copy of a replicated volume: the copy it
    /// follows (`op` then says what the copy's store was told).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyTask>,
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
