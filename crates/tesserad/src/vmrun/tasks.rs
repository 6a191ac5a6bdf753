//! VM lifecycle tasks on this node: each moves with the state this node reports for its VM
//! (`queued` → `running` with progress → `succeeded` once the state asked for is reported,
//! or `failed` with the reason: a crash, a later request that undid it, the deadline).
//! [`judge`] is the pure decision; [`follow`] reads the state and records the outcome.

use serde_json::json;
use tessera_api::{
    DesiredState, Task, TaskLog, TaskState, Vm, VmAction, VmState, VmStatus, VmTask,
};
use tessera_state::{Command, Node, Require};

use super::VM_STATUS;
use crate::now_ms;
use crate::records::table::{TASKS, VMS};
use crate::tables::{event, get, put};

/// Where a VM task stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not there yet: the progress figure and what the node reports.
    Pending(u8, String),
    /// The state asked for is reported.
    Done(String),
    /// It will not be reached.
    Failed(String),
}

fn state_word(s: VmState) -> &'static str {
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

fn with_reason(what: &str, s: &VmStatus) -> String {
    match &s.reason {
        Some(r) => format!("{what}: {r}"),
        None => what.to_string(),
    }
}

/// Where task `t` stands, given its VM's record, the state its node reports and the time.
pub fn judge(t: &VmTask, vm: Option<&Vm>, s: Option<&VmStatus>, now: u64) -> Verdict {
    let Some(vm) = vm else {
        return Verdict::Failed(format!("VM {} was deleted", t.vm));
    };
    if t.action == VmAction::Migrate {
        // Its node's migration driver moves it along (`crate::migrate`), not the state.
        return Verdict::Pending(0, "followed by the migration".into());
    }
    // The report belongs to this request (or a later one), not to the run before it.
    let fresh = s.filter(|s| {
        s.start_seq >= t.start_seq && (t.action != VmAction::Reboot || s.reboot_seq >= t.reboot_seq)
    });
    let stopping = matches!(t.action, VmAction::Stop | VmAction::Kill);
    if let Some(s) = fresh {
        let reached = match t.action {
            // A crashed VM is not running either: nothing is left to stop.
            VmAction::Stop | VmAction::Kill => {
                matches!(s.state, VmState::Stopped | VmState::Crashed)
                    && vm.desired_state == DesiredState::Stopped
            }
            VmAction::Pause => s.state == VmState::Paused,
            // A pause asked since counts: the VM ran.
            VmAction::Start | VmAction::Resume | VmAction::Reboot | VmAction::Migrate => {
                s.state == VmState::Running
                    || (s.state == VmState::Paused && vm.desired_state == DesiredState::Paused)
            }
        };
        if reached {
            return Verdict::Done(with_reason(&format!("VM {}", state_word(s.state)), s));
        }
        if s.state == VmState::Crashed {
            return Verdict::Failed(with_reason("the VM crashed", s));
        }
        if !stopping && s.state == VmState::Stopped && vm.desired_state == DesiredState::Stopped {
            return Verdict::Failed(with_reason("the VM stopped", s));
        }
    }
    let wanted = match t.action {
        VmAction::Stop | VmAction::Kill => DesiredState::Stopped,
        VmAction::Pause => DesiredState::Paused,
        VmAction::Start | VmAction::Resume | VmAction::Reboot | VmAction::Migrate => {
            DesiredState::Running
        }
    };
    let paused_since = wanted == DesiredState::Running && vm.desired_state == DesiredState::Paused;
    if (vm.desired_state != wanted && !paused_since) || vm.start_seq != t.start_seq {
        return Verdict::Failed(
            "superseded: a later request changed what the VM should do".to_string(),
        );
    }
    if now > t.deadline_ms {
        let now_is = s.map_or("not reported", |s| state_word(s.state));
        return Verdict::Failed(format!("timed out: the VM is {now_is}"));
    }
    match fresh {
        Some(s) if matches!(s.state, VmState::Starting | VmState::Stopping) => {
            Verdict::Pending(50, format!("the node reports {}", state_word(s.state)))
        }
        _ => Verdict::Pending(10, "taken up".to_string()),
    }
}

fn action_word(a: VmAction) -> &'static str {
    match a {
        VmAction::Start => "start",
        VmAction::Stop => "stop",
        VmAction::Kill => "kill",
        VmAction::Reboot => "reboot",
        VmAction::Pause => "pause",
        VmAction::Resume => "resume",
        VmAction::Migrate => "migration",
    }
}

