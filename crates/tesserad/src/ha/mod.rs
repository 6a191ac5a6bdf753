//! High availability, the daemon side (issue #12): runs `tessera-ha`'s [`Manager`] on the
//! Raft leader, fed from this daemon's real inputs, and performs its actions; runs the
//! self-fencing [`guard`] on every node.
//!
//! Inputs, every round (250 ms, or at once on a change of the cluster state), each fed only
//! when it changed: the volumes' committed generations (`volumes/<name>`), node capacities
//! (the `metrics` each node publishes in `nodes/<id>`, as `vmrun::scheduler` reads them),
//! the VM specs (`vms/<name>`), what the nodes report (`vm_status/<name>`), then the
//! membership as the management network hears it (`replication::liveness`: down after
//! `health::DOWN_AFTER`). On a node that has just become leader the manager starts empty and
//! is told the quorum only after one full round of inputs, so a raise it orders is always
//! computed from the generations actually committed.
//!
//! Maintenance (`maintenance/<node id>`, `api::node_maintenance`) is fed as it changes; the
//! manager then places nothing there and orders its VMs moved (`MigrateVm`), which
//! [`drain`] carries out one at a time as live migrations.
//!
//! Actions: `RaiseGeneration` is a compare-and-swap of the volume record (the generation
//! only ever rises; `replication::failover` moves a dead primary with its own raise, and the
//! role reconciler tells the stores). `StartVm` writes `placed_on` (and a new `start_seq`)
//! into the VM record, once each of its volumes has a primary on a node that is not down
//! and that primary and generation have held for [`PRIMARY_SETTLE`]: the reconciler of
//! that node starts it. `StopVm` needs nothing: a node's reconciler stops every VMM of a
//! VM not placed on it. Tasks and events are `ha.*` events.
//!
//! Who restarts what: the reconciler (`vmrun`) restarts a crashed VMM on its own live node by
//! the VM's restart policy; the manager moves a VM only when its node is declared down (or a
//! start it ordered was given up), and a node cut off from the majority neither keeps nor
//! starts VMs ([`guard`]). The two never act on the same VM at the same time.
//!
//! The manager's own state is not kept in Raft: a new leader rebuilds it from the records
//! (a VM placed on a node that is down is fenced and restarted again; raises are "at least").

mod drain;
pub mod guard;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::{DesiredState, RestartPolicy as ApiRestart, Vm, VmState, VmStatus, Volume};
use tessera_ha::{
    Action, Generation, Input, Manager, Millis, NodeId, NodeState, Resources, RestartPolicy,
    StopCause, TaskStep, VmFact, VmId, VmSpec, VolumeId,
};
use tessera_state::{Command, Node, Require};

use crate::records::table::{MAINTENANCE, VMS, VOLUMES};
use crate::replication::{liveness, node_records, volumes, Liveness};
use crate::tables::{event, get, put};
use crate::vmrun::VM_STATUS;

pub use guard::fenced;

/// How often the leader's manager looks again without a change of the state.
const ROUND: Duration = Duration::from_millis(250);

/// How long a volume's primary and generation must stay as they are before a VM is
/// started on it: the new primary's node configures its store when it sees the record
/// change (`replication::roles`), which no record confirms; a VMM writing before that is
/// refused.
const PRIMARY_SETTLE: Millis = 1_000;

/// This node's id, for [`reporter_down`].
static ME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Why the state a node reported for a VM is not to be believed: the node is down (the
/// management network has not heard it for `health::DOWN_AFTER`). `None` for a state that
/// holds whatever the node does (stopped, crashed) or a node that is not known down.
pub fn reporter_down(node: &str, state: VmState) -> Option<String> {
    let me = ME.get()?;
    if matches!(state, VmState::Stopped | VmState::Crashed) {
        return None;
    }
    (liveness(me, node) == Liveness::Down).then(|| {
        format!(
            "its node {node} is down; it last reported the VM {}",
            word(state)
        )
    })
}

fn word(s: VmState) -> &'static str {
    match s {
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
        VmState::Stopped => "stopped",
        VmState::Crashed => "crashed",
        VmState::Unknown => "unknown",
    }
}

