//! The operator override of a replicated volume: let its primary keep writing with fewer
//! than 2 copies in sync (Ceph's `min_size 1`, for one volume and one incident).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Who allowed a replicated volume's primary to write with fewer than 2 copies in sync,
/// and why. It holds until two copies are in sync again (a copy caught up and rejoined),
/// then the cluster clears it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeOverride {
    /// The user who gave it.
    pub by: String,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The reason they gave.
    pub reason: String,
}

/// An operator override (`POST /volumes/{name}/override`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewOverride {
    /// Why the volume may run on fewer copies (kept in the record and the event): 1-200
    /// characters, no control characters (one line), not only spaces.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub reason: String,
}

crate::object_only!(NewOverride);
