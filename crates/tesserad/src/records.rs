//! The records of the cluster state that the API and the task runner share, and the
//! tables they live in:
//!
//! - `volumes/<name>`: [`Volume`]; `snapshots/<volume>@<snapshot>`: [`Snapshot`];
//! - `disk_claims/<volume>`: the VM a volume is attached to (one VM per volume);
//! - `vms/<name>`: [`Vm`]; `networks/<name>`: [`Network`];
//! - `tasks/<id>`: [`Task`]; `events/<time>-<id>`: events.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a volume is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Its create (or clone) task has not finished.
    Creating,
    /// On its node's store.
    Ready,
    /// Its delete task has not finished.
    Deleting,
}

/// A volume: a virtual disk in one node's block store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// Name (also its NBD export name).
    pub name: String,
    /// The node whose store holds it.
    pub node: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Life cycle.
    pub state: VolumeState,
    /// `volume@snapshot` it was cloned from.
    pub origin: Option<String>,
    /// NBD URI, when the node's store has a TCP address.
    pub nbd: Option<String>,
    /// When it was requested (ms since the epoch).
    pub created_ms: u64,
}

/// A snapshot of a volume (read-only, exported as `volume@snapshot`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// Volume.
    pub volume: String,
    /// Snapshot name.
    pub name: String,
    /// Life cycle (same states as a volume).
    pub state: VolumeState,
    /// When it was requested (ms since the epoch).
    pub created_ms: u64,
}

/// What a VM should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Powered off.
    Stopped,
    /// Running (acted on once VM orchestration lands).
    Running,
}

/// A VM definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// Name.
    pub name: String,
    /// Virtual CPUs (1-32).
    pub vcpus: u32,
    /// Memory in MiB (16-1048576).
    pub memory_mib: u64,
    /// Volumes, in order (the first is the boot disk).
    pub disks: Vec<String>,
    /// Networks, one NIC each, in order.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Kernel image path on the node (direct boot).
    pub kernel: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Preferred node id (placement), if pinned.
    pub node: Option<String>,
    /// What it should be doing.
    pub desired_state: DesiredState,
    /// What it is doing: always `stopped` until VM orchestration exists.
    pub actual_state: DesiredState,
    /// Bumped by every update.
    pub generation: u64,
    /// Created (ms since the epoch).
    pub created_ms: u64,
    /// Last changed (ms since the epoch).
    pub updated_ms: u64,
}

/// A virtual network: a bridge on every node, optionally on a VLAN of an uplink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    /// Name.
    pub name: String,
    /// The Linux bridge VMs' taps join (1-15 characters).
    pub bridge: String,
    /// 802.1Q VLAN id on the uplink (1-4094), if tagged.
    pub vlan: Option<u16>,
    /// The nodes' uplink interface, if the bridge has one.
    pub uplink: Option<String>,
    /// Set while a delete is checking that no VM uses it; VMs cannot attach meanwhile.
    #[serde(default)]
    pub deleting: bool,
    /// Created (ms since the epoch).
    pub created_ms: u64,
}

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

/// The key of a snapshot record.
pub fn snapshot_key(volume: &str, snapshot: &str) -> String {
    format!("{volume}@{snapshot}")
}
