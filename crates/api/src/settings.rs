//! The cluster's settings: one record, changed by administrators, read by everyone.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The least and the most `vcpu_overcommit` accepted.
pub const VCPU_OVERCOMMIT_RANGE: std::ops::RangeInclusive<f64> = 1.0..=64.0;

/// The least and the most `replica_replace_after_s` accepted (1 s to 30 days).
pub const REPLICA_REPLACE_AFTER_RANGE: std::ops::RangeInclusive<u64> = 1..=2_592_000;

/// `replica_replace_after_s` when none was set: 10 minutes, so a node rebooted or
/// briefly cut off is caught up (what it missed), not rebuilt (the whole volume).
pub const DEFAULT_REPLICA_REPLACE_AFTER_S: u64 = 600;

fn default_replica_replace_after_s() -> u64 {
    DEFAULT_REPLICA_REPLACE_AFTER_S
}

/// Settings that apply to the whole cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSettings {
    /// vCPUs the scheduler places per physical CPU of a node (1-64; 1 is no
    /// overcommit). Memory is never overcommitted, and no VM gets more vCPUs than its
    /// node has CPUs. Default 4.
    #[schema(minimum = 1, maximum = 64)]
    pub vcpu_overcommit: f64,
    /// Seconds a copy of a replicated volume may stay out of sync with its node away
    /// (down, or its store unreachable) before the cluster rebuilds it on another node
    /// (1 s to 30 days; default 600). A node removed from the cluster counts as away for
    /// good at once.
    #[serde(default = "default_replica_replace_after_s")]
    #[schema(minimum = 1, maximum = 2592000)]
    pub replica_replace_after_s: u64,
}

/// Changes to the cluster's settings; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SettingsUpdate {
    /// vCPUs per physical CPU, 1-64 (fractions allowed, e.g. 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub vcpu_overcommit: Option<f64>,
    /// Seconds before an away copy is rebuilt elsewhere, 1 to 2592000.
    #[serde(
        default,
        deserialize_with = "crate::strict::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 2592000)]
    pub replica_replace_after_s: Option<u64>,
}

crate::object_only!(SettingsUpdate);
