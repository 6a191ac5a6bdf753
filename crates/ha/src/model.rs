//! The manager's inputs: identifiers, VM specs, node resources and the facts the shell
//! reports (membership, quorum, committed generations, what the VMMs do).

use std::fmt;

/// Milliseconds on the shell's monotonic clock (simulated time in the simulator).
pub type Millis = u64;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

name_type!(
    /// A node, by the id tesserad's membership uses.
    NodeId
);
name_type!(
    /// A VM, by name.
    VmId
);
name_type!(
    /// A volume, by name.
    VolumeId
);

/// A volume's generation: the fence. Writes carrying a lower one are refused by the stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// CPU and memory, of a VM or of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Resources {
    /// Virtual (of a VM) or physical (of a node) CPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl Resources {
    /// Whether `need` fits in `self`.
    pub fn holds(&self, need: Resources) -> bool {
        self.vcpus >= need.vcpus && self.memory_mib >= need.memory_mib
    }

    /// What is left of `self` after `used`, never below zero.
    pub fn minus(&self, used: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(used.vcpus),
            memory_mib: self.memory_mib.saturating_sub(used.memory_mib),
        }
    }

    /// Both together.
    pub fn plus(&self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} vCPUs/{} MiB", self.vcpus, self.memory_mib)
    }
}

/// What happens when a VM's VMM ends on a live node (tesserad's reconciler applies it on
/// that node); the manager reads it only when a restart it ordered fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Leave it crashed.
    Never,
    /// Restart it after a crash.
    #[default]
    OnCrash,
    /// Restart it whenever it ends.
    Always,
}

/// A VM as the manager needs to know it (from tesserad's `Vm` record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// Name.
    pub id: VmId,
    /// Restarted elsewhere when its node fails.
    pub ha: bool,
    /// Higher is placed first when room is short.
    pub priority: u32,
    /// What it needs on a node.
    pub resources: Resources,
    /// Its volumes: the ones fenced before it starts elsewhere.
    pub disks: Vec<VolumeId>,
    /// The node it prefers (tesserad's pinned `node`): used when it has room.
    pub preferred: Option<NodeId>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Whether it is meant to run.
    pub desired_running: bool,
    /// Where it was placed (tesserad's `placed_on`), if anywhere.
    pub placed_on: Option<NodeId>,
}

/// A node's state as tesserad's membership reports it from the quorum's side: down after
/// [`crate::timing::DOWN_AFTER`] of silence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Heard recently.
    Up,
    /// Declared down.
    Down,
}

/// Why a VMM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// Someone asked (a user, or the manager stopping a stale copy).
    Asked,
    /// The guest powered itself off.
    Guest,
    /// The node lost quorum and its [`crate::Guard`] stopped every local VM.
    SelfFenced,
    /// A live migration handed it to another node.
    Migrated,
    /// The VMM ended unasked.
    Crashed,
    /// The node restarted (power loss, reset) and runs none of what was placed on it; it
    /// says so once it reaches the quorum again.
    NodeRestarted,
}

impl fmt::Display for StopCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopCause::Asked => "asked",
            StopCause::Guest => "guest powered off",
            StopCause::SelfFenced => "self-fenced",
            StopCause::Migrated => "migrated away",
            StopCause::Crashed => "crashed",
            StopCause::NodeRestarted => "node restarted",
        })
    }
}

/// What a node's VMM did with a VM (tesserad's `vm_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFact {
    /// It runs there.
    Running,
    /// It stopped there.
    Stopped(StopCause),
}

/// One input to [`crate::Manager::handle`]; each comes with the time it was observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Time passed: timeouts, retries of pending placements and drains.
    Tick,
    /// Whether this manager's node is in the Raft quorum (it acts only then).
    Quorum(bool),
    /// Membership changed.
    Membership {
        /// The node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// A node's capacity for VMs (what is allocated is counted by the manager).
    Capacity {
        /// The node.
        node: NodeId,
        /// Its capacity.
        capacity: Resources,
    },
    /// Maintenance mode turned on or off for a node.
    Maintenance {
        /// The node.
        node: NodeId,
        /// On.
        on: bool,
    },
    /// A VM was defined or changed.
    Spec(VmSpec),
    /// A VM was deleted.
    Removed(VmId),
    /// A volume's generation as committed in Raft (initially, and after each raise).
    Committed {
        /// The volume.
        volume: VolumeId,
        /// Its committed generation.
        generation: Generation,
    },
    /// A node reported what its VMM did with a VM. `Running` from the source of a
    /// migration in progress means the migration was abandoned and the VM stays there.
    Fact {
        /// The VM.
        vm: VmId,
        /// The node reporting.
        node: NodeId,
        /// What happened.
        fact: VmFact,
    },
}
