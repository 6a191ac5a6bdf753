//! The records of the cluster state that the API and the task runner share (their types
//! are the API's, from `tessera-api`: a record is what a `GET` returns), and the tables
//! they live in:
//!
//! - `volumes/<name>`: [`Volume`]; `snapshots/<volume>@<snapshot>`: [`Snapshot`];
//! - `disk_claims/<volume>`: the VM a volume is attached to (one VM per volume);
//! - `vms/<name>`: [`Vm`]; `networks/<name>`: [`Network`];
//! - `tasks/<id>`: [`Task`]; `events/<time>-<id>`: events.

pub use tessera_api::{
    DesiredState, Network, Snapshot, Task, TaskLog, TaskOp, TaskState, Vm, Volume, VolumeState,
};

/// The key of a snapshot record.
pub fn snapshot_key(volume: &str, snapshot: &str) -> String {
    format!("{volume}@{snapshot}")
}

/// The names of the cluster state's tables, in one place.
pub mod table {
    /// `volumes/<name>`: [`super::Volume`].
    pub const VOLUMES: &str = "volumes";
    /// `snapshots/<volume>@<snapshot>`: [`super::Snapshot`].
    pub const SNAPSHOTS: &str = "snapshots";
    /// `disk_claims/<volume>`: the name of the VM the volume is attached to.
    pub const DISK_CLAIMS: &str = "disk_claims";
    /// `vms/<name>`: [`super::Vm`].
    pub const VMS: &str = "vms";
    /// `networks/<name>`: [`super::Network`].
    pub const NETWORKS: &str = "networks";
    /// `tasks/<id>`: [`super::Task`].
    pub const TASKS: &str = "tasks";
    /// `events/<time>-<id>`: events.
    pub const EVENTS: &str = "events";
    /// `nodes/<id>`: what each node registered (address, NBD address, metrics).
    pub const NODES: &str = "nodes";
    /// `users/<name>`: password hash and role.
    pub const USERS: &str = "users";
    /// `sessions/<hash of the secret>`: login sessions and API tokens.
    pub const SESSIONS: &str = "sessions";
    /// `tokens/<id>`: the session key of an API token.
    pub const TOKENS: &str = "tokens";
    /// `settings/cluster`: the cluster's settings (`tessera_api::ClusterSettings`).
    pub const SETTINGS: &str = "settings";
    /// `placements/<node id>`: `{"seq": N}`, raised by every VM placement on that node
    /// in the placement's own transaction, so two placements counting the same free
    /// room cannot both commit (`vmrun::reservation`).
    pub const PLACEMENTS: &str = "placements";
    /// `migrations/<vm>`: a live migration under way (`crate::migrate::Migration`).
    pub const MIGRATIONS: &str = "migrations";
    /// `copy_deletions/<volume>@<node id>`: a copy of a replicated volume the cluster no
    /// longer counts, to be deleted by its node's store
    /// (`crate::replication::orphans::PendingDeletion`).
    pub const COPY_DELETIONS: &str = "copy_deletions";
    /// `maintenance/<node id>`: the node is in maintenance mode
    /// (`crate::api::node_maintenance::Maintenance`); absent when it is not.
    pub const MAINTENANCE: &str = "maintenance";
    /// `vm_writers/<vm>@<node id>`: the digest of the writer key of the VMM that node
    /// started last for the VM (`crate::vmrun::writer_key`).
    pub const VM_WRITERS: &str = "vm_writers";
}

/// A login session or an API token, as stored in `sessions/<hash of the secret>`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Session {
    /// Whose.
    pub user: String,
    /// The role it was created with (the user's current role may be smaller).
    pub role: tessera_api::Role,
    /// When it stops being accepted (ms since the epoch).
    pub(crate) expires_ms: u64,
    /// `session` (a login) or `token` (an API token).
    pub(crate) kind: String,
    /// A token's id (its `tokens/<id>` record); unused for logins.
    pub(crate) id: String,
    /// The user's credentials id when it was issued; it works only while the user still
    /// has that id (not once the user is re-created or its password reset).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) credentials: String,
}
