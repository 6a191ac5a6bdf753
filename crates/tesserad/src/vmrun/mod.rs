//! Running VMs on this node: the scheduler (pure placement, used by the API), the
//! supervisor (the VMM processes, detached from `tesserad`) and the reconciler, which
//! makes this node's VMMs match the VMs placed on it and reports their state in
//! `vm_status/<name>`.
//!
//! The reconciler wakes on every change of the cluster state and every second. For each
//! VM placed on this node and meant to run (or be paused) it adopts a VMM left by an
//! earlier `tesserad` (its runtime directory's `run.json`, a live `tessera-vmm` process),
//! or starts one; it pauses, resumes and reboots as asked; it stops VMMs of VMs no longer
//! meant to run here (`stop`: the guest's power button, then a forced power-off after the
//! VM's stop timeout, SIGKILL if that fails or for a kill). A VMM that ends unasked is
//! restarted or left `crashed` by the VM's restart policy.

mod nics;
pub mod reservation;
pub mod scheduler;
pub mod stop;
pub mod supervisor;
pub mod tasks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::{DesiredState, RestartPolicy, Vm, VmState, VmStatus, Volume};
use tessera_state::{Command, Node, Require};

use crate::now_ms;
use crate::records::table::{NODES, VMS, VOLUMES};
use crate::tables::{event, get, put};
use supervisor::{Ending, Exits, RunDir, RunInfo};

/// `vm_status/<name>`: [`VmStatus`], written by the node running the VM.
pub const VM_STATUS: &str = "vm_status";
/// `node_api/<node id>`: `{"api": "<ip:port>"}`, where the node's REST API is reached
/// (a console asked of another node is forwarded there).
pub const NODE_API: &str = "node_api";

/// Crashes within this window that make a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(600);
/// Crashes within [`CRASH_WINDOW`] after which the VM is left `crashed`.
const CRASH_LIMIT: usize = 5;
/// How long a stop waits for the guest to shut down when the VM sets no `stop_timeout_s`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stop of `vm` waits for its guest to shut down before forcing it.
pub fn stop_timeout(vm: Option<&Vm>) -> Duration {
    vm.and_then(|v| v.stop_timeout_s)
        .map_or(DEFAULT_STOP_TIMEOUT, |s| Duration::from_secs(u64::from(s)))
}

/// What this node's reconciler needs to know about itself.
#[derive(Clone, Debug)]
pub struct Local {
    /// This node's id.
    pub me: String,
    /// Where runtime directories live (`<data_dir>/vms`).
    pub data_dir: PathBuf,
    /// The local store's NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// This node's TLS credentials (`<data_dir>/tls`: `ca.crt`, `node.crt`, `node.key`),
    /// which a VMM presents to another node's store for a remote disk.
    pub tls_dir: PathBuf,
    /// This node's REST API address (published in [`NODE_API`]; a wildcard address is
    /// reached at `management`'s IP).
    pub api: std::net::SocketAddr,
    /// This node's management address.
    pub management: std::net::SocketAddr,
    /// This node's networks as last set up (the bridges VM NICs' taps join).
    pub networks: crate::netrun::Networks,
}

/// A VMM this node runs.
struct Running {
    info: RunInfo,
    state: VmState,
    /// The stop under way, if any.
    stop: Option<stop::Stop>,
}

/// Restart bookkeeping of one VM.
#[derive(Default)]
struct Crashes {
    start_seq: u64,
    times: Vec<Instant>,
    not_before: Option<Instant>,
}

struct Reconciler {
    node: Arc<Node>,
    local: Local,
    exits: Exits,
    running: HashMap<String, Running>,
    crashes: HashMap<String, Crashes>,
    /// Reason of the last ending per VM, for the status.
    reasons: HashMap<String, String>,
    /// Whether [`NODE_API`] holds this node's address.
    api_published: bool,
}

