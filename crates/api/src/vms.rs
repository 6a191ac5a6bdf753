//! VM definitions, their lifecycle requests and the state the node running them reports.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a VM should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Powered off.
    Stopped,
    /// Running on the node it was placed on.
    Running,
    /// Placed and started, its vCPUs stopped (state kept).
    Paused,
}

/// What a VM is doing, as the node running it reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Its VMM is being started.
    Starting,
    /// Its vCPUs run.
    Running,
    /// Its vCPUs are stopped, state kept.
    Paused,
    /// It is being powered off.
    Stopping,
    /// Not running.
    #[default]
    Stopped,
    /// It stopped without being asked to (see `state_reason`), and its restart policy
    /// does not (or no longer does) restart it.
    Crashed,
    /// The node that last reported it is down: what it does there is not known (a VM
    /// without `ha` stays placed there until the node is back).
    Unknown,
}

/// What the node does when a VM's VMM ends without being asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it `crashed`.
    Never,
    /// Restart it after a crash (not after the guest powered itself off), with backoff;
    /// a crash loop (5 crashes within 10 minutes) ends `crashed`.
    #[default]
    OnCrash,
    /// Restart it whenever it ends, also after the guest powered itself off.
    Always,
}

/// The runtime state of a VM as the node running it last reported it
/// (`vm_status/<name>` in the cluster state).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    /// The node that reported it (where the VM runs or last ran).
    pub node: String,
    /// What the VM is doing.
    pub state: VmState,
    /// Why it is in that state (a crash's reason and exit detail), if there is more to
    /// say than the state.
    pub reason: Option<String>,
    /// The VMM's process id on that node, while it runs.
    pub pid: Option<u32>,
    /// Restarts by the restart policy since the last start request.
    pub restarts: u32,
    /// The start request this state belongs to (the VM's `start_seq`).
    pub start_seq: u64,
    /// The reboot request last carried out (the VM's `reboot_seq`).
    pub reboot_seq: u64,
    /// When the state last changed (ms since the epoch).
    pub since_ms: u64,
}

/// A VM definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// Name.
    pub name: String,
    /// Virtual CPUs (1-32).
    pub vcpus: u32,
    /// Memory in MiB (16-1048576).
    pub memory_mib: u64,
    /// Volumes, in order (the first is the boot disk).
    pub disks: Vec<String>,
    /// Networks, one NIC each, in order (the networks of `nics`, kept for clients that
    /// only need the names).
    #[serde(default)]
    pub networks: Vec<String>,
    /// Its NICs, in order: network and MAC (assigned at creation when not given, unique
    /// in the cluster, kept across restarts and moves).
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Kernel image path on the node (direct boot).
    pub kernel: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// The boot image (`/images/{name}`) it boots; wins over `kernel`. Its command line
    /// applies unless `cmdline` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A template: it cannot be started; its disks are the read-only bases of the VMs
    /// created from it (`from`).
    #[serde(default)]
    pub template: bool,
    /// The template it was created from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Preferred node id (placement), if pinned.
    pub node: Option<String>,
    /// What it should be doing.
    pub desired_state: DesiredState,
    /// What it is doing, as the node running it reports (`stopped` when no node has).
    #[serde(default)]
    pub actual_state: VmState,
    /// Why it is in that state (a crash's reason and exit detail), if reported.
    #[serde(default)]
    pub state_reason: Option<String>,
    /// The node the scheduler placed it on at its last start (kept while stopped, so a
    /// stopped VM shows where it last ran).
    #[serde(default)]
    pub placed_on: Option<String>,
    /// The node that last reported its state, if any.
    #[serde(default)]
    pub running_on: Option<String>,
    /// What its node does when its VMM ends unasked.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Bumped by every start request (a new start also clears a crash loop).
    #[serde(default)]
    pub start_seq: u64,
    /// Bumped by every reboot request.
    #[serde(default)]
    pub reboot_seq: u64,
    /// The next stop is forced at once (a kill), not a power-off request first.
    #[serde(default)]
    pub force_stop: bool,
    /// Seconds a stop gives the guest to shut down after the power-button press before
    /// it is forced (30 s if unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout_s: Option<u32>,
    /// High availability: when its node fails, the cluster fences its volumes (raises
    /// their generations) and starts it on another node (docs/ha.md).
    #[serde(default)]
    pub ha: bool,
    /// Among HA VMs restarted after a failure, higher is placed first when room is short.
    #[serde(default)]
    pub priority: u32,
    /// Bumped by every update.
    pub generation: u64,
    /// Created (ms since the epoch).
    pub created_ms: u64,
    /// Last changed (ms since the epoch).
    pub updated_ms: u64,
}