/// What the manager needs of a VM record.
pub fn spec_of(vm: &Vm) -> VmSpec {
    VmSpec {
        id: VmId(vm.name.clone()),
        ha: vm.ha,
        priority: vm.priority,
        resources: Resources {
            vcpus: u64::from(vm.vcpus),
            memory_mib: vm.memory_mib,
        },
        disks: vm.disks.iter().map(|d| VolumeId(d.clone())).collect(),
        preferred: vm.node.clone().map(NodeId),
        restart: match vm.restart_policy {
            ApiRestart::Never => RestartPolicy::Never,
            ApiRestart::OnCrash => RestartPolicy::OnCrash,
            ApiRestart::Always => RestartPolicy::Always,
        },
        desired_running: !vm.template && vm.desired_state != DesiredState::Stopped,
        placed_on: vm.placed_on.clone().map(NodeId),
    }
}

/// What a node's report says its VMM did, for the manager (`None`: in between).
pub fn fact_of(s: &VmStatus) -> Option<VmFact> {
    match s.state {
        VmState::Running | VmState::Paused => Some(VmFact::Running),
        VmState::Stopped => {
            let guest = s.reason.as_deref().is_some_and(|r| r.contains("guest"));
            Some(VmFact::Stopped(if guest {
                StopCause::Guest
            } else {
                StopCause::Asked
            }))
        }
        VmState::Crashed => Some(VmFact::Stopped(StopCause::Crashed)),
        VmState::Starting | VmState::Stopping | VmState::Unknown => None,
    }
}

/// A node's capacity for VMs from its record's published metrics, its vCPUs at the
/// cluster's overcommit `ratio` (what `vmrun::scheduler::NodeRoom` counts, so an HA
/// restart fits wherever a start would): `None` before it published any.
pub fn capacity_of(record: &serde_json::Value, ratio: f64) -> Option<Resources> {
    let m = &record["metrics"];
    let memory = m["memory_total"].as_u64().filter(|m| *m > 0)?;
    Some(Resources {
        vcpus: crate::vmrun::scheduler::vcpu_limit(m["cpus"].as_u64().unwrap_or(0), ratio),
        memory_mib: memory / (1024 * 1024),
    })
}

