//! Live migration of a running VM to another node: the request, and the progress its
//! task shows while the node running the VM sends it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest downtime target a request may ask for.
pub const MAX_DOWNTIME_MS: u64 = 60_000;
/// The downtime target when the request names none.
pub const DEFAULT_DOWNTIME_MS: u64 = 50;

/// `POST /vms/{name}/migrate`: where to, and how.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target node (id or name); without it the scheduler picks one (an up node with
    /// room, preferring a node holding an in-sync copy of the VM's disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// How long the guest may be paused for the last copy, in ms (1-60000, default 50):
    /// memory is sent while it runs until what is left fits this.
    #[serde(
        default,
        deserialize_with = "downtime",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 60000)]
    pub downtime_ms: Option<u64>,
    /// A cap on the memory sent per second, in KiB (at least 1; default none).
    #[serde(
        default,
        deserialize_with = "bandwidth",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1)]
    pub max_bandwidth_kib_s: Option<u64>,
}

crate::object_only!(MigrateRequest);

fn downtime<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v: Option<u64> = crate::strict::opt_int(d)?;
    match v {
        Some(ms) if !(1..=MAX_DOWNTIME_MS).contains(&ms) => Err(serde::de::Error::custom(format!(
            "downtime_ms must be 1 to {MAX_DOWNTIME_MS}, not {ms}"
        ))),
        v => Ok(v),
    }
}

fn bandwidth<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v: Option<u64> = crate::strict::opt_int(d)?;
    match v {
        Some(0) => Err(serde::de::Error::custom(
            "max_bandwidth_kib_s must be at least 1",
        )),
        v => Ok(v),
    }
}

/// Where a migration stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The target node starts a VMM waiting for the VM.
    #[default]
    Preparing,
    /// The target waits for the source.
    Listening,
    /// Memory moves while the guest runs, then the last pages and the state.
    Transferring,
    /// The VM and its disk's primary were moved to the target in the cluster state; the
    /// target runs the guest.
    SwitchedOver,
    /// Done: the guest runs on the target.
    Done,
    /// Failed or cancelled: the guest runs on the source.
    Failed,
}

/// A migration task's figures, from the source VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    /// The node the VM leaves.
    pub from: String,
    /// The node it goes to.
    pub to: String,
    /// Where it stands.
    pub phase: MigrationPhase,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Bytes of memory sent so far, every round counted.
    pub bytes: u64,
    /// Rounds of memory sent while the guest ran.
    pub iterations: u32,
    /// How fast the guest dirtied memory in the last round, bytes per second.
    pub dirty_bytes_per_s: u64,
    /// How fast memory went out, bytes per second.
    pub bandwidth_bytes_per_s: u64,
    /// Dirty bytes left at the last look.
    pub remaining_bytes: u64,
    /// What sending them would pause the guest for, in ms.
    pub expected_downtime_ms: u64,
    /// The downtime target, in ms.
    pub downtime_target_ms: u64,
    /// Whether the expected downtime got under the target before the pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged: Option<bool>,
    /// The guest's pause, from the source pausing it to the target running it, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// From the request to the end, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<MigrateRequest, String> {
        serde_json::from_str(body).map_err(|e| e.to_string())
    }

    #[test]
    fn a_request_names_a_node_or_none_and_bounded_figures() {
        assert_eq!(parse("{}"), Ok(MigrateRequest::default()));
        let r = parse(r#"{"to":"node2","downtime_ms":50.0,"max_bandwidth_kib_s":1024}"#).unwrap();
        assert_eq!(r.to.as_deref(), Some("node2"));
        assert_eq!(r.downtime_ms, Some(50));
        assert_eq!(r.max_bandwidth_kib_s, Some(1024));
        for bad in [
            r#"{"downtime_ms":0}"#,
            r#"{"downtime_ms":60001}"#,
            r#"{"downtime_ms":1.5}"#,
            r#"{"max_bandwidth_kib_s":0}"#,
            r#"{"node":"x"}"#,
            r#"["node2"]"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }
}
