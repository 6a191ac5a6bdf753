//! The answer to `replication_status`: what each replicated volume is on this store.
//!
//! Replies, unlike requests, do not refuse unknown fields: a store may say more without
//! breaking a `tesserad` that polls it.

use serde::{Deserialize, Serialize};

/// One volume's replication state on this store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct VolumeReplication {
    /// The volume.
    pub volume: String,
    /// Its persisted generation on this store.
    pub generation: u64,
    /// `primary`, `replica` or `standalone`: the role it holds, or after a restart the
    /// role it last held (persisted in the catalog).
    pub role: String,
    /// False after a restart until `tesserad` sent `set_replication` again. An
    /// unconfigured primary refuses NBD writes; an unconfigured replica takes writes only
    /// from a primary of a newer generation, and only once caught up.
    pub configured: bool,
    /// A primary: a replica answered with a newer generation, so another primary exists;
    /// every write fails. The generation it reported.
    #[serde(default)]
    pub fenced_by: Option<u64>,
    /// A primary: each replica it knows, in sync or not.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    /// A replica: the last (generation, seq) it applied since it started (none yet: null).
    #[serde(default)]
    pub last_applied: Option<AppliedPosition>,
    /// A replica: it restarted (or an apply failed) and may lack acknowledged writes, so it
    /// refuses in-sync writes until a primary caught it up and the cluster made it a
    /// replica again in a newer generation.
    #[serde(default)]
    pub must_catch_up: bool,
    /// A primary: blocks that failed their checksum and were repaired since it became the
    /// primary (of its copy from an in-sync replica, of a replica's copy from its own).
    #[serde(default)]
    pub repaired_blocks: u64,
    /// A primary: its last repairs (at most [`REPAIRS_KEPT`]), oldest first.
    #[serde(default)]
    pub repairs: Vec<BlockRepaired>,
}

/// How many of a primary's last repairs `replication_status` lists.
pub const REPAIRS_KEPT: usize = 32;

/// Blocks that failed their checksum and were rewritten with another copy's bytes (which
/// hashed to the repaired copy's own checksums): of the primary's copy with an in-sync
/// replica's bytes, or of a replica's copy with the primary's (`on`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct BlockRepaired {
    /// Byte offset in the volume (a multiple of 4096).
    pub offset: u64,
    /// Bytes repaired from there (whole 4 KiB blocks).
    pub len: u64,
    /// The node whose copy the bytes came from (`primary`: the primary's own copy, for a
    /// repair of a replica's copy).
    pub from: String,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The node whose copy was repaired; absent: the primary's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
    /// The snapshot of the volume whose block was repaired; absent: the volume's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A replica as its primary sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct ReplicaStatus {
    /// Its node id.
    pub node: String,
    /// Its replication address.
    pub addr: String,
    /// Where it stands.
    pub state: ReplicaState,
    /// Bytes of the volume recorded (durably) as missed by it: what a catch-up examines.
    pub missed_bytes: u64,
    /// Catch-up data bytes sent to it by this primary (only differing blocks travel).
    #[serde(default)]
    pub catch_up_sent_bytes: u64,
    /// UDP bytes the catch-up connections to it sent (QUIC's own count: data, digest
    /// requests, headers, acknowledgements and retransmissions).
    #[serde(default)]
    pub catch_up_wire_bytes: u64,
}

/// A replica's state at its primary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReplicaState {
    /// In the in-sync set and answering: every write waits for it.
    InSync {},
    /// In the in-sync set but it did not answer in time or refused a request: the
    /// primary completes nothing until the cluster removes it from the in-sync set
    /// (`set_replication` with a newer generation without it).
    Failed {
        /// Why, in words.
        reason: String,
    },
    /// Out of the in-sync set; what it misses is recorded, nothing is sent to it.
    OutOfSync {},
    /// Out of the in-sync set and being caught up in the background.
    CatchingUp {
        /// Bytes of the current pass examined or sent.
        done_bytes: u64,
        /// Bytes the current pass examines (missed regions widened to 4 KiB blocks).
        total_bytes: u64,
    },
    /// Caught up: it holds everything but the last moments' writes, which the primary
    /// sends before it takes the configuration that puts the replica back in sync.
    CaughtUp {},
}

/// A position in a volume's write stream.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct AppliedPosition {
    /// The generation.
    pub generation: u64,
    /// The seq within it.
    pub seq: u64,
}
