//! The cluster-wide HA manager: from membership, committed generations and VMM facts it
//! decides, in this order for a failed node, to raise its HA VMs' volume generations
//! (the fence), to place those VMs once every raise of that failure is committed
//! (highest priority first), and to start them; it drains nodes in maintenance and stops
//! copies running where a VM is not placed. It acts only while in the quorum.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{
    Generation, Input, Millis, NodeId, NodeState, Resources, RestartPolicy, StopCause, VmFact,
    VmId, VmSpec, VolumeId,
};
use crate::output::{Action, Event, EventKind, TaskId, TaskRecord, TaskStep};
use crate::placement::{self, Candidate};
use crate::timing::START_TIMEOUT;

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

    fn fact(&mut self, vm: VmId, node: NodeId, fact: VmFact, out: &mut Vec<Action>) {
        let now = self.now;
        let Some(e) = self.vms.get_mut(&vm) else {
            if fact == VmFact::Running {
                out.push(event(
                    EventKind::StaleCopy,
                    format!("{vm} is not defined but runs on {node}; stopping it"),
                ));
                out.push(Action::StopVm { vm, node });
            }
            return;
        };
        match fact {
            VmFact::Running => match e.phase.clone() {
                Phase::Starting { node: n, .. } if n == node => {
                    e.phase = Phase::Running(n);
                    e.failed_starts = 0;
                    if let Some(task) = e.task.take() {
                        out.push(Action::Task(TaskRecord {
                            task,
                            vm: vm.clone(),
                            step: TaskStep::Done,
                        }));
                    }
                    out.push(event(
                        EventKind::Recovered,
                        format!(
                            "{vm} runs on {node}, {} after its recovery began",
                            secs(now - e.lost_at)
                        ),
                    ));
                }
                Phase::Migrating { from, to } if to == node => {
                    e.phase = Phase::Running(to);
                    e.pending = None;
                    if let Some(task) = e.task.take() {
                        out.push(Action::Task(TaskRecord {
                            task,
                            vm: vm.clone(),
                            step: TaskStep::Done,
                        }));
                    }
                    out.push(event(
                        EventKind::Maintenance,
                        format!("{vm} migrated {from} -> {node}"),
                    ));
                }
                Phase::Migrating { from, to } if from == node => {
                    // The source reports it running again: the migration was abandoned.
                    e.phase = Phase::Running(from);
                    if let Some(task) = e.task.take() {
                        let step = TaskStep::Failed(format!("migration to {to} abandoned"));
                        out.push(Action::Task(TaskRecord {
                            task,
                            vm: vm.clone(),
                            step,
                        }));
                    }
                    out.push(event(
                        EventKind::Maintenance,
                        format!("{vm}: migration to {to} failed; it stays on {node}"),
                    ));
                }
                Phase::Running(n) if n == node => {}
                Phase::Lost(n) if n == node => e.phase = Phase::Running(n),
                Phase::Stopped | Phase::Failed if e.spec.placed_on.as_ref() == Some(&node) => {
                    e.phase = Phase::Running(node);
                }
                _ => {
                    let placed = match e.home() {
                        Some(h) => format!("placed on {h}"),
                        None => "not placed anywhere".to_owned(),
                    };
                    out.push(event(
                        EventKind::StaleCopy,
                        format!("{vm} runs on {node} but is {placed}; stopping that copy"),
                    ));
                    out.push(Action::StopVm { vm, node });
                }
            },
            VmFact::Stopped(cause) => {
                if e.home() != Some(&node) {
                    return; // a copy we already replaced or stopped
                }
                let starting = matches!(e.phase, Phase::Starting { .. });
                if let Phase::Migrating { from, .. } = &e.phase {
                    if cause == StopCause::Migrated {
                        return;
                    }
                    e.phase = Phase::Running(from.clone());
                }
                match cause {
                    StopCause::SelfFenced | StopCause::NodeRestarted if e.restartable() => {
                        let batch = self.new_batch();
                        let why = if cause == StopCause::SelfFenced {
                            format!("{node} lost quorum and stopped it")
                        } else {
                            format!("{node} restarted without it")
                        };
                        self.recover(&vm, batch, why, out);
                    }
                    StopCause::SelfFenced | StopCause::NodeRestarted => e.phase = Phase::Lost(node),
                    StopCause::Crashed if starting => {
                        e.failed_starts += 1;
                        let n = e.failed_starts;
                        if e.spec.restart == RestartPolicy::Never || n >= MAX_FAILED_STARTS {
                            let why = format!("crashed starting on {node} ({n} failed starts)");
                            e.phase = Phase::Failed;
                            if let Some(task) = e.task.take() {
                                out.push(Action::Task(TaskRecord {
                                    task,
                                    vm: vm.clone(),
                                    step: TaskStep::Failed(why.clone()),
                                }));
                            }
                            out.push(event(EventKind::Failed, format!("{vm}: {why}")));
                        } else if self.quorum {
                            let batch = self.new_batch();
                            let why = format!("it crashed starting on {node}");
                            self.recover(&vm, batch, why, out);
                        } else {
                            e.phase = Phase::Stopped;
                        }
                    }
                    StopCause::Crashed if e.spec.restart != RestartPolicy::Never => {}
                    StopCause::Guest if e.spec.restart == RestartPolicy::Always => {}
                    StopCause::Migrated => {}
                    _ => {
                        e.phase = Phase::Stopped;
                        e.task = None;
                    }
                }
            }
        }
    }

    fn node_is(&self, node: &NodeId, state: NodeState) -> bool {
        self.nodes.get(node).and_then(|n| n.state) == Some(state)
    }

    /// The decisions taken on every input while in the quorum.
    fn step(&mut self, out: &mut Vec<Action>) {
        self.lose_vms_of_down_nodes(out);
        self.time_out_starts(out);
        self.finish_fences(out);
        self.place(out);
        self.drain(out);
    }

    fn lose_vms_of_down_nodes(&mut self, out: &mut Vec<Action>) {
        let down: BTreeMap<NodeId, u64> = self
            .nodes
            .iter()
            .filter(|(_, i)| i.state == Some(NodeState::Down))
            .map(|(n, i)| (n.clone(), i.down_batch))
            .collect();
        let ids: Vec<VmId> = self.vms.keys().cloned().collect();
        for vm in ids {
            let Some(e) = self.vms.get_mut(&vm) else {
                continue;
            };
            match e.phase.clone() {
                Phase::Migrating { from, to }
                    if down.contains_key(&to) && !down.contains_key(&from) =>
                {
                    e.phase = Phase::Running(from.clone());
                    e.pending = None;
                    if let Some(task) = e.task.take() {
                        out.push(Action::Task(TaskRecord {
                            task,
                            vm: vm.clone(),
                            step: TaskStep::Failed(format!("{to} went down")),
                        }));
                    }
                    out.push(event(
                        EventKind::Maintenance,
                        format!("{vm}: migration to {to} failed ({to} down); it stays on {from}"),
                    ));
                }
                Phase::Running(n)
                | Phase::Starting { node: n, .. }
                | Phase::Migrating { from: n, .. }
                    if down.contains_key(&n) =>
                {
                    if e.restartable() {
                        let batch = down[&n];
                        self.recover(&vm, batch, format!("{n} is down"), out);
                    } else {
                        e.phase = Phase::Lost(n.clone());
                        let why = if e.spec.ha {
                            "it is not meant to run"
                        } else {
                            "HA is off"
                        };
                        out.push(event(
                            EventKind::NotRestarted,
                            format!("{vm} was on {n}, which is down; not restarted: {why}"),
                        ));
                    }
                }
                _ => {}
            }
        }
    }

    fn time_out_starts(&mut self, out: &mut Vec<Action>) {
        let now = self.now;
        let late: Vec<(VmId, NodeId)> = self
            .vms
            .iter()
            .filter_map(|(id, e)| match &e.phase {
                Phase::Starting { node, since } if now.saturating_sub(*since) >= START_TIMEOUT => {
                    Some((id.clone(), node.clone()))
                }
                _ => None,
            })
            .collect();
        for (vm, node) in late {
            let batch = self.new_batch();
            let why = format!(
                "no report of it running on {node} within {}",
                secs(START_TIMEOUT)
            );
            self.recover(&vm, batch, why, out);
        }
    }

    fn finish_fences(&mut self, out: &mut Vec<Action>) {
        let committed = &self.committed;
        let open: BTreeSet<u64> = self
            .vms
            .values()
            .filter_map(|e| match e.phase {
                Phase::Fencing { batch }
                    if e.awaiting
                        .iter()
                        .any(|(v, g)| committed.get(v).copied().unwrap_or_default() < *g) =>
                {
                    Some(batch)
                }
                _ => None,
            })
            .collect();
        for (vm, e) in self.vms.iter_mut() {
            if let Phase::Fencing { batch } = e.phase {
                if !open.contains(&batch) {
                    e.phase = Phase::Ready;
                    if let Some(task) = e.task {
                        out.push(Action::Task(TaskRecord {
                            task,
                            vm: vm.clone(),
                            step: TaskStep::Place,
                        }));
                    }
                }
            }
        }
    }

    fn candidates(&self) -> Vec<Candidate> {
        let mut used: BTreeMap<&NodeId, Resources> = BTreeMap::new();
        for e in self.vms.values() {
            for n in e.allocated_on() {
                let u = used.entry(n).or_default();
                *u = u.plus(e.spec.resources);
            }
        }
        self.nodes
            .iter()
            .map(|(id, i)| Candidate {
                id: id.clone(),
                up: i.state == Some(NodeState::Up),
                maintenance: i.maintenance,
                free: i.capacity.minus(used.get(id).copied().unwrap_or_default()),
            })
            .collect()
    }

    /// Ready VMs by priority (highest first, then by name).
    fn by_priority(&self, pick: impl Fn(&Entry) -> bool) -> Vec<VmId> {
        let mut ids: Vec<(u32, VmId)> = self
            .vms
            .iter()
            .filter(|(_, e)| pick(e))
            .map(|(id, e)| (e.spec.priority, id.clone()))
            .collect();
        ids.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        ids.into_iter().map(|(_, id)| id).collect()
    }

    fn place(&mut self, out: &mut Vec<Action>) {
        let now = self.now;
        for vm in self.by_priority(|e| e.phase == Phase::Ready) {
            let cands = self.candidates();
            let Some(e) = self.vms.get_mut(&vm) else {
                continue;
            };
            match placement::choose(&cands, e.spec.resources, e.spec.preferred.as_ref(), None) {
                Ok(node) => {
                    let generations = e
                        .spec
                        .disks
                        .iter()
                        .map(|d| {
                            (
                                d.clone(),
                                self.committed.get(d).copied().unwrap_or_default(),
                            )
                        })
                        .collect();
                    e.phase = Phase::Starting {
                        node: node.clone(),
                        since: now,
                    };
                    e.pending = None;
                    if let Some(task) = e.task {
                        out.push(Action::Task(TaskRecord {
                            task,
                            vm: vm.clone(),
                            step: TaskStep::Start(node.clone()),
                        }));
                    }
                    out.push(Action::StartVm {
                        vm,
                        node,
                        generations,
                    });
                }
                Err(why) => {
                    if e.pending.as_ref() != Some(&why) {
                        e.pending = Some(why.clone());
                        if let Some(task) = e.task {
                            out.push(Action::Task(TaskRecord {
                                task,
                                vm: vm.clone(),
                                step: TaskStep::Pending(why.clone()),
                            }));
                        }
                        out.push(event(
                            EventKind::Pending,
                            format!("{vm} waits for room: {why}"),
                        ));
                    }
                }
            }
        }
    }

    fn drain(&mut self, out: &mut Vec<Action>) {
        let draining: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, i)| i.maintenance && i.state == Some(NodeState::Up))
            .map(|(n, _)| n.clone())
            .collect();
        for node in draining {
            let on_node = |e: &Entry| e.phase == Phase::Running(node.clone());
            for vm in self.by_priority(on_node) {
                let cands = self.candidates();
                let task = self.new_task();
                let Some(e) = self.vms.get_mut(&vm) else {
                    continue;
                };
                match placement::choose(
                    &cands,
                    e.spec.resources,
                    e.spec.preferred.as_ref(),
                    Some(&node),
                ) {
                    Ok(to) => {
                        e.phase = Phase::Migrating {
                            from: node.clone(),
                            to: to.clone(),
                        };
                        e.pending = None;
                        e.task = Some(task);
                        out.push(Action::Task(TaskRecord {
                            task,
                            vm: vm.clone(),
                            step: TaskStep::Migrate(to.clone()),
                        }));
                        out.push(Action::MigrateVm {
                            vm,
                            from: node.clone(),
                            to,
                        });
                    }
                    Err(why) => {
                        if e.pending.as_ref() != Some(&why) {
                            e.pending = Some(why.clone());
                            out.push(event(
                                EventKind::Pending,
                                format!("{vm} cannot leave {node} yet: {why}"),
                            ));
                        }
                    }
                }
            }
            let busy = self.vms.values().any(|e| {
                matches!(&e.phase, Phase::Running(n) | Phase::Starting { node: n, .. } | Phase::Migrating { from: n, .. } if *n == node)
            });
            if let Some(info) = self.nodes.get_mut(&node) {
                if !busy && !info.drained {
                    info.drained = true;
                    out.push(event(EventKind::Maintenance, format!("{node} drained")));
                }
            }
        }
    }

    /// Whether `node` is known and declared up (for the shell's display).
    pub fn is_up(&self, node: &NodeId) -> bool {
        self.node_is(node, NodeState::Up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(placed: &str) -> VmSpec {
        VmSpec {
            id: VmId::from("web"),
            ha: true,
            priority: 0,
            resources: Resources {
                vcpus: 1,
                memory_mib: 64,
            },
            disks: vec![VolumeId::from("root")],
            preferred: None,
            restart: RestartPolicy::OnCrash,
            desired_running: true,
            placed_on: Some(NodeId::from(placed)),
        }
    }

    fn raises(out: &[Action]) -> usize {
        out.iter()
            .filter(|a| matches!(a, Action::RaiseGeneration { .. }))
            .count()
    }

    #[test]
    fn a_vm_a_user_moved_is_not_recovered_from_its_old_node() {
        let mut m = Manager::new();
        for n in ["n1", "n2", "n3"] {
            m.handle(
                0,
                Input::Membership {
                    node: NodeId::from(n),
                    state: NodeState::Up,
                },
            );
        }
        m.handle(0, Input::Spec(spec("n1")));
        m.handle(0, Input::Quorum(true));
        // Stopped and started on n2 by a user; the manager missed the facts between.
        m.handle(100, Input::Spec(spec("n2")));
        let out = m.handle(
            200,
            Input::Membership {
                node: NodeId::from("n1"),
                state: NodeState::Down,
            },
        );
        assert_eq!(raises(&out), 0, "{out:?}");
        // Its real node failing recovers it.
        let out = m.handle(
            300,
            Input::Membership {
                node: NodeId::from("n2"),
                state: NodeState::Down,
            },
        );
        assert_eq!(raises(&out), 1, "{out:?}");
    }
}
