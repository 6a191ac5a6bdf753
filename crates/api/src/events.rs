//! Events: what happened in the cluster, who did it, when.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Sortable id: time, then a random part.
    pub id: String,
    /// When (ms since the epoch).
    pub time_ms: u64,
    /// What kind, e.g. `volume.create`, `vm.update`, `task.failed`.
    pub kind: String,
    /// What it is about (a volume, VM, user... name).
    pub target: String,
    /// Who did it (a user, or `tesserad` for the system).
    pub user: String,
    /// In words.
    pub message: String,
}

/// Which events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events after this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// At most this many, the newest (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}
