//! The cluster-wide HA manager: from membership, committed generations and VMM facts it
//! decides, in this order for a failed node, to raise its HA VMs' volume generations
//! (the fence), to place those VMs once every raise of that failure is committed
//! (highest priority first), and to start them; it drains nodes in maintenance and stops
//! copies running where a VM is not placed. It acts only while in the quorum.

mod decide;
mod facts;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::model::{
    Generation, Input, Millis, NodeId, NodeState, Resources, VmId, VmSpec, VolumeId,
};
use crate::output::{Action, Event, EventKind, TaskId, TaskRecord, TaskStep};

/// Starts that crash before running, in a row, before a VM is given up.
pub const MAX_FAILED_STARTS: u32 = 3;

#[derive(Clone, Debug, Default)]
struct NodeInfo {
    state: Option<NodeState>,
    capacity: Resources,
    maintenance: bool,
    drained: bool,
    /// The fence batch of its last failure.
    down_batch: u64,
}

/// Where a VM is in the manager's eyes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Not running, and not the manager's to start.
    Stopped,
    /// Placed on a node and (as far as known) running there.
    Running(NodeId),
    /// HA off and its node failed: left there (its node restarts it when back).
    Lost(NodeId),
    /// Waiting for the raises of its failure's batch to commit.
    Fencing { batch: u64 },
    /// Fenced, to be placed.
    Ready,
    /// Start ordered.
    Starting { node: NodeId, since: Millis },
    /// Live migration ordered (maintenance drain).
    Migrating { from: NodeId, to: NodeId },
    /// Given up.
    Failed,
}

#[derive(Clone, Debug)]
struct Entry {
    spec: VmSpec,
    phase: Phase,
    task: Option<TaskId>,
    /// The generation each volume must reach before the VM may start elsewhere.
    awaiting: BTreeMap<VolumeId, Generation>,
    /// The last reason reported for not placing or draining it (reported once).
    pending: Option<String>,
    lost_at: Millis,
    failed_starts: u32,
}

impl Entry {
    /// The node its resources are counted on (two during a migration).
    fn allocated_on(&self) -> Vec<&NodeId> {
        match &self.phase {
            Phase::Running(n) | Phase::Lost(n) | Phase::Starting { node: n, .. } => vec![n],
            Phase::Migrating { from, to } => vec![from, to],
            _ => Vec::new(),
        }
    }

    /// The node a copy may legitimately run on.
    fn home(&self) -> Option<&NodeId> {
        match &self.phase {
            Phase::Running(n) | Phase::Lost(n) | Phase::Starting { node: n, .. } => Some(n),
            Phase::Migrating { from, .. } => Some(from),
            _ => None,
        }
    }

    fn restartable(&self) -> bool {
        self.spec.ha && self.spec.desired_running
    }
}

/// The HA manager's state (what tesserad would keep in Raft). Feed it [`Input`]s with the
/// time; perform the [`Action`]s it returns, in order.
#[derive(Clone, Debug, Default)]
pub struct Manager {
    nodes: BTreeMap<NodeId, NodeInfo>,
    vms: BTreeMap<VmId, Entry>,
    committed: BTreeMap<VolumeId, Generation>,
    requested: BTreeMap<VolumeId, Generation>,
    quorum: bool,
    next_task: u64,
    next_batch: u64,
    now: Millis,
}

fn event(kind: EventKind, message: String) -> Action {
    Action::Event(Event { kind, message })
}

fn secs(ms: Millis) -> String {
    format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
}

