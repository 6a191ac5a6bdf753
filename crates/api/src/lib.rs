//! The REST API's request and response types, shared by `tesserad` (which serves them and
//! generates the OpenAPI document from them), the `tessera` CLI and the console tests.
//!
//! Incus keeps its API types in one package used by server and client alike; this crate
//! is that package for Tessera. It holds data and the limits the schema states (ranges,
//! patterns, lengths as schema keywords), not behaviour: it never talks to the cluster.
//!
//! Request bodies are JSON objects only: every request type refuses a JSON array (serde's
//! derive would otherwise read a struct from a sequence of its fields in order), and
//! integer fields accept an integral number written as `1.0`, as JSON Schema's `integer`
//! does.

#![forbid(unsafe_code)]

mod auth;
mod certificate;
mod cluster;
mod events;
mod images;
pub mod limits;
mod login_policy;
mod metrics;
mod migration;
mod networks;
mod node_upgrade;
mod realms;
mod settings;
pub mod strict;
mod tasks;
mod totp;
mod users;
mod vm_list;
mod vms;
mod volume_override;
mod volumes;

pub use auth::{
    LoggedOut, Login, LoginReply, NewToken, PasswordChange, PasswordChanged, Revoked, Role,
    SessionInfo, TokenInfo,
};
pub use certificate::{CertificateStatus, InstalledCertificate, NewCertificate};
pub use cluster::{
    ClusterStatus, MaintenanceRequest, Member, NodeAllocation, NodeInfo, NodeMaintenance,
    NodeStorage, RemoveQuery, Removed, StorageState,
};
pub use events::{Event, EventQuery, StreamQuery, StreamedEvent};
pub use images::{Image, ImageCopy, ImageFile, ImageUpload, MAX_IMAGE_BYTES};
pub use login_policy::LoginPolicy;
pub use metrics::{InterfaceRates, MetricsPoint, MetricsQuery, NodeMetrics};
pub use migration::{
    MigrateRequest, MigrationPhase, MigrationProgress, DEFAULT_DOWNTIME_MS, MAX_DOWNTIME_MS,
};
pub use networks::{Network, NetworkOnNode, NewNetwork};
pub use node_upgrade::{
    parse_blake3, NodeUpgradeStatus, UpgradeQuery, UpgradeRecord, UpgradeRequest, UpgradeState,
    DEFAULT_UPGRADE_TRIES, MAX_ROOT_IMAGE_BYTES,
};
pub use realms::{Realm, RealmSynced, RealmTest, RealmTestReply};
pub use settings::{
    ClusterSettings, SettingsUpdate, DEFAULT_REPLICA_REPLACE_AFTER_S, REPLICA_REPLACE_AFTER_RANGE,
    VCPU_OVERCOMMIT_RANGE,
};
pub use tasks::{
    CopyTask, CopyWork, Task, TaskLog, TaskOp, TaskQuery, TaskState, VmAction, VmTask,
};
pub use totp::{TotpConfirm, TotpConfirmed, TotpEnrollment};
pub use users::{NewUser, UserInfo, UserUpdate};
pub use vm_list::{VmCounts, VmQuery, MAX_VM_PAGE};
pub use vms::{DesiredState, NewNic, NewVm, Nic, RestartPolicy, Vm, VmState, VmStatus, VmUpdate};
pub use volume_override::{NewOverride, VolumeOverride};
pub use volumes::{
    CatchUpProgress, CopyState, NbdCredentials, NewClone, NewSnapshot, NewVolume, Replication,
    Snapshot, Volume, VolumeCopy, VolumeResize, VolumeState, VolumeView,
};

/// The error body of every failed request.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field when a field is wrong.
    pub error: String,
    /// For a change the cluster state could not confirm (503): `not_applied` (nothing was
    /// changed), `unknown` (it may have been made: read before retrying, or retry with the
    /// same `Idempotency-Key`) or `committed` (it was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// The answer to a delete of a user, VM or network.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Deleted {
    /// The name of what was deleted.
    pub deleted: String,
}
