//! tessera-store-admin: the admin protocol of `tessera-store`, defined once.
//!
//! Typed JSON lines over a Unix socket: one request per line, one reply per line, in
//! order. Every message carries the protocol version `v`; unknown fields and unknown
//! operations are refused with a clear error, so `tesserad` and the store can be upgraded
//! apart and notice a mismatch. The store (server side), its CLI and `tesserad`'s task
//! runner (client side) all use these types; `docs/admin-protocol.md` describes the wire.
//!
//! This crate holds data and the codec only: no sockets, no store. Replies carry the
//! block store's own descriptions of volumes and snapshots (`tessera-blockstore`), behind
//! the default feature `replies`; feature `schema` gives [`AdminOp`] an OpenAPI schema.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Version of the admin protocol spoken by this build.
pub const ADMIN_VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// A request line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminRequest {
    /// Protocol version.
    pub v: u32,
    /// What to do.
    pub op: AdminOp,
}

/// The operations. `tesserad` records the ones it asks a store to do as its tasks' `op`.
// Operations without fields are written `Op {}`, not `Op`: serde applies
// `deny_unknown_fields` to the fields of struct variants only, so a unit variant would
// take `{"type":"scrub","force":true}` as a scrub.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminOp {
    /// Create a thin volume.
    CreateVolume {
        /// Name.
        name: String,
        /// Size in bytes.
        // Tasks recorded before the task runner shared these types spelled it so.
        #[serde(alias = "size_bytes")]
        size: u64,
    },
    /// List volumes.
    ListVolumes {},
    /// Describe one volume.
    VolumeInfo {
        /// Name.
        name: String,
    },
    /// Grow a volume.
    ResizeVolume {
        /// Name.
        name: String,
        /// New size in bytes.
        size: u64,
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
        /// Snapshot name.
        snapshot: String,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Clone a snapshot into a new volume.
    CloneSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot name.
        snapshot: String,
        /// New volume name.
        name: String,
    },
    /// Verify every stored block.
    Scrub {},
    /// Report the store's health (degraded or not) and what it holds. Cheap: it reads
    /// memory and the catalog, never the volumes' data.
    Status {},
    /// Set a volume's replication role in `generation` (issue #8; `tesserad` decides it
    /// in the cluster state). The volume's persisted generation is raised to it first; a
    /// replica then refuses every older generation, a primary forwards its NBD writes to
    /// `replicas` over QUIC.
    SetReplication {
        /// Volume.
        volume: String,
        /// The generation the role holds in.
        generation: u64,
        /// What this store is for the volume.
        role: ReplicationRole,
    },
    /// Every volume's replication state on this store: role, generation, and per
    /// replica of a primary whether it is in sync, failed, catching up or caught up.
    /// Cheap: memory only. Answered with [`AdminReply::Replication`] (feature `replies`).
    ReplicationStatus {},
}

/// A store's part in a volume's replication.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplicationRole {
    /// Serves the writer and forwards every write to the replicas.
    Primary {
        /// The in-sync replicas (other nodes' stores).
        replicas: Vec<ReplicaPeer>,
        /// A replica that has not answered a request this long fails it (milliseconds;
        /// default 5000).
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// After a replica failed, how long beyond `timeout_ms` a request waits for the
        /// cluster to take the replica out of the in-sync set (a newer configuration)
        /// before it fails with an I/O error (milliseconds; default 30000). Meanwhile it
        /// is neither acknowledged nor failed: a client never sees an error only because
        /// the cluster took a moment to decide.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster_wait_ms: Option<u64>,
        /// Replicas out of the in-sync set that the primary catches up in the background
        /// (only the blocks that differ in what they missed, or the whole volume when
        /// nothing was recorded for them). `replication_status` reports `caught_up` when
        /// done; they rejoin with a newer generation listing them in `replicas`.
        #[serde(default)]
        catching_up: Vec<ReplicaPeer>,
        /// Most catch-up bytes sent per second, per replica (default: unlimited; one
        /// write of at most 4 MiB in flight at a time either way).
        #[serde(default)]
        catch_up_bytes_per_sec: Option<u64>,
        /// The operator allowed this primary fewer than 2 copies in sync (the cluster
        /// records who, as an event): without it, a configuration that leaves fewer is
        /// refused and the volume's writes wait for a replica.
        #[serde(default)]
        operator_override: bool,
        /// Of `catching_up`, the nodes whose copy is new (made empty on a node that
        /// replaces a lost copy): compared over the whole volume, whatever this store
        /// recorded for that node before.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rebuilding: Vec<String>,
        /// The copies the cluster holds out of sync and is not catching up (their nodes
        /// are away): the primary records what they miss. When given, a running primary
        /// forgets the replicas it knows that are in none of the three lists (copies the
        /// cluster replaced): their links, catch-ups and records go. Absent (an older
        /// `tesserad`): every replica it knows and not listed is out of sync.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        out_of_sync: Option<Vec<ReplicaPeer>>,
    },
    /// Takes writes from the primary of this generation (or a newer one).
    Replica {
        /// The cluster has this replica out of sync, being caught up by the primary of
        /// this generation: a replica that must be caught up (it restarted) takes that
        /// primary's writes, still reporting `must_catch_up`. A later `replica` with
        /// `catching_up: false` in a newer generation (the cluster saw `caught_up`) ends it.
        #[serde(default)]
        catching_up: bool,
    },
    /// Not replicated: the volume is served alone (the default).
    Standalone {},
}

