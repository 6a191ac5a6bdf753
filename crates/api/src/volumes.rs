//! Volumes, their snapshots and clones.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a volume (or snapshot) is in its life.
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

/// A volume: a virtual disk in one node's block store, or copied on up to three nodes'
/// stores (its `replicas`), one of them the primary that serves the writer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// Name (also its NBD export name).
    pub name: String,
    /// The node whose store holds it; for a replicated volume, the primary's node.
    pub node: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Life cycle.
    pub state: VolumeState,
    /// `volume@snapshot` it was cloned from.
    pub origin: Option<String>,
    /// NBD URI (`nbds://`: TLS with a client certificate from `export-creds`), when the
    /// node's store has a TCP address.
    pub nbd: Option<String>,
    /// When it was requested (ms since the epoch).
    pub created_ms: u64,
    /// How many copies it has (1-3). Absent in records written before replication: 1.
    // Defaults are not written, so a record written before replication reads and writes
    // back the same (the cluster state's compare-and-swap compares the JSON).
    #[serde(default = "one_replica", skip_serializing_if = "is_one_replica")]
    pub replicas: u8,
    /// Replication fence: raised through the cluster state before every change of the
    /// primary or of the in-sync copies; the stores refuse older ones. Absent: 1.
    #[serde(
        default = "first_generation",
        skip_serializing_if = "is_first_generation"
    )]
    pub generation: u64,
    /// Every copy, the primary's (`node`) first. Empty for a one-copy volume: its only
    /// copy is on `node`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<VolumeCopy>,
    /// The operator allowed the primary fewer than 2 copies in sync
    /// (`POST /volumes/{name}/override`); cleared once two copies are in sync again.
    /// Absent: no override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed: rarely present, and the record is passed around by value.
    pub operator_override: Option<Box<crate::VolumeOverride>>,
}

fn one_replica() -> u8 {
    1
}

fn is_one_replica(n: &u8) -> bool {
    *n == 1
}

fn first_generation() -> u64 {
    1
}

fn is_first_generation(g: &u64) -> bool {
    *g == 1
}

impl Volume {
    /// Every copy with its state, also for a one-copy volume (its copy on `node`, in
    /// sync).
    pub fn all_copies(&self) -> Vec<VolumeCopy> {
        if self.copies.is_empty() {
            vec![VolumeCopy {
                node: self.node.clone(),
                state: CopyState::InSync,
                catch_up: None,
                joining: false,
                rebuild: false,
            }]
        } else {
            self.copies.clone()
        }
    }

    /// Whether it has more than one copy (then its stores replicate it).
    pub fn is_replicated(&self) -> bool {
        self.copies.len() > 1
    }

    /// The fewest copies (the primary's included) that must stay in sync: 2, or 1 under
    /// the operator override.
    pub fn min_in_sync(&self) -> usize {
        if self.operator_override.is_some() {
            1
        } else {
            2
        }
    }
}

/// One copy of a volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeCopy {
    /// The node whose store holds it.
    pub node: String,
    /// Whether every acknowledged write is on it.
    pub state: CopyState,
    /// Catch-up progress, while `catching_up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUpProgress>,
    /// Back in the in-sync set after a catch-up, but its store has not yet confirmed
    /// that the primary fenced it in this generation (which the primary does only after
    /// the last catch-up pass): until then it may lack the last writes, so it is never
    /// made the primary. Absent: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joining: bool,
    /// A new copy, made on this node to replace a lost one: its node's store creates it
    /// empty and the primary sends it the whole volume (only the blocks that differ from
    /// an empty one). Cleared when it rejoins the in-sync set. Absent: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebuild: bool,
}

/// Where a copy stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Every completed write needs its acknowledgement.
    InSync,
    /// Left the in-sync set (it stopped answering or its node went down): it may lack
    /// writes and takes none until caught up.
    OutOfSync,
    /// Getting what it missed.
    CatchingUp,
}

/// Bytes of a catch-up done and to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CatchUpProgress {
    /// Done.
    pub done: u64,
    /// In all.
    pub total: u64,
}

/// A volume's replication as `GET /volumes` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Replication {
    /// Copies asked for (1-3).
    pub replicas: u8,
    /// The node serving the writer (whose NBD export is writable).
    pub primary: String,
    /// The replication fence (see `Volume::generation`).
    pub generation: u64,
    /// Every copy, the primary's first.
    pub copies: Vec<VolumeCopy>,
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

/// A volume with its snapshots and the VM it is attached to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeView {
    /// The volume.
    #[serde(flatten)]
    pub volume: Volume,
    /// Its snapshots, by name.
    pub snapshots: Vec<Snapshot>,
    /// The VM using it, if any.
    pub attached_to: Option<String>,
    /// Its copies, primary and generation.
    pub replication: Replication,
}

/// A new volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewVolume {
    /// 1-63 of a-z, 0-9, '-', starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// Bytes: a positive multiple of 4096, at most 64 TiB.
    #[serde(deserialize_with = "crate::strict::int")]
    #[schema(minimum = 4096, maximum = 70368744177664_i64, multiple_of = 4096)]
    pub size_bytes: u64,
    /// The node whose store holds it, for a replicated volume the primary's (default:
    /// the node receiving the request for one copy; placement by free space for more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How many copies, on distinct nodes: 1-3 (default: 3 when at least three nodes are
    /// up with a healthy store, else as many as there are, at least 1; see
    /// docs/replication.md).
    #[serde(
        default,
        deserialize_with = "crate::strict::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 3)]
    pub replicas: Option<u8>,
}

/// A new snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewSnapshot {
    /// 1-63 of a-z, 0-9, '-', starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
}

/// A clone of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewClone {
    /// The snapshot of this volume to clone.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub snapshot: String,
    /// The new volume's name: 1-63 of a-z, 0-9, '-', starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
}

/// A volume's new size (`POST /volumes/{name}/resize`). Volumes only grow: a smaller size
/// is refused (409), the current size changes nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct VolumeResize {
    /// Bytes: a positive multiple of 4096, at most 64 TiB, not below the current size.
    #[serde(deserialize_with = "crate::strict::int")]
    #[schema(minimum = 4096, maximum = 70368744177664_i64, multiple_of = 4096)]
    pub size_bytes: u64,
}

crate::object_only!(NewVolume, NewSnapshot, NewClone, VolumeResize);

/// A client certificate for NBD over TLS (`tessera volume export-creds`): what libnbd's
/// `tls-certificates=DIR` and qemu's `tls-creds-x509` read as `ca-cert.pem`,
/// `client-cert.pem` and `client-key.pem`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NbdCredentials {
    /// The user the certificate was issued to.
    pub user: String,
    /// The cluster CA's certificate (PEM): checks the stores' certificates.
    pub ca_cert_pem: String,
    /// The client certificate (PEM), issued by the cluster CA.
    pub client_cert_pem: String,
    /// Its private key (PEM). Keep it as secret as the volumes it opens.
    pub client_key_pem: String,
    /// Days the certificate is valid; a new one is exported after that.
    pub valid_days: u32,
}
