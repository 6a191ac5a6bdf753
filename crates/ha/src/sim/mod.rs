//! A deterministic simulator: nodes that power off, lose their link or split into
//! partitions, announcements, the quorum's membership view, Raft commits, VMMs that take
//! time to start and migrate, one [`Guard`] per node and the [`Manager`] where the quorum
//! is — on a 100 ms tick. It writes a log (compared with a checked-in one in the scenario
//! tests) and checks, on every tick, that no VM runs twice and that nothing starts before
//! its volumes' raise is committed.
//!
//! What it simplifies, on purpose: the manager's state is one object that survives leader
//! changes (tesserad keeps it in Raft); links fail symmetrically; a raise proposed while
//! the quorum is lost is dropped (the manager proposes it again).

pub mod scenario;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::guard::{majority_contact, Guard, GuardAction};
use crate::manager::Manager;
use crate::model::{
    Generation, Input, Millis, NodeId, NodeState, StopCause, VmFact, VmId, VmSpec, VolumeId,
};
use crate::output::Action;
use crate::timing::{ANNOUNCE_EVERY, DOWN_AFTER};
pub use scenario::{Command, ParseError, Scenario};

/// The simulator's clock step.
pub const TICK: Millis = 100;
/// From a raise proposed to it committed (while the quorum holds).
pub const COMMIT_LATENCY: Millis = 200;
/// From a start ordered to the VMM running.
pub const START_LATENCY: Millis = 1_500;
/// From a migration ordered to the VM running on the target.
pub const MIGRATE_LATENCY: Millis = 2_000;

/// Knobs that break the system on purpose, to show the checker catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Nodes stop their VMs when they lose quorum (the real behaviour).
    pub self_fence: bool,
    /// Tell the manager a raise committed the moment it is proposed, without committing it.
    pub lie_about_commits: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            self_fence: true,
            lie_about_commits: false,
        }
    }
}

/// A time an HA VM ran nowhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outage {
    /// The VM.
    pub vm: VmId,
    /// When its last copy stopped.
    pub from: Millis,
    /// When a copy ran again (`None`: not by the end).
    pub to: Option<Millis>,
}

/// What a run produced.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The log, one line per event.
    pub log: Vec<String>,
    /// Invariants broken (empty when all held).
    pub violations: Vec<String>,
    /// Every outage of an HA VM meant to run.
    pub outages: Vec<Outage>,
    /// Where each VM runs at the end.
    pub running: BTreeMap<VmId, NodeId>,
    /// Starts that went through (for tests that must exercise restarts).
    pub starts: usize,
}

type Bound = Vec<(VolumeId, Generation)>;

struct SimNode {
    id: NodeId,
    powered: bool,
    link: bool,
    group: usize,
    guard: Guard,
    running: BTreeMap<VmId, Bound>,
    /// Facts not yet reported to the quorum (written to Raft once it can reach it).
    outbox: Vec<(VmId, VmFact)>,
    /// What it ran or was starting when it lost power.
    lost: Vec<VmId>,
}

struct World {
    now: Millis,
    opts: Options,
    nodes: Vec<SimNode>,
    /// heard[i][j]: when node i last heard node j.
    heard: Vec<Vec<Option<Millis>>>,
    manager: Manager,
    inbox: VecDeque<Input>,
    committed: BTreeMap<VolumeId, Generation>,
    proposals: Vec<(Millis, VolumeId, Generation)>,
    starts: Vec<(Millis, VmId, usize, Bound)>,
    /// Starts ordered but not yet seen by their node (it cannot reach the quorum).
    undelivered: Vec<(VmId, usize, Bound)>,
    migrations: Vec<(Millis, VmId, usize, usize)>,
    quorum_sent: Option<bool>,
    membership_sent: Vec<Option<NodeState>>,
    last_bound: BTreeMap<VmId, Bound>,
    watched: BTreeSet<VmId>,
    down_since: BTreeMap<VmId, Millis>,
    doubled: BTreeSet<VmId>,
    logging: bool,
    out: Outcome,
}

fn stamp(now: Millis) -> String {
    format!("{:>3}.{}", now / 1000, (now % 1000) / 100)
}

impl World {
    fn log(&mut self, who: &str, text: String) {
        if self.logging {
            let line = format!("{} {who:<6} {text}", stamp(self.now));
            self.out.log.push(line);
        }
    }

    fn violation(&mut self, text: String) {
        self.log("CHECK", format!("VIOLATION {text}"));
        let line = format!("at {}: {text}", stamp(self.now).trim());
        self.out.violations.push(line);
    }