/// A NIC of a VM: the network it is on and its MAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Nic {
    /// The network's name.
    pub network: String,
    /// `xx:xx:xx:xx:xx:xx`, lower case.
    #[schema(pattern = "^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")]
    pub mac: String,
}

/// A NIC of a new (or changed) VM: its network and, if the caller picks it, its MAC
/// (unicast, not all zero, used by no other NIC of the cluster); without one the cluster
/// assigns one from its own locally administered prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNic {
    /// The network's name.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub network: String,
    /// `xx:xx:xx:xx:xx:xx` (hex digits, either case), unicast (the first byte even) and
    /// not all zeros; assigned if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9A-Fa-f][02468ACEace](:[0-9A-Fa-f]{2}){5}$")]
    pub mac: Option<String>,
}

fn new_nics() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::ArrayBuilder;
    use utoipa::PartialSchema;
    ArrayBuilder::new()
        .items(NewNic::schema())
        .max_items(Some(crate::limits::MAX_NETWORKS))
        .build()
}

fn new_nics_or_null() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, SchemaType, Type};
    use utoipa::PartialSchema;
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(NewNic::schema())
        .max_items(Some(crate::limits::MAX_NETWORKS))
        .build()
}

/// The schema of a list of resource names, at most `max`, each at most once if `unique`,
/// or `null` if `nullable` (an update leaving the list as it is).
fn names(max: usize, unique: bool, nullable: bool) -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
    let ty = if nullable {
        SchemaType::from_iter([Type::Array, Type::Null])
    } else {
        SchemaType::from(Type::Array)
    };
    ArrayBuilder::new()
        .schema_type(ty)
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(63))
                .pattern(Some(crate::limits::NAME_PATTERN)),
        )
        .max_items(Some(max))
        .unique_items(unique)
        .build()
}

fn disks() -> utoipa::openapi::schema::Array {
    names(crate::limits::MAX_DISKS, true, false)
}

fn networks() -> utoipa::openapi::schema::Array {
    names(crate::limits::MAX_NETWORKS, false, false)
}

fn disks_or_null() -> utoipa::openapi::schema::Array {
    names(crate::limits::MAX_DISKS, true, true)
}

fn networks_or_null() -> utoipa::openapi::schema::Array {
    names(crate::limits::MAX_NETWORKS, false, true)
}

/// A new VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewVm {
    /// 1-63 of a-z, 0-9, '-', starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// Virtual CPUs, 1-32.
    #[serde(deserialize_with = "crate::strict::int")]
    #[schema(minimum = 1, maximum = 32)]
    pub vcpus: u32,
    /// Memory in MiB, 16-1048576.
    #[serde(deserialize_with = "crate::strict::int")]
    #[schema(minimum = 16, maximum = 1048576)]
    pub memory_mib: u64,
    /// Volume names (at most 16, distinct), each attached to no other VM.
    #[serde(default)]
    #[schema(schema_with = disks)]
    pub disks: Vec<String>,
    /// Network names (at most 8), one NIC each with an assigned MAC: shorthand for
    /// `nics` without MACs (give one or the other).
    #[serde(default)]
    #[schema(schema_with = networks)]
    pub networks: Vec<String>,
    /// NICs (at most 8): network and optional MAC each.
    #[serde(default)]
    #[schema(schema_with = new_nics)]
    pub nics: Vec<NewNic>,
    /// Kernel image path on the node: absolute, at most 4096 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 4096, pattern = "^/")]
    pub kernel: Option<String>,
    /// Kernel command line, at most 4096 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096)]
    pub cmdline: Option<String>,
    /// A boot image to boot (instead of `kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub image: Option<String>,
    /// A template to copy: its spec (what this request does not set) and its disks,
    /// cloned copy-on-write into new volumes `<name>-disk<N>` (tasks; the VM can start
    /// once they are ready). `disks` must then be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub from: Option<String>,
    /// Pin to this node (a node id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Default `stopped`. A VM created `running` is placed and started at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_state: Option<DesiredState>,
    /// Default `on-crash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    /// Seconds a stop waits for the guest to shut down before forcing it, 1-3600
    /// (default 30).
    #[serde(
        default,
        deserialize_with = "stop_timeout",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 3600)]
    pub stop_timeout_s: Option<u32>,
    /// High availability (default false): restarted on another node when its node fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<bool>,
    /// Restart priority among HA VMs, 0-1000 (default 0; higher first).
    #[serde(
        default,
        deserialize_with = "priority",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 0, maximum = 1000)]
    pub priority: Option<u32>,
}

/// The longest `stop_timeout_s`.
const MAX_STOP_TIMEOUT_S: u32 = 3600;

