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
    /// NBD URI (`nbds://`: TLS with a client certificate from `export-creds`), when the
    /// node's store has a TCP address.
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
    /// The node whose store holds it (default: the node receiving the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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

crate::object_only!(NewVolume, NewSnapshot, NewClone);

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
