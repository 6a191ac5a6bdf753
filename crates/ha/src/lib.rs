//! tessera-ha: decides what the cluster does when a node fails — fence its volumes by
//! generation, place its HA VMs on surviving nodes, start them — and when a node loses
//! quorum (stop its own VMs) or enters maintenance (drain it), free of I/O.
//!
//! What this crate owns: the cluster-wide [`Manager`] (it runs where the Raft quorum is),
//! the per-node self-fencing [`Guard`], the pure [`placement`] rule, the [`timing`] budget,
//! and a deterministic [`sim`]ulator that replays scripted failure scenarios against them.
//! What it must not do: read the clock, open sockets, touch files, spawn threads or talk
//! to Raft. The shell (tesserad, not wired yet) feeds facts in as [`Input`]s with the time
//! and performs the [`Action`]s that come out, in order.
//!
//! The rule that keeps two copies of a VM from running on the same disks: a VM is started
//! on another node only after the generations of all its volumes were raised through Raft
//! and that raise is committed; the old copy's writes carry the old generation and the
//! stores refuse them (docs/storage.md). See docs/ha.md.

#![forbid(unsafe_code)]

pub mod guard;
pub mod manager;
pub mod model;
pub mod output;
pub mod placement;
pub mod sim;
pub mod timing;

pub use guard::{majority_contact, Guard, GuardAction};
pub use manager::Manager;
pub use model::{
    Generation, Input, Millis, NodeId, NodeState, Resources, RestartPolicy, StopCause, VmFact,
    VmId, VmSpec, VolumeId,
};
pub use output::{Action, Event, EventKind, TaskId, TaskRecord, TaskStep};
