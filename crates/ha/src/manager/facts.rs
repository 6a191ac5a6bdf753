//! What the manager does with a VMM's report of a VM running or stopped somewhere: a
//! start or migration finished, a stale copy to stop, a crash to restart or give up on.

use crate::model::{NodeId, RestartPolicy, StopCause, VmFact, VmId};
use crate::output::{Action, EventKind, TaskRecord, TaskStep};

use super::{event, secs, Manager, Phase, MAX_FAILED_STARTS};

impl Manager {
    pub(super) fn fact(&mut self, vm: VmId, node: NodeId, fact: VmFact, out: &mut Vec<Action>) {
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
}