/// Moves this node's open VM tasks along with what it reports.
pub async fn follow(node: &Node, me: &str) {
    let open: Vec<Task> = node.state.read(|t| {
        t.get(TASKS)
            .map(|tasks| {
                tasks
                    .values()
                    .filter(|v| {
                        !v["vm"].is_null()
                            && v["vm"]["action"] != "migrate"
                            && v["node"] == me
                            && (v["state"] == "queued" || v["state"] == "running")
                    })
                    .filter_map(|v| serde_json::from_value::<Task>(v.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    });
    for old in open {
        let Some(vt) = old.vm.clone() else {
            continue;
        };
        let vm: Option<Vm> = get(node, VMS, &vt.vm);
        let status: Option<VmStatus> = get(node, VM_STATUS, &vt.vm);
        let now = now_ms();
        let verdict = judge(&vt, vm.as_ref(), status.as_ref(), now);
        let mut t = old.clone();
        let note = |t: &mut Task, m: String| {
            t.log.push(TaskLog {
                time_ms: now,
                message: m,
            })
        };
        let what = format!("{} of VM {}", action_word(vt.action), vt.vm);
        let mut ops = Vec::new();
        match verdict {
            Verdict::Pending(progress, said) => {
                if t.state == TaskState::Queued {
                    t.state = TaskState::Running;
                    note(&mut t, format!("taken up by node {me}"));
                }
                if progress > t.progress {
                    t.progress = progress;
                    if progress > 10 {
                        note(&mut t, said);
                    }
                }
                if t == old {
                    continue;
                }
            }
            Verdict::Done(said) => {
                t.state = TaskState::Succeeded;
                t.progress = 100;
                t.finished_ms = Some(now);
                note(&mut t, format!("done: {said}"));
                ops.push(event(
                    "task.succeeded",
                    &t.id,
                    &t.user,
                    &format!("{what} done: {said}"),
                ));
            }
            Verdict::Failed(why) => {
                t.state = TaskState::Failed;
                t.progress = 100;
                t.finished_ms = Some(now);
                note(&mut t, format!("failed: {why}"));
                ops.push(event(
                    "task.failed",
                    &t.id,
                    &t.user,
                    &format!("{what} failed: {why}"),
                ));
                t.error = Some(why);
            }
        }
        ops.push(put(TASKS, &t.id, &t));
        let res = node
            .write(Command::Txn {
                require: vec![Require::equals(TASKS, &t.id, json!(old))],
                ops,
            })
            .await;
        if let Err(e) = res {
            tracing::debug!(task = %t.id, error = %e, "VM task not updated yet");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(action: VmAction) -> VmTask {
        VmTask {
            vm: "vm1".into(),
            action,
            start_seq: 2,
            reboot_seq: 0,
            deadline_ms: 1000,
            migration: None,
        }
    }

    fn vm(d: DesiredState) -> Vm {
        serde_json::from_value(json!({
            "name": "vm1", "vcpus": 1, "memory_mib": 64, "disks": [],
            "desired_state": d, "start_seq": 2,
            "created_ms": 0, "updated_ms": 0, "generation": 1,
        }))
        .unwrap()
    }

    fn status(state: VmState, start_seq: u64, reason: Option<&str>) -> VmStatus {
        VmStatus {
            node: "n1".into(),
            state,
            reason: reason.map(str::to_string),
            pid: None,
            restarts: 0,
            start_seq,
            reboot_seq: 0,
            since_ms: 0,
        }
    }

    #[test]
    fn a_start_succeeds_when_its_own_run_is_reported_running() {
        let t = task(VmAction::Start);
        let v = vm(DesiredState::Running);
        // The report of the previous run does not count.
        let old = status(VmState::Running, 1, None);
        assert_eq!(
            judge(&t, Some(&v), Some(&old), 0),
            Verdict::Pending(10, "taken up".into())
        );
        let starting = status(VmState::Starting, 2, None);
        assert!(matches!(
            judge(&t, Some(&v), Some(&starting), 0),
            Verdict::Pending(50, _)
        ));
        let running = status(VmState::Running, 2, None);
        assert_eq!(
            judge(&t, Some(&v), Some(&running), 0),
            Verdict::Done("VM running".into())
        );
    }

    #[test]
    fn a_start_fails_on_a_crash_a_timeout_or_a_later_stop() {
        let t = task(VmAction::Start);
        let v = vm(DesiredState::Running);
        let crashed = status(VmState::Crashed, 2, Some("killed by signal 9"));
        assert_eq!(
            judge(&t, Some(&v), Some(&crashed), 0),
            Verdict::Failed("the VM crashed: killed by signal 9".into())
        );
        let starting = status(VmState::Starting, 2, None);
        assert_eq!(
            judge(&t, Some(&v), Some(&starting), 1001),
            Verdict::Failed("timed out: the VM is starting".into())
        );
        let stopped = vm(DesiredState::Stopped);
        assert!(
            matches!(judge(&t, Some(&stopped), Some(&starting), 0), Verdict::Failed(m) if m.starts_with("superseded"))
        );
        assert!(matches!(judge(&t, None, None, 0), Verdict::Failed(m) if m.contains("deleted")));
    }

    #[test]
    fn a_stop_succeeds_when_stopped_or_nothing_runs() {
        let t = task(VmAction::Stop);
        let v = vm(DesiredState::Stopped);
        let stopping = status(VmState::Stopping, 2, None);
        assert!(matches!(
            judge(&t, Some(&v), Some(&stopping), 0),
            Verdict::Pending(50, _)
        ));
        let stopped = status(VmState::Stopped, 2, Some("the guest shut down"));
        assert_eq!(
            judge(&t, Some(&v), Some(&stopped), 0),
            Verdict::Done("VM stopped: the guest shut down".into())
        );
        let crashed = status(VmState::Crashed, 2, Some("x"));
        assert!(matches!(
            judge(&t, Some(&v), Some(&crashed), 0),
            Verdict::Done(_)
        ));
    }

    #[test]
    fn pause_and_resume_follow_the_reported_state() {
        let p = task(VmAction::Pause);
        let r = task(VmAction::Resume);
        let paused_vm = vm(DesiredState::Paused);
        let running = status(VmState::Running, 2, None);
        let paused = status(VmState::Paused, 2, None);
        assert!(matches!(
            judge(&p, Some(&paused_vm), Some(&running), 0),
            Verdict::Pending(..)
        ));
        assert!(matches!(
            judge(&p, Some(&paused_vm), Some(&paused), 0),
            Verdict::Done(_)
        ));
        let running_vm = vm(DesiredState::Running);
        assert!(matches!(
            judge(&r, Some(&running_vm), Some(&paused), 0),
            Verdict::Pending(..)
        ));
        assert!(matches!(
            judge(&r, Some(&running_vm), Some(&running), 0),
            Verdict::Done(_)
        ));
    }
}
