//! The manager's outputs: the actions the shell performs, in order, and the events and
//! task records it keeps for people.

use std::fmt;

use crate::model::{Generation, NodeId, VmId, VolumeId};

/// A task: one recovery or drain of one VM, followed step by step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task{}", self.0)
    }
}

/// A step a task reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskStep {
    /// Raising the generations of the VM's volumes.
    Fence,
    /// Fenced; being placed.
    Place,
    /// No node has room (the reason); retried when room appears.
    Pending(String),
    /// Starting on a node.
    Start(NodeId),
    /// Migrating to a node (maintenance drain).
    Migrate(NodeId),
    /// Running again (or migrated).
    Done,
    /// Given up (the reason).
    Failed(String),
}

/// One step of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRecord {
    /// The task.
    pub task: TaskId,
    /// The VM it is about.
    pub vm: VmId,
    /// The step reached.
    pub step: TaskStep,
}

/// What an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A node was declared down.
    NodeDown,
    /// A node is up again.
    NodeUp,
    /// The manager lost or regained quorum.
    Quorum,
    /// A VM lost its node and will be restarted elsewhere.
    Recovering,
    /// A VM lost its node and is not restarted (HA off).
    NotRestarted,
    /// A VM runs again.
    Recovered,
    /// A VM cannot be placed now.
    Pending,
    /// A copy running where the VM is not placed is being stopped.
    StaleCopy,
    /// A restart failed for good.
    Failed,
    /// Maintenance changed or a drain progressed.
    Maintenance,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::NodeDown => "node-down",
            EventKind::NodeUp => "node-up",
            EventKind::Quorum => "quorum",
            EventKind::Recovering => "recovering",
            EventKind::NotRestarted => "not-restarted",
            EventKind::Recovered => "recovered",
            EventKind::Pending => "pending",
            EventKind::StaleCopy => "stale-copy",
            EventKind::Failed => "failed",
            EventKind::Maintenance => "maintenance",
        })
    }
}

/// An event for people (tesserad's event stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What kind.
    pub kind: EventKind,
    /// What happened, in a sentence.
    pub message: String,
}

/// What the manager asks the shell to do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Raise a volume's generation to at least `to` through Raft: the fence. The shell
    /// reports the commit as [`crate::Input::Committed`].
    RaiseGeneration {
        /// The volume.
        volume: VolumeId,
        /// The generation to reach.
        to: Generation,
    },
    /// Start a VM on a node, its volumes bound to these (committed) generations.
    StartVm {
        /// The VM.
        vm: VmId,
        /// The node.
        node: NodeId,
        /// Each volume with the generation its writes must carry.
        generations: Vec<(VolumeId, Generation)>,
    },
    /// Stop a copy of a VM that runs where the VM is not placed.
    StopVm {
        /// The VM.
        vm: VmId,
        /// The node running the stale copy.
        node: NodeId,
    },
    /// Live-migrate a VM (maintenance drain; tesserad begins it as `POST /vms/{name}/migrate`
    /// would, one at a time).
    MigrateVm {
        /// The VM.
        vm: VmId,
        /// Its node now.
        from: NodeId,
        /// Its node after.
        to: NodeId,
    },
    /// Record a task step.
    Task(TaskRecord),
    /// Emit an event.
    Event(Event),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::RaiseGeneration { volume, to } => {
                write!(f, "raise generation of {volume} to {to}")
            }
            Action::StartVm {
                vm,
                node,
                generations,
            } => {
                write!(f, "start {vm} on {node}")?;
                if !generations.is_empty() {
                    let g: Vec<String> = generations
                        .iter()
                        .map(|(v, g)| format!("{v}@{g}"))
                        .collect();
                    write!(f, " ({})", g.join(" "))?;
                }
                Ok(())
            }
            Action::StopVm { vm, node } => write!(f, "stop {vm} on {node}"),
            Action::MigrateVm { vm, from, to } => write!(f, "migrate {vm} {from} -> {to}"),
            Action::Task(t) => {
                write!(f, "{} {}: ", t.task, t.vm)?;
                match &t.step {
                    TaskStep::Fence => f.write_str("fence"),
                    TaskStep::Place => f.write_str("place"),
                    TaskStep::Pending(why) => write!(f, "pending: {why}"),
                    TaskStep::Start(n) => write!(f, "start on {n}"),
                    TaskStep::Migrate(n) => write!(f, "migrate to {n}"),
                    TaskStep::Done => f.write_str("done"),
                    TaskStep::Failed(why) => write!(f, "failed: {why}"),
                }
            }
            Action::Event(e) => write!(f, "event {}: {}", e.kind, e.message),
        }
    }
}
