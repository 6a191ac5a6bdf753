//! The decisions taken on every input while in the quorum, in order: VMs of down nodes
//! lost (and fenced), starts that never reported timed out, fences whose raises all
//! committed finished, ready VMs placed by priority, maintenance nodes drained.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{NodeId, NodeState, Resources, VmId};
use crate::output::{Action, EventKind, TaskRecord, TaskStep};
use crate::placement::{self, Candidate};
use crate::timing::START_TIMEOUT;

use super::{event, secs, Entry, Manager, Phase};

impl Manager {
    pub(super) fn step(&mut self, out: &mut Vec<Action>) {
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
}
