//! The cluster (id, leader, members) and its nodes.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A Raft id: an unsigned 64-bit integer (it may exceed the signed range), `uint64`.
fn raft_id_schema(nullable: bool) -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, SchemaType, Type};
    let ty = if nullable {
        SchemaType::from_iter([Type::Integer, Type::Null])
    } else {
        SchemaType::from(Type::Integer)
    };
    ObjectBuilder::new()
        .schema_type(ty)
        .format(Some(SchemaFormat::Custom("uint64".into())))
        .minimum(Some(0))
        .build()
}

fn raft_id() -> utoipa::openapi::schema::Object {
    raft_id_schema(false)
}

fn raft_id_or_null() -> utoipa::openapi::schema::Object {
    raft_id_schema(true)
}

fn raft_ids() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(raft_id_schema(false))
        .build()
}

/// A Raft member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    /// Raft id (an unsigned 64-bit integer: it may exceed the signed range).
    #[schema(schema_with = raft_id)]
    pub raft_id: u64,
    /// Raft address.
    pub address: String,
    /// Voter (true) or learner.
    pub voter: bool,
}

/// The cluster as this node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// Set at formation.
    pub cluster_id: Option<String>,
    /// The Raft leader's id (unsigned 64-bit), if one is elected.
    #[schema(schema_with = raft_id_or_null)]
    pub leader: Option<u64>,
    /// The leader as a node: its node id (null while none is elected or the leader has
    /// not registered yet).
    #[serde(default)]
    pub leader_node: Option<String>,
    /// The leader's node name (see [`NodeInfo::name`]); null like `leader_node`, or when
    /// the leader registered without a name.
    #[serde(default)]
    pub leader_name: Option<String>,
    /// The Raft term.
    pub term: u64,
    /// Voters' Raft ids (unsigned 64-bit).
    #[schema(schema_with = raft_ids)]
    pub voters: Vec<u64>,
    /// Every member.
    pub members: Vec<Member>,
    /// The node that answered.
    pub answered_by: String,
    /// The cluster's VMs by state, as this node's copy of the state has them (a dashboard
    /// needs these counts, not every VM).
    #[serde(default)]
    pub vms: crate::VmCounts,
}

/// A node of the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// The node's name, unique in the cluster: its seed's `node_name`, else its host name;
    /// when another node holds that name already, `<name>-<first 6 hex digits of its id>`
    /// (a `node.renamed` event says so). Null only for a node that registered before
    /// nodes had names (until it registers again).
    #[serde(default)]
    pub name: Option<String>,
    /// The node's Raft id (unsigned 64-bit), as the cluster status's `leader`, `voters`
    /// and `members` give it; null for a node id that has none.
    #[serde(default)]
    #[schema(schema_with = raft_id_or_null)]
    pub raft_id: Option<u64>,
    /// Management address (`host:port`), if the node registered one.
    #[schema(value_type = Option<String>)]
    pub address: serde_json::Value,
    /// `up`, `suspect` or `down`, as seen by the node that answered.
    pub state: String,
    /// The node's latest published metrics (CPU, memory, load, disks), if any.
    #[schema(value_type = Option<Object>)]
    pub metrics: serde_json::Value,
    /// The health of the node's block store, as the node last reported it; null until it
    /// has (or for a node whose `tesserad` predates the report).
    #[serde(default)]
    pub storage: Option<NodeStorage>,
    /// What the VMs placed on the node take of it, as the scheduler counts it.
    #[serde(default)]
    pub allocation: NodeAllocation,
    /// Maintenance mode: null when the node is not in maintenance.
    #[serde(default)]
    pub maintenance: Option<NodeMaintenance>,
}

/// A node in maintenance: it takes no new VMs (starts, creations, migrations to it, HA
/// restarts), and the HA manager moves its running VMs away by live migration, one at a
/// time. A VM that cannot move (no room elsewhere, not running, its migration failed) stays
/// and is named in `vms_left`; the events say why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeMaintenance {
    /// Who turned it on.
    pub by: String,
    /// When (ms since the epoch).
    pub since_ms: u64,
    /// The VMs still placed on the node whose desired state is not `stopped`.
    pub vms_left: Vec<String>,
    /// Those of them migrating away now.
    pub migrating: Vec<String>,
    /// True once no VM that should run is placed on the node any more.
    pub drained: bool,
}

/// Turns a node's maintenance mode on or off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRequest {
    /// On (drain the node, refuse new VMs) or off (take VMs again; none moves back by
    /// itself).
    pub enabled: bool,
}

/// A node's memory and CPUs against what the VMs placed on it take: every VM placed
/// there whose desired state is not `stopped` (running, paused, or about to start).
/// Memory is not overcommitted; vCPUs are, up to `vcpus_limit` (the CPUs times the
/// cluster's `vcpu_overcommit`). The scheduler refuses a VM that does not fit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeAllocation {
    /// Physical memory in MiB, as the node published it (0 until it has).
    pub memory_mib: u64,
    /// Memory of the VMs placed on the node, in MiB.
    pub memory_mib_allocated: u64,
    /// CPUs the node has, as it published them (0 until it has).
    pub cpus: u64,
    /// vCPUs of the VMs placed on the node.
    pub vcpus_allocated: u64,
    /// vCPUs the scheduler places on the node at most: its CPUs times the cluster's
    /// `vcpu_overcommit`, rounded down (absent from nodes that predate the setting: 0).
    #[serde(default)]
    pub vcpus_limit: u64,
    /// How many VMs are placed on the node.
    pub vms: u64,
}

/// The health of a node's block store (its `tessera-store`), as the node sees it: it asks
/// its store every few seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeStorage {
    /// `ok`, `degraded` or `unreachable`.
    pub state: StorageState,
    /// Why it is degraded or unreachable; null when ok.
    pub reason: Option<String>,
    /// When the node last asked its store (ms since the epoch).
    pub checked_ms: u64,
}

/// States of a node's block store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StorageState {
    /// The store answers and every sync so far succeeded.
    Ok,
    /// A sync of the store's files failed: every flush and FUA write fails with EIO and
    /// the checkpoint has stopped until `tessera-store` restarts (reads and unflushed
    /// writes go on). The disk under it needs attention.
    Degraded,
    /// The node could not get its store's status (not running, not answering in time, or
    /// answering something else); `reason` says which.
    Unreachable,
}

/// How to remove a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Remove even if the node looks up or still holds volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

/// The answer to a node removal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Removed {
    /// The node id.
    pub removed: String,
}