    fn index(&self, node: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| &n.id == node)
    }

    fn connected(&self, i: usize, j: usize) -> bool {
        let (a, b) = (&self.nodes[i], &self.nodes[j]);
        if i == j {
            return a.powered;
        }
        a.powered && b.powered && a.link && b.link && a.group == b.group
    }

    /// The nodes of the partition holding a majority, if one does.
    fn quorum_group(&self) -> Option<Vec<usize>> {
        let n = self.nodes.len();
        (0..n)
            .map(|i| (0..n).filter(|&j| self.connected(i, j)).collect::<Vec<_>>())
            .find(|g| g.len() > n / 2)
    }

    fn reaches_quorum(&self, i: usize) -> bool {
        self.quorum_group()
            .is_some_and(|g| g.iter().any(|&m| self.connected(i, m)))
    }

    /// Feeds the manager every queued input, performing its actions (which may queue more).
    fn deliver(&mut self, input: Input) {
        self.inbox.push_back(input);
        while let Some(input) = self.inbox.pop_front() {
            match &input {
                Input::Membership { node, state } => {
                    let s = if *state == NodeState::Up {
                        "up"
                    } else {
                        "down"
                    };
                    self.log("member", format!("{node} {s}"));
                }
                Input::Committed { volume, generation } => {
                    self.log("raft", format!("committed {volume}@{generation}"));
                }
                Input::Fact { vm, node, fact } => {
                    let f = match fact {
                        VmFact::Running => "running".to_owned(),
                        VmFact::Stopped(c) => format!("stopped ({c})"),
                    };
                    self.log(&node.0.clone(), format!("reports {vm} {f}"));
                }
                _ => {}
            }
            let actions = self.manager.handle(self.now, input);
            for a in actions {
                self.perform(a);
            }
        }
    }

    fn perform(&mut self, action: Action) {
        self.log("ha", action.to_string());
        match action {
            Action::RaiseGeneration { volume, to } => {
                if self.opts.lie_about_commits {
                    self.inbox.push_back(Input::Committed {
                        volume,
                        generation: to,
                    });
                } else if self.quorum_group().is_some() {
                    self.proposals.push((self.now + COMMIT_LATENCY, volume, to));
                }
            }
            Action::StartVm {
                vm,
                node,
                generations,
            } => {
                let Some(i) = self.index(&node) else { return };
                self.check_fenced(&vm, &generations);
                // The placement is a Raft record: a newer one replaces an older one the
                // node has not picked up yet; the node picks it up once it reaches the
                // quorum.
                self.undelivered.retain(|(v, _, _)| *v != vm);
                self.undelivered.push((vm, i, generations));
                self.pick_up_starts();
            }
            Action::StopVm { vm, node } => {
                let Some(i) = self.index(&node) else { return };
                if self.reaches_quorum(i) && self.nodes[i].running.remove(&vm).is_some() {
                    self.nodes[i]
                        .outbox
                        .push((vm, VmFact::Stopped(StopCause::Asked)));
                }
            }
            Action::MigrateVm { vm, from, to } => {
                if let (Some(f), Some(t)) = (self.index(&from), self.index(&to)) {
                    self.migrations.push((self.now + MIGRATE_LATENCY, vm, f, t));
                }
            }
            Action::Task(_) | Action::Event(_) => {}
        }
    }

    /// The fence invariant: a start carries the committed generations, each above the
    /// generation the previous copy was bound to.
    fn check_fenced(&mut self, vm: &VmId, generations: &Bound) {
        for (d, g) in generations {
            let committed = self.committed.get(d).copied().unwrap_or_default();
            if *g > committed {
                self.violation(format!(
                    "{vm} started with {d}@{g} before it was committed (committed {committed})"
                ));
            }
            let before = self
                .last_bound
                .get(vm)
                .and_then(|b| b.iter().find(|(v, _)| v == d))
                .map(|(_, g)| *g);
            if let Some(old) = before {
                if *g <= old {
                    self.violation(format!(
                        "{vm} started with {d}@{g}, not above its last copy's {old}"
                    ));
                }
            }
        }
    }

    /// Nodes that reach the quorum launch the starts placed on them, unless a volume's
    /// generation was raised since (the store would refuse the stale binding).
    fn pick_up_starts(&mut self) {
        let mut keep = Vec::new();
        for (vm, i, bound) in std::mem::take(&mut self.undelivered) {
            if !self.nodes[i].powered {
                continue;
            }
            if !self.reaches_quorum(i) {
                keep.push((vm, i, bound));
                continue;
            }
            let stale = bound
                .iter()
                .any(|(d, g)| self.committed.get(d).is_some_and(|c| c > g));
            if stale {
                let who = self.nodes[i].id.0.clone();
                self.log(&who, format!("start of {vm} superseded by a newer fence"));
                continue;
            }
            self.starts.push((self.now + START_LATENCY, vm, i, bound));
        }
        self.undelivered = keep;
    }

    fn command(&mut self, c: Command) {
        self.log("world", c.to_string());
        match c {
            Command::Power(n, on) => {
                let Some(i) = self.index(&n) else { return };
                let node = &mut self.nodes[i];
                if node.powered == on {
                    return;
                }
                node.powered = on;
                if on {
                    // Back from a power loss it reads what was placed on it (here: what
                    // it ran or was starting) and reports it gone.
                    let gone = std::mem::take(&mut node.lost);
                    node.outbox = gone
                        .into_iter()
                        .map(|vm| (vm, VmFact::Stopped(StopCause::NodeRestarted)))
                        .collect();
                } else {
                    // What it ran, was starting, or had not reported yet: after the
                    // restart it reports all of it gone.
                    let mut gone: BTreeSet<VmId> =
                        std::mem::take(&mut node.running).into_keys().collect();
                    gone.extend(
                        std::mem::take(&mut node.outbox)
                            .into_iter()
                            .map(|(vm, _)| vm),
                    );
                    gone.extend(self.starts.iter().filter(|s| s.2 == i).map(|s| s.1.clone()));
                    self.starts.retain(|s| s.2 != i);
                    gone.extend(
                        self.undelivered
                            .iter()
                            .filter(|s| s.1 == i)
                            .map(|s| s.0.clone()),
                    );
                    self.undelivered.retain(|s| s.1 != i);
                    self.nodes[i].lost = gone.into_iter().collect();
                    // A migration to it is abandoned now; the source says so.
                    let (dead, alive): (Vec<_>, Vec<_>) = self
                        .migrations
                        .drain(..)
                        .partition(|m| m.2 == i || m.3 == i);
                    self.migrations = alive;
                    for (_, vm, f, _) in dead {
                        if f != i && self.nodes[f].running.contains_key(&vm) {
                            self.nodes[f].outbox.push((vm, VmFact::Running));
                        }
                    }
                }
                let node = &mut self.nodes[i];
                node.guard = Guard::new();
                for h in self.heard[i].iter_mut() {
                    *h = None;
                }
            }
            Command::Link(n, up) => {
                if let Some(i) = self.index(&n) {
                    self.nodes[i].link = up;
                }
            }
            Command::Partition(groups) => {
                for (g, members) in groups.iter().enumerate() {
                    for m in members {
                        if let Some(i) = self.index(m) {
                            self.nodes[i].group = g;
                        }
                    }
                }
            }
            Command::Heal => self.nodes.iter_mut().for_each(|n| n.group = 0),
            Command::Maintenance(node, on) => self.deliver(Input::Maintenance { node, on }),
            Command::Capacity(node, capacity) => self.deliver(Input::Capacity { node, capacity }),
        }
    }

    fn announce(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            for j in 0..n {
                if i != j && self.connected(i, j) {
                    self.heard[i][j] = Some(self.now);
                }
            }
        }
    }

    /// The quorum's view of membership and quorum itself, as the manager's inputs.
    fn observe_membership(&mut self) {
        let group = self.quorum_group();
        if self.quorum_sent != Some(group.is_some()) {
            self.quorum_sent = Some(group.is_some());
            self.deliver(Input::Quorum(group.is_some()));
        }
        let Some(group) = group else { return };
        for j in 0..self.nodes.len() {
            let heard = if group.contains(&j) {
                Some(self.now)
            } else {
                group.iter().filter_map(|&m| self.heard[m][j]).max()
            };
            let state = match heard {
                Some(h) if self.now - h < DOWN_AFTER => NodeState::Up,
                _ => NodeState::Down,
            };
            if self.membership_sent[j] != Some(state) {
                self.membership_sent[j] = Some(state);
                let node = self.nodes[j].id.clone();
                self.deliver(Input::Membership { node, state });
            }
        }
    }

    fn commit(&mut self) {
        let quorum = self.quorum_group().is_some();
        let (due, later): (Vec<_>, Vec<_>) = self
            .proposals
            .drain(..)
            .partition(|(at, _, _)| *at <= self.now);
        self.proposals = later;
        for (_, volume, to) in due {
            if !quorum {
                continue; // lost with the leader
            }
            let c = self.committed.entry(volume.clone()).or_default();
            if to > *c {
                *c = to;
            }
            let generation = *c;
            self.deliver(Input::Committed { volume, generation });
        }
    }

    fn vmms(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.starts.drain(..).partition(|s| s.0 <= now);
        self.starts = later;
        for (_, vm, i, bound) in due {
            let node = &mut self.nodes[i];
            if !node.powered {
                continue;
            }
            if node.guard.fenced() {
                node.outbox
                    .push((vm, VmFact::Stopped(StopCause::SelfFenced)));
                continue;
            }
            node.running.insert(vm.clone(), bound.clone());
            node.outbox.push((vm.clone(), VmFact::Running));
            self.last_bound.insert(vm, bound);
            self.out.starts += 1;
        }
        let (due, later): (Vec<_>, Vec<_>) = self.migrations.drain(..).partition(|m| m.0 <= now);
        self.migrations = later;
        for (_, vm, f, t) in due {
            let ok = self.connected(f, t) && self.nodes[f].running.contains_key(&vm);
            if !ok {
                if self.nodes[f].running.contains_key(&vm) {
                    // Abandoned: it keeps running on the source, which says so.
                    self.log(
                        &self.nodes[f].id.0.clone(),
                        format!("migration of {vm} failed"),
                    );
                    self.nodes[f].outbox.push((vm, VmFact::Running));
                }
                continue;
            }
            // The handover is atomic: paused on the source, resumed on the target.
            if let Some(bound) = self.nodes[f].running.remove(&vm) {
                self.nodes[t].running.insert(vm.clone(), bound);
                self.nodes[f]
                    .outbox
                    .push((vm.clone(), VmFact::Stopped(StopCause::Migrated)));
                self.nodes[t].outbox.push((vm, VmFact::Running));
            }
        }
    }

    fn guards(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            if !self.nodes[i].powered {
                continue;
            }
            let peers: Vec<Option<Millis>> = (0..n)
                .filter(|&j| j != i)
                .map(|j| self.heard[i][j])
                .collect();
            let contact = majority_contact(self.now, &peers, n);
            let running = self.nodes[i].running.len();
            let actions = self.nodes[i].guard.observe(self.now, contact, running);
            let who = self.nodes[i].id.0.clone();
            for a in actions {
                match a {
                    GuardAction::QuorumLost => self.log(&who, "guard: quorum lost".into()),
                    GuardAction::QuorumRegained => self.log(&who, "guard: quorum regained".into()),
                    GuardAction::StopAllLocalVms | GuardAction::WatchdogReset => {
                        let what = if a == GuardAction::WatchdogReset {
                            "watchdog reset"
                        } else {
                            "stop all local VMs"
                        };
                        if !self.opts.self_fence {
                            self.log(&who, format!("guard: {what} (disabled)"));
                            continue;
                        }
                        let node = &mut self.nodes[i];
                        let names: Vec<VmId> =
                            std::mem::take(&mut node.running).into_keys().collect();
                        for vm in &names {
                            node.outbox
                                .push((vm.clone(), VmFact::Stopped(StopCause::SelfFenced)));
                        }
                        let list: Vec<&str> = names.iter().map(|v| v.0.as_str()).collect();
                        self.log(&who, format!("guard: {what}: {}", list.join(" ")));
                    }
                }
            }
        }
    }

    fn report(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].outbox.is_empty() || !self.reaches_quorum(i) {
                continue;
            }
            let node = self.nodes[i].id.clone();
            for (vm, fact) in std::mem::take(&mut self.nodes[i].outbox) {
                self.deliver(Input::Fact {
                    vm,
                    node: node.clone(),
                    fact,
                });
            }
        }
    }

    fn check(&mut self) {
        let mut copies: BTreeMap<VmId, Vec<NodeId>> = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.powered) {
            for vm in n.running.keys() {
                copies.entry(vm.clone()).or_default().push(n.id.clone());
            }
        }
        for (vm, nodes) in &copies {
            if nodes.len() > 1 && self.doubled.insert(vm.clone()) {
                let list: Vec<&str> = nodes.iter().map(|n| n.0.as_str()).collect();
                self.violation(format!("two copies of {vm} run: {}", list.join(" ")));
            }
        }
        for vm in self.watched.clone() {
            let runs = copies.contains_key(&vm);
            match (runs, self.down_since.get(&vm).copied()) {
                (false, None) => {
                    self.down_since.insert(vm, self.now);
                }
                (true, Some(from)) => {
                    self.down_since.remove(&vm);
                    self.out.outages.push(Outage {
                        vm,
                        from,
                        to: Some(self.now),
                    });
                }
                _ => {}
            }
        }
    }

    fn tick(&mut self, commands: &[(Millis, Command)]) {
        let now = self.now;
        for (_, c) in commands.iter().filter(|(at, _)| *at == now) {
            self.command(c.clone());
        }
        if self.now % ANNOUNCE_EVERY == 0 {
            self.announce();
        }
        self.observe_membership();
        self.commit();
        self.pick_up_starts();
        self.vmms();
        self.guards();
        self.report();
        self.deliver(Input::Tick);
        self.check();
    }
}