/// `stop_timeout_s`: an integer from 1 to [`MAX_STOP_TIMEOUT_S`].
fn stop_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v: Option<u32> = crate::strict::opt_int(d)?;
    match v {
        Some(s) if !(1..=MAX_STOP_TIMEOUT_S).contains(&s) => Err(serde::de::Error::custom(
            format!("stop_timeout_s must be 1 to {MAX_STOP_TIMEOUT_S} seconds, not {s}"),
        )),
        v => Ok(v),
    }
}

/// The highest `priority`.
pub const MAX_PRIORITY: u32 = 1000;

/// `priority`: an integer from 0 to [`MAX_PRIORITY`].
fn priority<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v: Option<u32> = crate::strict::opt_int(d)?;
    match v {
        Some(p) if p > MAX_PRIORITY => Err(serde::de::Error::custom(format!(
            "priority must be 0 to {MAX_PRIORITY}, not {p}"
        ))),
        v => Ok(v),
    }
}

/// Changes to a VM; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct VmUpdate {
    /// Virtual CPUs, 1-32.
    #[serde(
        default,
        deserialize_with = "crate::strict::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 32)]
    pub vcpus: Option<u32>,
    /// Memory in MiB, 16-1048576.
    #[serde(
        default,
        deserialize_with = "crate::strict::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 16, maximum = 1048576)]
    pub memory_mib: Option<u64>,
    /// Seconds a stop waits for the guest to shut down before forcing it, 1-3600 (the
    /// same rule as at creation). Takes effect at the next stop.
    #[serde(
        default,
        deserialize_with = "stop_timeout",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 3600)]
    pub stop_timeout_s: Option<u32>,
    /// Volume names (at most 16, distinct), replacing the current list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = disks_or_null)]
    pub disks: Option<Vec<String>>,
    /// Network names (at most 8), replacing the current NICs (a NIC that stays on the
    /// same network at the same place keeps its MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = networks_or_null)]
    pub networks: Option<Vec<String>>,
    /// NICs (at most 8), replacing the current ones; without a MAC, a NIC that stays on
    /// the same network at the same place keeps its MAC, a new one gets one assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = new_nics_or_null)]
    pub nics: Option<Vec<NewNic>>,
    /// Kernel image path on the node: absolute, at most 4096 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 4096, pattern = "^/")]
    pub kernel: Option<String>,
    /// Kernel command line, at most 4096 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096)]
    pub cmdline: Option<String>,
    /// A boot image to boot (instead of `kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub image: Option<String>,
    /// Pin to this node (a node id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What it should be doing (`running` from `stopped` places and starts it, as
    /// `POST /vms/{name}/start` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_state: Option<DesiredState>,
    /// What its node does when its VMM ends unasked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    /// High availability: restarted on another node when its node fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<bool>,
    /// Restart priority among HA VMs, 0-1000 (higher first).
    #[serde(
        default,
        deserialize_with = "priority",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 0, maximum = 1000)]
    pub priority: Option<u32>,
    /// If given, the update applies only to this generation (optimistic locking).
    #[serde(
        default,
        deserialize_with = "crate::strict::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub generation: Option<u64>,
}

crate::object_only!(NewVm, VmUpdate);

#[cfg(test)]
mod tests {
    use super::*;

    fn new_vm(extra: &str) -> Result<NewVm, String> {
        let text = format!(r#"{{"name":"a","vcpus":1,"memory_mib":64{extra}}}"#);
        serde_json::from_str::<NewVm>(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_stop_timeout_is_whole_seconds_from_1_to_3600() {
        assert_eq!(new_vm("").map(|v| v.stop_timeout_s), Ok(None));
        assert_eq!(
            new_vm(r#","stop_timeout_s":5"#).map(|v| v.stop_timeout_s),
            Ok(Some(5))
        );
        for bad in ["0", "3601", "-1", "1.5", "\"5\""] {
            let res = new_vm(&format!(r#","stop_timeout_s":{bad}"#));
            assert!(res.is_err(), "{bad} accepted");
        }
        let err = new_vm(r#","stop_timeout_s":0"#).unwrap_err();
        assert!(err.contains("stop_timeout_s must be 1 to 3600"), "{err}");
    }

    #[test]
    fn ha_is_a_bool_and_priority_0_to_1000() {
        let v = new_vm(r#","ha":true,"priority":7"#).unwrap();
        assert_eq!((v.ha, v.priority), (Some(true), Some(7)));
        let v = new_vm("").unwrap();
        assert_eq!((v.ha, v.priority), (None, None));
        for bad in [
            r#","ha":"yes""#,
            r#","ha":1"#,
            r#","priority":1001"#,
            r#","priority":-1"#,
        ] {
            assert!(new_vm(bad).is_err(), "{bad} accepted");
        }
    }
}