/// Starts the reconciler once `node` has a Raft member.
pub fn start(shared: crate::SharedNode, local: Local) {
    tokio::spawn(async move {
        let node = loop {
            if let Some(n) = shared.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // The local copy may lag right after a restart; catch up first (best effort).
        let _ = node.sync().await;
        let mut r = Reconciler {
            node: node.clone(),
            local,
            exits: Exits::default(),
            running: HashMap::new(),
            crashes: HashMap::new(),
            reasons: HashMap::new(),
            api_published: false,
        };
        r.adopt_all();
        let mut rx = node.state.subscribe();
        loop {
            r.tick().await;
            if tokio::time::timeout(Duration::from_secs(1), rx.changed())
                .await
                .is_ok_and(|res| res.is_err())
            {
                return;
            }
        }
    });
}

fn desired_here(vm: &Vm, me: &str) -> bool {
    vm.placed_on.as_deref() == Some(me)
        && matches!(
            vm.desired_state,
            DesiredState::Running | DesiredState::Paused
        )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

impl Reconciler {
    fn dir(&self, name: &str) -> RunDir {
        RunDir::new(&self.local.data_dir, name)
    }

    /// Takes over every VMM an earlier `tesserad` left running on this node.
    fn adopt_all(&mut self) {
        for name in supervisor::run_dirs(&self.local.data_dir) {
            if let Some(info) = supervisor::find_running(&self.dir(&name), &self.exits) {
                tracing::info!(vm = %name, pid = info.pid, "re-adopting a running VMM");
                self.running.insert(
                    name,
                    Running {
                        info,
                        state: VmState::Running,
                        stop: None,
                    },
                );
            }
        }
    }

    async fn tick(&mut self) {
        // Cut off from the majority: the HA guard has stopped the VMMs; start none.
        if crate::ha::fenced() {
            return;
        }
        let vms: Vec<Vm> = self.node.state.read(|t| {
            t.get(VMS)
                .map(|t| {
                    t.values()
                        .filter_map(|v| serde_json::from_value::<Vm>(v.clone()).ok())
                        .collect()
                })
                .unwrap_or_default()
        });
        let me = self.local.me.clone();
        let wanted: HashMap<String, Vm> = vms
            .into_iter()
            .filter(|v| desired_here(v, &me))
            .map(|v| (v.name.clone(), v))
            .collect();
        // Stop what should not run here (deleted, stopped, placed elsewhere).
        let unwanted: Vec<String> = self
            .running
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in unwanted {
            let vm: Option<Vm> = get(&self.node, VMS, &name);
            self.stop(&name, vm.as_ref()).await;
        }
        self.stop_held(&me).await;
        for vm in wanted.values() {
            self.keep(vm).await;
        }
        tasks::follow(&self.node, &me).await;
        if !self.api_published {
            self.publish_api().await;
        }
    }

    /// Publishes where this node's API is reached, in [`NODE_API`].
    async fn publish_api(&mut self) {
        let (api, mgmt) = (self.local.api, self.local.management);
        let api = if api.ip().is_unspecified() {
            std::net::SocketAddr::new(mgmt.ip(), api.port())
        } else {
            api
        };
        let rec = json!({ "api": api.to_string() });
        let res = self
            .node
            .write(Command::Put {
                table: NODE_API.into(),
                key: self.local.me.clone(),
                value: rec,
            })
            .await;
        match res {
            Ok(_) => self.api_published = true,
            Err(e) => tracing::debug!(error = %e, "API address not published yet"),
        }
    }

    /// Stops the VMM of `name`, one [`stop::Step`] per call: its guest is asked (power
    /// button), then it is powered off after the VM's stop timeout, then killed; a kill
    /// (`force_stop`) is SIGKILL at once. Reports `stopping` until the VMM is gone.
    async fn stop(&mut self, name: &str, vm: Option<&Vm>) {
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

    /// A VM this node reported as starting or running that is no longer meant to run and
    /// has no VMM here (it was waiting for its restart backoff, or its VMM ended while
    /// no `tesserad` watched) is stopped: nothing is left to stop, so say so, or its stop
    /// task would wait for a report that never comes.
    async fn stop_held(&mut self, me: &str) {
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
            let active = matches!(
                s.state,
                VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
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
            let reason = if s.state == VmState::Starting {
                "stopped on request while waiting to restart"
            } else {
                "stopped on request: its VMM was already gone"
            };
            self.report(&name, VmState::Stopped, Some(reason.into()), None)
                .await;
        }
    }

    /// Keeps VM `vm` (meant to run here) running, paused, or rebooted as asked.
    async fn keep(&mut self, vm: &Vm) {
        let name = vm.name.clone();
        let dir = self.dir(&name);
        let crashes = self.crashes.entry(name.clone()).or_default();
        if crashes.start_seq != vm.start_seq {
            *crashes = Crashes {
                start_seq: vm.start_seq,
                ..Crashes::default()
            };
        }
        let Some(r) = self.running.get(&name) else {
            return self.launch_or_hold(vm).await;
        };
        let pid = r.info.pid;
        if !supervisor::alive(pid, &self.exits) {
            let status = self.exits.take(pid);
            let tail = supervisor::log_tail(&dir);
            self.running.remove(&name);
            supervisor::forget(&dir);
            return self.ended(vm, supervisor::ending(status, &tail)).await;
        }
        if vm.reboot_seq > r.info.reboot_seq {
            // A reboot: power off (killed if need be) and start again at once.
            let sock = dir.api_socket();
            let _ = blocking(move || supervisor::call(&sock, json!({"type": "power_off"}))).await;
            for _ in 0..100 {
                if !supervisor::alive(pid, &self.exits) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            supervisor::kill(pid);
            let _ = self.exits.take(pid);
            self.running.remove(&name);
            supervisor::forget(&dir);
            self.reasons.insert(
                name.clone(),
                format!("rebooted on request (reboot {})", vm.reboot_seq),
            );
            return self.launch_or_hold(vm).await;
        }
        let sock = dir.api_socket();
        let described = blocking(move || supervisor::call(&sock, json!({"type": "describe"})))
            .await
            .and_then(|r| r.ok());
        let Some(d) = described else {
            // Alive but not answering (yet: a VMM that just started binds its socket
            // after loading the kernel).
            return;
        };
        let mut state = match d["state"].as_str() {
            Some("running") => VmState::Running,
            Some("paused") => VmState::Paused,
            _ => return, // stopped: the process exits at once; seen next tick
        };
        let op = match (vm.desired_state, state) {
            (DesiredState::Paused, VmState::Running) => Some(("pause", VmState::Paused)),
            (DesiredState::Running, VmState::Paused) => Some(("resume", VmState::Running)),
            _ => None,
        };
        if let Some((op, after)) = op {
            let sock = dir.api_socket();
            match blocking(move || supervisor::call(&sock, json!({ "type": op }))).await {
                Some(Ok(_)) => state = after,
                Some(Err(e)) => tracing::warn!(vm = %name, error = %e, "{op} failed"),
                None => {}
            }
        }
        if let Some(r) = self.running.get_mut(&name) {
            r.state = state;
        }
        let reason = self.reasons.get(&name).cloned();
        self.report(&name, state, reason, Some(pid)).await;
    }

    /// A VM meant to run here has no VMM: start one, unless its restart policy or its
    /// backoff says to wait, or it already crashed for this start.
    async fn launch_or_hold(&mut self, vm: &Vm) {
        let name = vm.name.clone();
        let status: Option<VmStatus> = get(&self.node, VM_STATUS, &name);
        if let Some(s) = status.as_ref().filter(|s| {
            s.node == self.local.me && s.start_seq == vm.start_seq && s.reboot_seq == vm.reboot_seq
        }) {
            match s.state {
                VmState::Crashed => return,
                // It ran for this start, and no VMM is left: it ended while no
                // tesserad watched.
                VmState::Running | VmState::Paused | VmState::Stopping
                    if self
                        .crashes
                        .get(&name)
                        .is_none_or(|c| c.not_before.is_none()) =>
                {
                    let tail = supervisor::log_tail(&self.dir(&name));
                    return self.ended(vm, supervisor::ending(None, &tail)).await;
                }
                _ => {}
            }
        }
        if self
            .crashes
            .get(&name)
            .and_then(|c| c.not_before)
            .is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        // The image's verified local copy (fetched from a peer when missing) or the
        // kernel path: `crate::images`.
        let boot = match crate::images::boot(&self.node, &self.local.data_dir, vm).await {
            Ok(b) => b,
            Err(why) => return self.report(&name, VmState::Crashed, Some(why), None).await,
        };
        // A replicated disk's primary moves here first when this node holds an in-sync
        // copy (issue #8), so the VM's disk is this node's own store.
        if let Some(d) = vm.disks.first() {
            crate::replication::moves::primary_here(&self.node, &self.local.me, d).await;
        }
        let mut spec = match self.launch_spec(vm, boot) {
            Ok(s) => s,
            Err(why) => return self.report(&name, VmState::Crashed, Some(why), None).await,
        };
        // The NICs' taps, on their networks' bridges; a network not (yet) set up on this
        // node holds the start, which the next tick tries again.
        match nics::taps(vm, &self.local.networks).await {
            Ok(t) => spec.nics = t,
            Err(why) => return self.report(&name, VmState::Starting, Some(why), None).await,
        }
        let dir = self.dir(&name);
        let exits = self.exits.clone();
        let seqs = (vm.start_seq, vm.reboot_seq);
        let n = name.clone();
        let res = blocking(move || supervisor::launch(&dir, &n, &spec, seqs, &exits)).await;
        match res {
            Some(Ok(info)) => {
                tracing::info!(vm = %name, pid = info.pid, "VMM started");
                let pid = info.pid;
                self.running.insert(
                    name.clone(),
                    Running {
                        info,
                        state: VmState::Starting,
                        stop: None,
                    },
                );
                let reason = self.reasons.get(&name).cloned();
                self.report(&name, VmState::Starting, reason, Some(pid))
                    .await;
            }
            Some(Err(e)) => {
                self.report(&name, VmState::Crashed, Some(e.to_string()), None)
                    .await
            }
            None => {}
        }
    }

    fn launch_spec(
        &self,
        vm: &Vm,
        boot: crate::images::Boot,
    ) -> Result<supervisor::Launch, String> {
        let (disk, disk_tls) = match vm.disks.first() {
            None => (None, None),
            Some(d) => {
                let v: Volume = get(&self.node, VOLUMES, d)
                    .ok_or_else(|| format!("its disk, volume {d}, does not exist"))?;
                if v.node == self.local.me {
                    let uri = format!("nbd+unix:///{d}?socket={}", self.local.nbd_socket.display());
                    (Some(uri), None)
                } else {
                    // Another node's store: TCP NBD there is TLS-only, and this node's own
                    // certificate is a client certificate of the cluster CA.
                    let addr = self.remote_nbd(&v.node).ok_or_else(|| {
                        format!(
                            "its disk, volume {d}, is on node {}, whose store has published no NBD address",
                            v.node
                        )
                    })?;
                    let t = &self.local.tls_dir;
                    let tls = supervisor::DiskTls {
                        ca: t.join("ca.crt"),
                        cert: t.join("node.crt"),
                        key: t.join("node.key"),
                    };
                    (Some(format!("nbds://{addr}/{d}")), Some(tls))
                }
            }
        };
        Ok(supervisor::Launch {
            kernel: boot.kernel,
            initrd: boot.initrd,
            cmdline: boot.cmdline,
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            disk,
            disk_tls,
            nics: Vec::new(),
        })
    }

    /// The TCP NBD address of node `id`'s store as it published it; a wildcard address
    /// (the store listens everywhere) is reached at the node's management address, which
    /// its certificate names.
    fn remote_nbd(&self, id: &str) -> Option<std::net::SocketAddr> {
        let rec: serde_json::Value = get(&self.node, NODES, id)?;
        let nbd: std::net::SocketAddr = rec["nbd"].as_str()?.parse().ok()?;
        if !nbd.ip().is_unspecified() {
            return Some(nbd);
        }
        let mgmt: std::net::SocketAddr = rec["address"].as_str()?.parse().ok()?;
        Some(std::net::SocketAddr::new(mgmt.ip(), nbd.port()))
    }

    /// A VMM ended unasked: restart it, leave it crashed, or (the guest powered off)
    /// record the VM as stopped, by its restart policy.
    async fn ended(&mut self, vm: &Vm, how: Ending) {
        let name = vm.name.clone();
        let (crash, reason) = match how {
            Ending::GuestOff(r) => (false, r),
            Ending::Requested => (false, "powered off through its control socket".into()),
            Ending::Crash(r) => (true, r),
        };
        tracing::info!(vm = %name, crash, %reason, "VMM ended");
        if !crash && vm.restart_policy != RestartPolicy::Always {
            // The guest is off for good: so is the VM's desired state.
            let mut stopped = vm.clone();
            stopped.desired_state = DesiredState::Stopped;
            stopped.force_stop = false;
            let _ = self
                .node
                .write(Command::Txn {
                    require: vec![Require::equals(VMS, &name, json!(vm))],
                    ops: vec![
                        put(VMS, &name, &stopped),
                        event("vm.stopped", &name, "tesserad", &reason),
                    ],
                })
                .await;
            self.reasons.remove(&name);
            return self
                .report(&name, VmState::Stopped, Some(reason), None)
                .await;
        }
        let c = self.crashes.entry(name.clone()).or_default();
        let now = Instant::now();
        let verdict = after_crash(&mut c.times, now, vm.restart_policy);
        let n = c.times.len();
        if let Err(given_up) = verdict {
            c.not_before = None;
            let why = format!("{reason} ({given_up})");
            let _ = self
                .node
                .write(Command::Txn {
                    require: vec![Require::exists(VMS, &name)],
                    ops: vec![event("vm.crashed", &name, "tesserad", &why)],
                })
                .await;
            self.reasons.remove(&name);
            return self.report(&name, VmState::Crashed, Some(why), None).await;
        }
        let backoff = verdict.unwrap_or_default();
        c.not_before = Some(now + backoff);
        let why = format!(
            "restarting in {} s after: {reason} (restart {n})",
            backoff.as_secs()
        );
        let _ = self
            .node
            .write(Command::Txn {
                require: vec![Require::exists(VMS, &name)],
                ops: vec![event("vm.restart", &name, "tesserad", &why)],
            })
            .await;
        self.reasons
            .insert(name.clone(), format!("restarted after: {reason}"));
        self.report(&name, VmState::Starting, Some(why), None).await;
    }

    /// Records the VM's state in `vm_status/<name>` if it changed (while the VM exists).
    async fn report(&self, name: &str, state: VmState, reason: Option<String>, pid: Option<u32>) {
        let Some(vm) = get::<Vm>(&self.node, VMS, name) else {
            return;
        };
        let old: Option<VmStatus> = get(&self.node, VM_STATUS, name);
        let restarts = self
            .crashes
            .get(name)
            .filter(|c| c.start_seq == vm.start_seq)
            .map_or(0, |c| c.times.len() as u32);
        let (start_seq, reboot_seq) = match self.running.get(name) {
            Some(r) => (r.info.start_seq, r.info.reboot_seq),
            None => (vm.start_seq, vm.reboot_seq),
        };
        let new = VmStatus {
            node: self.local.me.clone(),
            state,
            reason,
            pid,
            restarts,
            start_seq,
            reboot_seq,
            since_ms: now_ms(),
        };
        if let Some(o) = &old {
            let same = VmStatus {
                since_ms: o.since_ms,
                ..new.clone()
            };
            if &same == o {
                return;
            }
        }
        let res = self
            .node
            .write(Command::Txn {
                require: vec![Require::exists(VMS, name)],
                ops: vec![put(VM_STATUS, name, &new)],
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(vm = %name, error = %e, "VM state not recorded yet");
        }
    }
}

/// The restart policy's verdict on a crash at `now`: `times` (the crashes of this start)
/// forgets those older than [`CRASH_WINDOW`] and gains `now`. A restart after a backoff
/// of 1, 2, 4, 8 s for the first to fourth crash in the window; the VM left crashed
/// (`Err`: why, for its reason) under `never` or at the [`CRASH_LIMIT`]th.
fn after_crash(
    times: &mut Vec<Instant>,
    now: Instant,
    policy: RestartPolicy,
) -> Result<Duration, String> {
    times.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
    times.push(now);
    let n = times.len();
    if policy == RestartPolicy::Never {
        return Err("restart policy never".into());
    }
    if n >= CRASH_LIMIT {
        return Err(format!(
            "crash loop: {n} crashes within 10 minutes; not restarted"
        ));
    }
    Ok(Duration::from_secs(1 << (n - 1).min(5)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_back_off_then_a_crash_loop_ends_crashed() {
        let t0 = Instant::now();
        let mut times = Vec::new();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for (i, want) in [1, 2, 4, 8].into_iter().enumerate() {
            let got = after_crash(&mut times, at(i as u64 * 20), RestartPolicy::OnCrash);
            assert_eq!(got, Ok(Duration::from_secs(want)), "crash {}", i + 1);
        }
        assert_eq!(
            after_crash(&mut times, at(100), RestartPolicy::Always),
            Err("crash loop: 5 crashes within 10 minutes; not restarted".into())
        );
        // Crashes 10 minutes old or older are forgotten.
        let mut times = vec![at(0), at(20), at(40)];
        assert_eq!(
            after_crash(&mut times, at(619), RestartPolicy::OnCrash),
            Ok(Duration::from_secs(4)),
            "the crash at 0 s is forgotten, those at 20 and 40 s count"
        );
        let mut times = vec![at(0), at(20), at(40)];
        assert_eq!(
            after_crash(&mut times, at(640), RestartPolicy::OnCrash),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(times.len(), 1);
        // Under never, the first crash ends it.
        let mut times = Vec::new();
        assert_eq!(
            after_crash(&mut times, t0, RestartPolicy::Never),
            Err("restart policy never".into())
        );
    }
}