/// Where a replica is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReplicaPeer {
    /// Its node id (its certificate names `<node>.node.tessera`).
    pub node: String,
    /// Its store's replication address (`host:port`, UDP).
    pub addr: String,
}

impl AdminOp {
    /// In words, for logs and events.
    pub fn describe(&self) -> String {
        match self {
            AdminOp::CreateVolume { name, size } => {
                format!("create volume {name} ({size} bytes)")
            }
            AdminOp::ListVolumes {} => "list volumes".into(),
            AdminOp::VolumeInfo { name } => format!("describe volume {name}"),
            AdminOp::ResizeVolume { name, size } => {
                format!("resize volume {name} to {size} bytes")
            }
            AdminOp::DeleteVolume { name } => format!("delete volume {name}"),
            AdminOp::CreateSnapshot { volume, snapshot } => {
                format!("snapshot {volume}@{snapshot}")
            }
            AdminOp::DeleteSnapshot { volume, snapshot } => {
                format!("delete snapshot {volume}@{snapshot}")
            }
            AdminOp::CloneSnapshot {
                volume,
                snapshot,
                name,
            } => format!("clone {volume}@{snapshot} to {name}"),
            AdminOp::Scrub {} => "scrub the store".into(),
            AdminOp::Status {} => "report the store's status".into(),
            AdminOp::SetReplication {
                volume,
                generation,
                role,
            } => {
                let role = match role {
                    ReplicationRole::Primary { replicas, .. } => {
                        let nodes: Vec<&str> = replicas.iter().map(|r| r.node.as_str()).collect();
                        format!("primary with replicas [{}]", nodes.join(", "))
                    }
                    ReplicationRole::Replica { catching_up: false } => "replica".into(),
                    ReplicationRole::Replica { catching_up: true } => "catching-up replica".into(),
                    ReplicationRole::Standalone {} => "standalone".into(),
                };
                format!("make this store the {role} of volume {volume} in generation {generation}")
            }
            AdminOp::ReplicationStatus {} => "report the volumes' replication state".into(),
        }
    }
}

/// Why an operation failed, in a form a program can branch on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminError {
    /// Machine-readable class.
    pub kind: ErrorKind,
    /// Human-readable reason.
    pub message: String,
}

/// Classes of admin errors.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request line could not be understood.
    BadRequest,
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// A field has an unacceptable value.
    Invalid,
    /// No such volume or snapshot.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// In use.
    Busy,
    /// The store's filesystem is full.
    NoSpace,
    /// An I/O or internal error.
    Io,
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for AdminError {}

/// Parses one request line into a request or the error reply to send back.
pub fn parse_request(line: &str) -> Result<AdminOp, AdminError> {
    let bad = |message: String| AdminError {
        kind: ErrorKind::BadRequest,
        message,
    };
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
    // serde reads structs from JSON arrays (fields by position) and tagged enums from
    // arrays whose first element is the tag; the protocol is objects only, so
    // `[1,{"type":"scrub"}]` or `{"v":1,"op":["scrub"]}` must not run a scrub.
    let objects = value.is_object() && value.get("op").is_none_or(|op| op.is_object());
    if !objects {
        return Err(bad(
            "a request is a JSON object whose op is an object: {\"v\":1,\"op\":{\"type\":...}}"
                .into(),
        ));
    }
    // Look at the version first so a newer client gets "unsupported version", not a
    // confusing complaint about a field it added.
    if let Some(v) = value.get("v").and_then(serde_json::Value::as_u64) {
        if v != u64::from(ADMIN_VERSION) {
            return Err(AdminError {
                kind: ErrorKind::UnsupportedVersion,
                message: format!(
                    "admin protocol version {v} is not supported (this store speaks {ADMIN_VERSION})"
                ),
            });
        }
    }
    serde_json::from_value::<AdminRequest>(value)
        .map(|r| r.op)
        .map_err(|e| bad(e.to_string()))
}

mod replication;
pub use replication::{
    AppliedPosition, BlockRepaired, ReplicaState, ReplicaStatus, VolumeReplication, REPAIRS_KEPT,
};

#[cfg(feature = "replies")]
mod replies;
#[cfg(feature = "replies")]
pub use replies::{AdminReply, AdminResponse, Outcome, StoreStatus};

#[cfg(all(test, feature = "replies"))]
mod tests;