fn setup(scenario: &Scenario, opts: Options) -> World {
    let n = scenario.nodes.len();
    let mut w = World {
        now: 0,
        opts,
        nodes: scenario
            .nodes
            .iter()
            .map(|(id, _)| SimNode {
                id: id.clone(),
                powered: true,
                link: true,
                group: 0,
                guard: Guard::new(),
                running: BTreeMap::new(),
                outbox: Vec::new(),
                lost: Vec::new(),
            })
            .collect(),
        heard: vec![vec![Some(0); n]; n],
        manager: Manager::new(),
        inbox: VecDeque::new(),
        committed: BTreeMap::new(),
        proposals: Vec::new(),
        starts: Vec::new(),
        undelivered: Vec::new(),
        migrations: Vec::new(),
        quorum_sent: Some(true),
        membership_sent: vec![Some(NodeState::Up); n],
        last_bound: BTreeMap::new(),
        watched: BTreeSet::new(),
        down_since: BTreeMap::new(),
        doubled: BTreeSet::new(),
        logging: false,
        out: Outcome::default(),
    };
    w.deliver(Input::Quorum(true));
    for (node, capacity) in &scenario.nodes {
        w.deliver(Input::Capacity {
            node: node.clone(),
            capacity: *capacity,
        });
        w.deliver(Input::Membership {
            node: node.clone(),
            state: NodeState::Up,
        });
    }
    for spec in &scenario.vms {
        let bound: Bound = spec
            .disks
            .iter()
            .map(|d| (d.clone(), Generation(1)))
            .collect();
        for (d, g) in &bound {
            w.committed.insert(d.clone(), *g);
            w.deliver(Input::Committed {
                volume: d.clone(),
                generation: *g,
            });
        }
        w.deliver(Input::Spec(spec.clone()));
        if let Some(i) = spec.placed_on.as_ref().and_then(|p| w.index(p)) {
            if spec.desired_running {
                w.nodes[i].running.insert(spec.id.clone(), bound.clone());
                w.last_bound.insert(spec.id.clone(), bound);
                w.deliver(Input::Fact {
                    vm: spec.id.clone(),
                    node: spec
                        .placed_on
                        .clone()
                        .unwrap_or_else(|| w.nodes[i].id.clone()),
                    fact: VmFact::Running,
                });
            }
        }
        if spec.ha && spec.desired_running {
            w.watched.insert(spec.id.clone());
        }
    }
    w.logging = true;
    w
}

/// Runs a scenario to its end.
pub fn run(scenario: &Scenario, opts: Options) -> Outcome {
    let mut w = setup(scenario, opts);
    let mut commands = scenario.commands.clone();
    commands.sort_by_key(|(at, _)| *at);
    while w.now <= scenario.end {
        w.tick(&commands);
        w.now += TICK;
    }
    w.now = scenario.end;
    for (vm, from) in std::mem::take(&mut w.down_since) {
        w.out.outages.push(Outage { vm, from, to: None });
    }
    let mut running = BTreeMap::new();
    for n in w.nodes.iter().filter(|n| n.powered) {
        for vm in n.running.keys() {
            running.insert(vm.clone(), n.id.clone());
        }
    }
    let all: Vec<VmId> = scenario.vms.iter().map(|s: &VmSpec| s.id.clone()).collect();
    let summary: Vec<String> = all
        .iter()
        .map(|vm| match running.get(vm) {
            Some(n) => format!("{vm} on {n}"),
            None => format!("{vm} not running"),
        })
        .collect();
    w.log("end", summary.join(", "));
    w.out.running = running;
    w.out
}
