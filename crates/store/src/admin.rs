//! The admin protocol of `tessera-store`: typed JSON lines over a Unix socket.
//!
//! One request per line, one reply per line, in order. Every message carries the protocol
//! version `v`; unknown fields and unknown operations are refused with a clear error, so
//! `tesserad` and the store can be upgraded apart and notice a mismatch.

use serde::{Deserialize, Serialize};
use tessera_blockstore::{ScrubReport, SnapshotInfo, StoreError, VolumeInfo};

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

/// The operations.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminOp {
    /// Create a thin volume.
    CreateVolume {
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
    },
    /// List volumes.
    ListVolumes,
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
    Scrub,
}

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
    /// Nothing to return.
    Done,
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

impl From<&StoreError> for AdminError {
    fn from(e: &StoreError) -> Self {
        let kind = match e {
            StoreError::Invalid { .. } | StoreError::OutOfRange { .. } | StoreError::ReadOnly => {
                ErrorKind::Invalid
            }
            StoreError::NotFound(_) | StoreError::Gone(_) => ErrorKind::NotFound,
            StoreError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            StoreError::Busy(..) | StoreError::Locked(_) => ErrorKind::Busy,
            StoreError::NoSpace { .. } => ErrorKind::NoSpace,
            StoreError::Io { .. } | StoreError::Corrupt { .. } | StoreError::BadCatalog { .. } => {
                ErrorKind::Io
            }
        };
        AdminError {
            kind,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for AdminError {}

/// Parses one request line into a request or the error reply to send back.
pub fn parse_request(line: &str) -> Result<AdminOp, AdminError> {
    #[derive(Deserialize)]
    struct Peek {
        v: Option<u32>,
    }
    // Look at the version first so a newer client gets "unsupported version", not a
    // confusing complaint about a field it added.
    if let Ok(Peek { v: Some(v) }) = serde_json::from_str::<Peek>(line) {
        if v != ADMIN_VERSION {
            return Err(AdminError {
                kind: ErrorKind::UnsupportedVersion,
                message: format!("admin protocol version {v} is not supported (this store speaks {ADMIN_VERSION})"),
            });
        }
    }
    serde_json::from_str::<AdminRequest>(line)
        .map(|r| r.op)
        .map_err(|e| AdminError {
            kind: ErrorKind::BadRequest,
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = AdminRequest {
            v: ADMIN_VERSION,
            op: AdminOp::CloneSnapshot {
                volume: "a".into(),
                snapshot: "s".into(),
                name: "b".into(),
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_request(&line).unwrap(), r.op);
    }

    #[test]
    fn malformed_requests_name_the_problem() {
        let cases = [
            (
                r#"{"v":1,"op":{"type":"create_volume","name":"x"}}"#,
                "size",
            ),
            (
                r#"{"v":1,"op":{"type":"create_volume","name":"x","size":-1}}"#,
                "invalid value",
            ),
            (r#"{"v":1,"op":{"type":"explode"}}"#, "unknown variant"),
            (
                r#"{"v":1,"op":{"type":"scrub"},"extra":1}"#,
                "unknown field",
            ),
            (r#"not json"#, "expected"),
        ];
        for (line, needle) in cases {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{line}");
            assert!(e.message.contains(needle), "{line}: {}", e.message);
        }
        let e = parse_request(r#"{"v":2,"op":{"type":"scrub"}}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedVersion);
    }

    #[test]
    fn replies_round_trip() {
        let r = AdminResponse {
            v: ADMIN_VERSION,
            outcome: Outcome::Error(AdminError {
                kind: ErrorKind::NotFound,
                message: "volume x not found".into(),
            }),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<AdminResponse>(&line).unwrap(), r);
        let ok = AdminResponse {
            v: ADMIN_VERSION,
            outcome: Outcome::Ok(AdminReply::Done),
        };
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<AdminResponse>(&line).unwrap(), ok);
    }
}
