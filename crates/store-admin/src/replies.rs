//! The replies of the admin protocol, with the block store's descriptions of what it holds.

use serde::{Deserialize, Serialize};
use tessera_blockstore::{ScrubReport, SnapshotInfo, StoreError, VolumeInfo};

use crate::{AdminError, ErrorKind};

/// A reply line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminResponse {
    /// Protocol version.
    pub v: u32,
    /// The outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Success or failure.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It worked.
    Ok(AdminReply),
    /// It did not.
    Error(AdminError),
}

/// What a successful operation returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum AdminReply {
    /// A volume.
    Volume(VolumeInfo),
    /// Volumes.
    Volumes(Vec<VolumeInfo>),
    /// A snapshot.
    Snapshot(SnapshotInfo),
    /// A scrub report.
    Scrub(ScrubReport),
    /// The store's health and what it holds.
    Status(StoreStatus),
    /// Every replicated volume's state (`replication_status`).
    Replication(Vec<crate::VolumeReplication>),
    /// Nothing to return.
    Done,
}

/// The answer to `status`. Clients ignore fields they do not know, so a store can say
/// more without breaking a `tesserad` that polls it (unlike requests, which refuse them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreStatus {
    /// Why the store is degraded, or null. Degraded: a sync failed since the store
    /// started, so every flush and FUA write fails and the checkpoint has stopped until
    /// `tessera-store` restarts (docs/storage.md, "Sync failures are sticky").
    pub degraded: Option<String>,
    /// The data directory.
    pub data_dir: String,
    /// The `tessera-store` version answering.
    pub version: String,
    /// How many volumes it holds.
    pub volumes: u64,
    /// How many snapshots, of all volumes.
    pub snapshots: u64,
}

impl From<&StoreError> for AdminError {
    fn from(e: &StoreError) -> Self {
        let kind = match e {
            StoreError::Invalid { .. } | StoreError::OutOfRange { .. } | StoreError::ReadOnly => {
                ErrorKind::Invalid
            }
            StoreError::NotFound(_) | StoreError::Gone(_) => ErrorKind::NotFound,
            StoreError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            StoreError::Busy(..) | StoreError::Locked(_) => ErrorKind::Busy,
            StoreError::StaleGeneration { .. } => ErrorKind::Invalid,
            StoreError::NoSpace { .. } => ErrorKind::NoSpace,
            StoreError::Io { .. }
            | StoreError::Corrupt { .. }
            | StoreError::BadCatalog { .. }
            | StoreError::Degraded(_)
            | StoreError::DamagedLog(_) => ErrorKind::Io,
        };
        AdminError {
            kind,
            message: e.to_string(),
        }
    }
}