/// Starts the HA loops of this node: the guard (every node) and the manager (acting only
/// while this node leads).
pub fn start(
    shared: crate::SharedNode,
    me: String,
    heard: crate::Heard,
    data_dir: std::path::PathBuf,
    api: std::sync::Arc<crate::api::ApiState>,
) {
    let _ = ME.set(me.clone());
    guard::start(shared.clone(), me.clone(), heard, data_dir);
    tokio::spawn(async move {
        let node = loop {
            if let Some(n) = shared.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let clock = Instant::now();
        let mut leading: Option<Shell> = None;
        let mut rx = node.state.subscribe();
        loop {
            let leader = node.raft.metrics().borrow().current_leader == Some(node.id);
            if !leader {
                if leading.take().is_some() {
                    tracing::info!("no longer the leader: the HA manager stops here");
                }
            } else {
                let shell = leading.get_or_insert_with(|| {
                    tracing::info!("leader: the HA manager runs here");
                    Shell::default()
                });
                let now = clock.elapsed().as_millis() as Millis;
                shell.round(&node, &me, &api, now).await;
            }
            if tokio::time::timeout(ROUND, rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
    });
}

/// The manager and what it was last told, so each input is fed once per change.
#[derive(Default)]
struct Shell {
    manager: Manager,
    quorum: bool,
    committed: HashMap<String, u64>,
    /// Each volume's primary and generation, and since when (this leader's clock).
    volume_since: HashMap<String, ((String, u64), Millis)>,
    /// Starts the manager ordered that wait for their volumes: VM → (node, generations).
    starts: BTreeMap<String, (String, Vec<(VolumeId, Generation)>)>,
    capacity: HashMap<String, Resources>,
    specs: HashMap<String, VmSpec>,
    facts: HashMap<String, (String, VmFact)>,
    membership: HashMap<String, NodeState>,
    /// Which nodes the manager was told are in maintenance.
    maintenance: HashMap<String, bool>,
    drains: drain::Drains,
}

impl Shell {
    async fn round(&mut self, node: &Node, me: &str, api: &crate::api::ApiState, now: Millis) {
        let mut actions = Vec::new();
        let records = node_records(node);
        let vols = volumes(node);
        for v in &vols {
            let now_is = (v.node.clone(), v.generation);
            match self.volume_since.get(&v.name) {
                Some((was, _)) if *was == now_is => {}
                _ => {
                    self.volume_since.insert(v.name.clone(), (now_is, now));
                }
            }
            if self.committed.get(&v.name) != Some(&v.generation) {
                self.committed.insert(v.name.clone(), v.generation);
                actions.extend(self.manager.handle(
                    now,
                    Input::Committed {
                        volume: VolumeId(v.name.clone()),
                        generation: Generation(v.generation),
                    },
                ));
            }
        }
        let ratio = crate::api::settings::current(node)
            .map(|s| s.vcpu_overcommit)
            .unwrap_or(crate::vmrun::scheduler::DEFAULT_VCPU_OVERCOMMIT);
        for (id, rec) in &records {
            if let Some(c) = capacity_of(rec, ratio) {
                if self.capacity.get(id) != Some(&c) {
                    self.capacity.insert(id.clone(), c);
                    actions.extend(self.manager.handle(
                        now,
                        Input::Capacity {
                            node: NodeId(id.clone()),
                            capacity: c,
                        },
                    ));
                }
            }
        }
        let vms: Vec<Vm> = read_table(node, VMS);
        let names: Vec<String> = vms.iter().map(|v| v.name.clone()).collect();
        for vm in &vms {
            let spec = spec_of(vm);
            if self.specs.get(&vm.name) != Some(&spec) {
                self.specs.insert(vm.name.clone(), spec.clone());
                actions.extend(self.manager.handle(now, Input::Spec(spec)));
            }
        }
        let gone: Vec<String> = self
            .specs
            .keys()
            .filter(|k| !names.contains(k))
            .cloned()
            .collect();
        for name in gone {
            self.specs.remove(&name);
            self.facts.remove(&name);
            actions.extend(self.manager.handle(now, Input::Removed(VmId(name))));
        }
        let statuses: BTreeMap<String, VmStatus> = read_table_keyed(node, VM_STATUS);
        for (name, s) in statuses {
            if !self.specs.contains_key(&name) {
                continue;
            }
            let Some(fact) = fact_of(&s) else { continue };
            let key = (s.node.clone(), fact);
            if self.facts.get(&name) != Some(&key) {
                self.facts.insert(name.clone(), key);
                actions.extend(self.manager.handle(
                    now,
                    Input::Fact {
                        vm: VmId(name),
                        node: NodeId(s.node),
                        fact,
                    },
                ));
            }
        }
        for id in records.keys() {
            let state = match liveness(me, id) {
                Liveness::Up => NodeState::Up,
                Liveness::Down => NodeState::Down,
                Liveness::Unknown => continue,
            };
            if self.membership.get(id) != Some(&state) {
                self.membership.insert(id.clone(), state);
                actions.extend(self.manager.handle(
                    now,
                    Input::Membership {
                        node: NodeId(id.clone()),
                        state,
                    },
                ));
            }
        }
        let in_maintenance: Vec<String> = node.state.read(|t| {
            t.get(MAINTENANCE)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        });
        for id in records
            .keys()
            .chain(self.maintenance.keys())
            .cloned()
            .collect::<Vec<_>>()
        {
            let on = in_maintenance.contains(&id);
            if self.maintenance.get(&id).copied().unwrap_or(false) != on {
                self.maintenance.insert(id.clone(), on);
                actions.extend(self.manager.handle(
                    now,
                    Input::Maintenance {
                        node: NodeId(id),
                        on,
                    },
                ));
            }
        }
        if !self.quorum {
            // Everything is known now: decisions may start.
            self.quorum = true;
            actions.extend(self.manager.handle(now, Input::Quorum(true)));
        }
        actions.extend(self.manager.handle(now, Input::Tick));
        self.dispatch(node, actions).await;
        let drained = self.drains.step(node, api, now).await;
        for (vm, msg) in drained.events {
            note(node, "ha.migrate", &vm, &msg).await;
        }
        for vm in drained.refeed {
            self.facts.remove(&vm);
        }
        let mut actions = Vec::new();
        for input in drained.inputs {
            actions.extend(self.manager.handle(now, input));
        }
        self.dispatch(node, actions).await;
        let vols: HashMap<String, Volume> = vols.into_iter().map(|v| (v.name.clone(), v)).collect();
        let ready: Vec<String> = self
            .starts
            .iter()
            .filter(|(_, (_, gens))| {
                gens.iter().all(|(v, _)| {
                    vols.get(&v.0).is_some_and(|rec| {
                        liveness(me, &rec.node) != Liveness::Down
                            && self.volume_since.get(&v.0).is_some_and(|(_, since)| {
                                now.saturating_sub(*since) >= PRIMARY_SETTLE
                            })
                    })
                })
            })
            .map(|(vm, _)| vm.clone())
            .collect();
        for vm in ready {
            if let Some((target, gens)) = self.starts.remove(&vm) {
                place(node, &vm, &target, &gens).await;
            }
        }
    }
}

impl Shell {
    /// Performs the manager's actions, but starts (once their volumes can serve them) and
    /// migrations (one at a time) are held here.
    async fn dispatch(&mut self, node: &Node, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::StartVm {
                    vm,
                    node: target,
                    generations,
                } => {
                    self.starts.insert(vm.0, (target.0, generations));
                }
                Action::MigrateVm { vm, from, to } => {
                    tracing::info!(vm = %vm, from = %from, to = %to, "HA: maintenance drain ordered");
                    self.drains.order(&vm, &from, &to);
                }
                a => perform(node, a).await,
            }
        }
    }
}

fn read_table<T: serde::de::DeserializeOwned>(node: &Node, table: &str) -> Vec<T> {
    read_table_keyed::<T>(node, table).into_values().collect()
}

fn read_table_keyed<T: serde::de::DeserializeOwned>(
    node: &Node,
    table: &str,
) -> BTreeMap<String, T> {
    node.state.read(|t| {
        t.get(table)
            .map(|t| {
                t.iter()
                    .filter_map(|(k, v)| {
                        serde_json::from_value::<T>(v.clone())
                            .ok()
                            .map(|v| (k.clone(), v))
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Performs one action of the manager.
async fn perform(node: &Node, action: Action) {
    tracing::info!(action = %action, "HA");
    match action {
        Action::RaiseGeneration { volume, to } => raise(node, &volume.0, to.0).await,
        Action::StartVm {
            vm,
            node: target,
            generations,
        } => place(node, &vm.0, &target.0, &generations).await,
        // The reconciler of that node stops every VMM of a VM not placed there.
        Action::StopVm { .. } => {}
        // Held by the shell and begun one at a time ([`drain`]).
        Action::MigrateVm { .. } => {}
        Action::Task(t) => {
            let step = match &t.step {
                TaskStep::Fence => "fence: raising the generations of its volumes".to_string(),
                TaskStep::Place => "place: its volumes are fenced".to_string(),
                TaskStep::Pending(why) => format!("pending: {why}"),
                TaskStep::Start(n) => format!("start on {n}"),
                TaskStep::Migrate(n) => format!("migrate to {n}"),
                TaskStep::Done => "done: it runs".to_string(),
                TaskStep::Failed(why) => format!("failed: {why}"),
            };
            note(node, "ha.task", &t.vm.0, &format!("HA {}: {step}", t.task)).await;
        }
        Action::Event(e) => {
            note(node, &format!("ha.{}", e.kind), "ha", &e.message).await;
        }
    }
}

/// Writes an event (best effort: a lost event is logged, not retried).
async fn note(node: &Node, kind: &str, target: &str, message: &str) {
    let cmd = Command::Txn {
        require: vec![],
        ops: vec![event(kind, target, "tesserad", message)],
    };
    if let Err(e) = node.write(cmd).await {
        tracing::warn!(error = %e, kind, message, "HA event not recorded");
    }
}

/// Raises volume `name`'s generation to at least `to` by a compare-and-swap of its record.
/// The manager sees the commit in the next round's record.
async fn raise(node: &Node, name: &str, to: u64) {
    for _ in 0..3 {
        let Some(v) = get::<Volume>(node, VOLUMES, name) else {
            tracing::warn!(volume = name, "HA fence: no such volume");
            return;
        };
        if v.generation >= to {
            return;
        }
        let mut new = v.clone();
        new.generation = to;
        let msg = format!(
            "generation raised from {} to {to} by the HA manager (fence before a restart elsewhere)",
            v.generation
        );
        let cmd = Command::Txn {
            require: vec![Require::equals(VOLUMES, name, json!(v))],
            ops: vec![
                put(VOLUMES, name, &new),
                event("ha.fence", name, "tesserad", &msg),
            ],
        };
        match node.write(cmd).await {
            Ok(a) if a.conflict.is_none() => return,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "HA fence not committed; retried next round");
                return;
            }
        }
    }
}

/// Places VM `name` on `target` (its reconciler starts it there) with a new start.
async fn place(node: &Node, name: &str, target: &str, generations: &[(VolumeId, Generation)]) {
    for _ in 0..3 {
        // Raised with the placement, so a start counting the target's room meanwhile
        // fails its compare-and-swap and is placed again with this VM counted.
        let held = crate::vmrun::reservation::Counters::read(node).reserve(target);
        let Some(vm) = get::<Vm>(node, VMS, name) else {
            return;
        };
        if vm.desired_state == DesiredState::Stopped {
            return;
        }
        let mut new = vm.clone();
        new.placed_on = Some(target.to_string());
        new.start_seq += 1;
        new.force_stop = false;
        let gens: Vec<String> = generations
            .iter()
            .map(|(v, g)| format!("{v} at generation {g}"))
            .collect();
        let msg = format!(
            "placed on {target} by the HA manager{}",
            if gens.is_empty() {
                String::new()
            } else {
                format!(" ({})", gens.join(", "))
            }
        );
        let mut require = vec![Require::equals(VMS, name, json!(vm))];
        let mut ops = vec![
            put(VMS, name, &new),
            event("ha.start", name, "tesserad", &msg),
        ];
        // The node left keeps no record: its VMM's key is refused from this entry on.
        ops.extend(crate::vmrun::writer_key::retire_moved(&vm, &new));
        held.into_txn(&mut require, &mut ops);
        let cmd = Command::Txn { require, ops };
        match node.write(cmd).await {
            Ok(a) if a.conflict.is_none() => return,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(vm = name, error = %e, "HA placement not committed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(extra: serde_json::Value) -> Vm {
        let mut v = json!({
            "name": "web", "vcpus": 2, "memory_mib": 256, "disks": ["root"],
            "desired_state": "running", "placed_on": "n1", "node": "n2",
            "created_ms": 0, "updated_ms": 0, "generation": 1,
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_vm_record_becomes_the_managers_spec() {
        let s = spec_of(&vm(json!({"ha": true, "priority": 5})));
        assert!(s.ha && s.desired_running);
        assert_eq!(s.priority, 5);
        assert_eq!(
            s.resources,
            Resources {
                vcpus: 2,
                memory_mib: 256
            }
        );
        assert_eq!(s.disks, vec![VolumeId("root".into())]);
        assert_eq!(s.placed_on, Some(NodeId("n1".into())));
        assert_eq!(s.preferred, Some(NodeId("n2".into())));
        // Without the fields (older records): not HA, priority 0.
        let s = spec_of(&vm(json!({"desired_state": "stopped"})));
        assert!(!s.ha && !s.desired_running);
        assert_eq!(s.priority, 0);
    }

    #[test]
    fn node_reports_become_facts() {
        let st = |state, reason: Option<&str>| VmStatus {
            node: "n1".into(),
            state,
            reason: reason.map(str::to_string),
            ..VmStatus::default()
        };
        assert_eq!(fact_of(&st(VmState::Running, None)), Some(VmFact::Running));
        assert_eq!(fact_of(&st(VmState::Paused, None)), Some(VmFact::Running));
        assert_eq!(fact_of(&st(VmState::Starting, None)), None);
        assert_eq!(
            fact_of(&st(VmState::Crashed, Some("killed by signal 9"))),
            Some(VmFact::Stopped(StopCause::Crashed))
        );
        assert_eq!(
            fact_of(&st(
                VmState::Stopped,
                Some("VM stopped: the guest shut down")
            )),
            Some(VmFact::Stopped(StopCause::Guest))
        );
        assert_eq!(
            fact_of(&st(VmState::Stopped, None)),
            Some(VmFact::Stopped(StopCause::Asked))
        );
    }

    #[test]
    fn capacity_comes_from_published_metrics() {
        let rec = json!({"metrics": {"memory_total": 4u64 << 30, "cpus": 8}});
        assert_eq!(
            capacity_of(&rec, 1.0),
            Some(Resources {
                vcpus: 8,
                memory_mib: 4096
            })
        );
        // vCPUs at the cluster's overcommit, as the scheduler counts them; memory never.
        assert_eq!(
            capacity_of(&rec, 2.5),
            Some(Resources {
                vcpus: 20,
                memory_mib: 4096
            })
        );
        assert_eq!(capacity_of(&json!({}), 4.0), None);
    }
}