impl Manager {
    /// A manager that knows nothing yet and is not in the quorum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one input observed at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Action> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        match input {
            Input::Tick => {}
            Input::Quorum(q) => self.quorum_changed(q, &mut out),
            Input::Membership { node, state } => self.membership(node, state, &mut out),
            Input::Capacity { node, capacity } => {
                self.nodes.entry(node).or_default().capacity = capacity;
            }
            Input::Maintenance { node, on } => {
                let info = self.nodes.entry(node.clone()).or_default();
                if info.maintenance != on {
                    info.maintenance = on;
                    info.drained = false;
                    let what = if on {
                        "on: draining, no new VMs"
                    } else {
                        "off"
                    };
                    out.push(event(
                        EventKind::Maintenance,
                        format!("{node} maintenance {what}"),
                    ));
                }
            }
            Input::Spec(spec) => self.spec(spec),
            Input::Removed(vm) => {
                self.vms.remove(&vm);
            }
            Input::Committed { volume, generation } => {
                let c = self.committed.entry(volume).or_default();
                *c = (*c).max(generation);
            }
            Input::Fact { vm, node, fact } => self.fact(vm, node, fact, &mut out),
        }
        if self.quorum {
            self.step(&mut out);
        }
        out
    }

    fn quorum_changed(&mut self, q: bool, out: &mut Vec<Action>) {
        if q == self.quorum {
            return;
        }
        self.quorum = q;
        if !q {
            out.push(event(
                EventKind::Quorum,
                "quorum lost: no decisions until it is back".into(),
            ));
            return;
        }
        out.push(event(EventKind::Quorum, "quorum regained".into()));
        // Raises proposed before the loss may never have committed; they are idempotent
        // ("at least"), so propose them again.
        let mut again = BTreeMap::new();
        for e in self
            .vms
            .values()
            .filter(|e| matches!(e.phase, Phase::Fencing { .. }))
        {
            for (v, g) in &e.awaiting {
                if self.committed.get(v).copied().unwrap_or_default() < *g {
                    again.insert(v.clone(), *g);
                }
            }
        }
        for (volume, to) in again {
            out.push(Action::RaiseGeneration { volume, to });
        }
    }

    fn membership(&mut self, node: NodeId, state: NodeState, out: &mut Vec<Action>) {
        let batch = self.next_batch;
        let info = self.nodes.entry(node.clone()).or_default();
        let before = info.state.replace(state);
        if before == Some(state) {
            return;
        }
        match state {
            NodeState::Up => {
                if before.is_some() {
                    out.push(event(EventKind::NodeUp, format!("{node} is up")));
                }
            }
            NodeState::Down => {
                info.down_batch = batch;
                self.next_batch += 1;
                out.push(event(EventKind::NodeDown, format!("{node} declared down")));
            }
        }
    }

    fn spec(&mut self, spec: VmSpec) {
        if let Some(e) = self.vms.get_mut(&spec.id) {
            let stop = !spec.desired_running
                && matches!(
                    e.phase,
                    Phase::Fencing { .. } | Phase::Ready | Phase::Failed
                );
            // Placed elsewhere by someone else (a user's start on another node) while the
            // manager was not moving it: it is meant to run there now, not where it was.
            let moved = match (&e.phase, &spec.placed_on) {
                (Phase::Running(n) | Phase::Lost(n), Some(p)) if spec.desired_running => {
                    (n != p).then(|| p.clone())
                }
                _ => None,
            };
            let stop = stop || (!spec.desired_running && matches!(e.phase, Phase::Lost(_)));
            e.spec = spec;
            if stop {
                e.phase = Phase::Stopped;
                e.task = None;
            } else if let Some(p) = moved {
                e.phase = Phase::Running(p);
            }
            return;
        }
        let phase = match (&spec.placed_on, spec.desired_running) {
            (Some(n), true) => Phase::Running(n.clone()),
            _ => Phase::Stopped,
        };
        let entry = Entry {
            spec,
            phase,
            task: None,
            awaiting: BTreeMap::new(),
            pending: None,
            lost_at: 0,
            failed_starts: 0,
        };
        self.vms.insert(entry.spec.id.clone(), entry);
    }

    fn new_task(&mut self) -> TaskId {
        self.next_task += 1;
        TaskId(self.next_task)
    }

    fn new_batch(&mut self) -> u64 {
        self.next_batch += 1;
        self.next_batch - 1
    }

    /// Fences `vm`'s volumes: the first step of every restart elsewhere (or again).
    fn recover(&mut self, vm: &VmId, batch: u64, why: String, out: &mut Vec<Action>) {
        let task = self.new_task();
        let now = self.now;
        let Some(e) = self.vms.get_mut(vm) else {
            return;
        };
        e.task = Some(task);
        e.lost_at = now;
        e.pending = None;
        e.awaiting.clear();
        out.push(event(
            EventKind::Recovering,
            format!("{vm}: {why}; fencing its volumes"),
        ));
        out.push(Action::Task(TaskRecord {
            task,
            vm: vm.clone(),
            step: TaskStep::Fence,
        }));
        for d in &e.spec.disks {
            let base = self
                .committed
                .get(d)
                .copied()
                .unwrap_or_default()
                .max(self.requested.get(d).copied().unwrap_or_default());
            let to = Generation(base.0 + 1);
            self.requested.insert(d.clone(), to);
            e.awaiting.insert(d.clone(), to);
            out.push(Action::RaiseGeneration {
                volume: d.clone(),
                to,
            });
        }
        e.phase = Phase::Fencing { batch };
    }

    fn node_is(&self, node: &NodeId, state: NodeState) -> bool {
        self.nodes.get(node).and_then(|n| n.state) == Some(state)
    }

    /// Whether `node` is known and declared up (for the shell's display).
    pub fn is_up(&self, node: &NodeId) -> bool {
        self.node_is(node, NodeState::Up)
    }
}
