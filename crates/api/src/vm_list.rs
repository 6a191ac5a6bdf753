//! Which VMs a list asks for (`GET /api/v1/vms`'s filters and page), and the cluster's VM
//! counts by state (`GET /api/v1/cluster`): a console page with 1,000 VMs asks for one
//! page of them, filtered by the server, and a dashboard for the counts alone.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::VmState;

/// The most VMs one page of `GET /vms` holds.
pub const MAX_VM_PAGE: usize = 10_000;

/// Which VMs, and which page of them. Without `limit` every matching VM is answered (as
/// before paging existed); the `X-Total-Count` header always says how many match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VmQuery {
    /// Only VMs whose name, node (id or name) or one of whose disks contains this text,
    /// ignoring case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Only VMs in this state (`actual_state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// Only VMs on this node (its id or name): where the VM runs, else where it was
    /// placed, else where it is pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only VMs with a NIC on this network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Only templates (true) or only VMs that are not (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<bool>,
    /// Skip this many of the matching VMs (sorted by name); default 0. Signed with a
    /// minimum of 0 so the document's bounds are the server's (int64): as an unsigned
    /// field it took no value past 2^64 that the document allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 0)]
    pub offset: Option<i64>,
    /// At most this many (1 to 10000); default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

/// How many VMs the cluster has, by `actual_state`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmCounts {
    /// Every VM, templates included.
    pub total: u64,
    pub starting: u64,
    pub running: u64,
    pub paused: u64,
    pub stopping: u64,
    pub stopped: u64,
    pub crashed: u64,
    /// On a node that is down: what they do there is not known.
    pub unknown: u64,
}

impl VmCounts {
    /// Counts one more VM in `state`.
    pub fn add(&mut self, state: VmState) {
        self.total += 1;
        let slot = match state {
            VmState::Starting => &mut self.starting,
            VmState::Running => &mut self.running,
            VmState::Paused => &mut self.paused,
            VmState::Stopping => &mut self.stopping,
            VmState::Stopped => &mut self.stopped,
            VmState::Crashed => &mut self.crashed,
            VmState::Unknown => &mut self.unknown,
        };
        *slot += 1;
    }
}
