//! The cluster's settings: one record, changed by administrators, read by everyone.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The least and the most `vcpu_overcommit` accepted.
pub const VCPU_OVERCOMMIT_RANGE: std::ops::RangeInclusive<f64> = 1.0..=64.0;

/// Settings that apply to the whole cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSettings {
    /// vCPUs the scheduler places per physical CPU of a node (1-64; 1 is no
    /// overcommit). Memory is never overcommitted, and no VM gets more vCPUs than its
    /// node has CPUs. Default 4.
    #[schema(minimum = 1, maximum = 64)]
    pub vcpu_overcommit: f64,
}

/// Changes to the cluster's settings; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SettingsUpdate {
    /// vCPUs per physical CPU, 1-64 (fractions allowed, e.g. 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub vcpu_overcommit: Option<f64>,
}

crate::object_only!(SettingsUpdate);
