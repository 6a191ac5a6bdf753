//! Stopping the VMMs this node should no longer run: the guest asked first (its power
//! button), then powered off after the VM's stop timeout, then killed ([`super::stop`]
//! decides the steps; this carries them out), and reporting VMs whose VMM is already gone
//! as stopped.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::{DesiredState, Vm, VmState, VmStatus};

use super::{blocking, stop, stop_timeout, supervisor, Reconciler, VM_STATUS};
use crate::records::table::VMS;
use crate::tables::get;

impl Reconciler {
    /// Stops the VMM of `name`, one [`stop::Step`] per call: its guest is asked (power
    /// button), then it is powered off after the VM's stop timeout, then killed; a kill
    /// (`force_stop`) is SIGKILL at once. Reports `stopping` until the VMM is gone.
    pub(super) async fn stop(&mut self, name: &str, vm: Option<&Vm>) {
        let kill = vm.is_some_and(|v| v.force_stop);
        let grace = stop_timeout(vm);
        let Some(r) = self.running.get_mut(name) else {
            return;
        };
        let pid = r.info.pid;
        r.state = VmState::Stopping;
        let mut progress = r
            .stop
            .clone()
            .unwrap_or_else(|| stop::Stop::new(Instant::now()));
        if supervisor::alive(pid, &self.exits) {
            let sock = self.dir(name).api_socket();
            match progress.next(Instant::now(), grace, kill) {
                stop::Step::Kill => supervisor::kill(pid),
                stop::Step::Wait => {}
                stop::Step::Ask => {
                    let res =
                        blocking(move || supervisor::call(&sock, json!({"type": "shutdown"})))
                            .await;
                    match res {
                        Some(Ok(_)) => {
                            tracing::info!(vm = %name, grace_s = grace.as_secs(), "asked the guest to shut down (power button)");
                            progress.asked = true;
                        }
                        Some(Err(e)) => {
                            tracing::info!(vm = %name, error = %e, "the guest cannot be asked; forcing the stop");
                            progress.not_asked = Some(match e {
                                supervisor::SupervisorError::Refused { message, .. } => message,
                                other => other.to_string(),
                            });
                        }
                        None => {}
                    }
                }
                stop::Step::PowerOff => {
                    progress.forced = Some(Instant::now());
                    let res =
                        blocking(move || supervisor::call(&sock, json!({"type": "power_off"})))
                            .await;
                    if let Some(Err(e)) = res {
                        tracing::warn!(vm = %name, error = %e, "power-off refused; killing the VMM");
                        supervisor::kill(pid);
                    }
                }
            }
            if let Some(r) = self.running.get_mut(name) {
                r.stop = Some(progress.clone());
            }
            // Wait briefly for the process to go, so the status says stopped at once.
            for _ in 0..50 {
                if !supervisor::alive(pid, &self.exits) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if supervisor::alive(pid, &self.exits) {
                self.report(name, VmState::Stopping, None, Some(pid)).await;
                return;
            }
        }
        let dir = self.dir(name);
        let how = supervisor::ending(self.exits.take(pid), &supervisor::log_tail(&dir));
        self.running.remove(name);
        supervisor::forget(&dir);
        self.reasons.remove(name);
        let reason = progress.reason(kill, &how);
        tracing::info!(vm = %name, %reason, "VM stopped");
        self.report(name, VmState::Stopped, Some(reason), None)
            .await;
    }

    /// A VM this node reported as starting, running or crashed that is no longer meant to
    /// run and has no VMM here (it was waiting for its restart backoff, its VMM ended
    /// while no `tesserad` watched, or its restart policy gave up) is stopped: nothing is
    /// left to stop, so say so, or its stop task would wait for a report that never comes.
    pub(super) async fn stop_held(&mut self, me: &str) {
        let held: Vec<(String, VmStatus)> = self.node.state.read(|t| {
            t.get(VM_STATUS)
                .map(|t| {
                    t.iter()
                        .filter_map(|(k, v)| {
                            serde_json::from_value::<VmStatus>(v.clone())
                                .ok()
                                .map(|s| (k.clone(), s))
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        for (name, s) in held {
            // Crashed too: a crashed VM (its restart policy gave up) that is stopped or
            // killed has nothing left to stop either; it stayed `crashed` and its task
            // ran into its deadline before.
            let active = matches!(
                s.state,
                VmState::Starting
                    | VmState::Running
                    | VmState::Paused
                    | VmState::Stopping
                    | VmState::Crashed
            );
            if s.node != me || !active || self.running.contains_key(&name) {
                continue;
            }
            let Some(vm) = get::<Vm>(&self.node, VMS, &name) else {
                continue;
            };
            if vm.desired_state != DesiredState::Stopped {
                continue;
            }
            if let Some(c) = self.crashes.get_mut(&name) {
                c.not_before = None;
            }
            self.reasons.remove(&name);
            let reason = match s.state {
                VmState::Starting => "stopped on request while waiting to restart".to_string(),
                VmState::Crashed => format!(
                    "stopped on request after it crashed: {}",
                    s.reason.as_deref().unwrap_or("no reason recorded")
                ),
                _ => "stopped on request: its VMM was already gone".to_string(),
            };
            self.report(&name, VmState::Stopped, Some(reason), None)
                .await;
        }
    }
}
