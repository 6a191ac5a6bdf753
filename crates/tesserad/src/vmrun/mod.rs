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

mod launch;
pub(crate) mod nics;
pub mod reservation;
mod restart;
pub mod scheduler;
pub mod stop;
mod stopping;
pub mod supervisor;
pub mod tasks;
pub mod writer_key;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_api::{DesiredState, Vm, VmState, VmStatus};
use tessera_state::{Command, Node, Require};

use crate::migrate::Held;
use crate::now_ms;
use crate::records::table::VMS;
use crate::tables::{get, put};
use restart::Crashes;
use supervisor::{Exits, RunDir, RunInfo};

/// `vm_status/<name>`: [`VmStatus`], written by the node running the VM.
pub const VM_STATUS: &str = "vm_status";
/// `node_api/<node id>`: `{"api": "<ip:port>"}`, where the node's REST API is reached
/// (a console asked of another node is forwarded there).
pub const NODE_API: &str = "node_api";

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
    /// The VMMs live migrations hold (`crate::migrate`), and every VMM child's exit.
    pub migrations: crate::migrate::Registry,
}

/// A VMM this node runs.
struct Running {
    info: RunInfo,
    /// When this `tesserad` started it (`None`: adopted, started by an earlier one).
    launched: Option<std::time::Instant>,
    state: VmState,
    /// The stop under way, if any.
    stop: Option<stop::Stop>,
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
    /// VMs waiting for their disk's primary to move to this node, since when.
    moving_primary: HashMap<String, std::time::Instant>,
    /// Something waits for a condition outside the cluster state (a store taking the
    /// primary role): the next round comes after 200 ms, not 1 s.
    hurry: bool,
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
            exits: local.migrations.exits.clone(),
            local,
            running: HashMap::new(),
            crashes: HashMap::new(),
            reasons: HashMap::new(),
            api_published: false,
            moving_primary: HashMap::new(),
            hurry: false,
        };
        r.adopt_all();
        let mut rx = node.state.subscribe();
        loop {
            r.tick().await;
            let wait = if r.hurry {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(1)
            };
            if tokio::time::timeout(wait, rx.changed())
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

    /// Takes over the VMM in VM `name`'s runtime directory (one a live migration brought
    /// here); false if none lives there.
    fn adopt(&mut self, name: &str) -> bool {
        let Some(info) = supervisor::find_running(&self.dir(name), &self.exits) else {
            return false;
        };
        tracing::info!(vm = %name, pid = info.pid, "taking over the VMM a live migration brought here");
        self.running.insert(
            name.to_string(),
            Running {
                info,
                launched: None,
                state: VmState::Running,
                stop: None,
            },
        );
        true
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
                        launched: None,
                        state: VmState::Running,
                        stop: None,
                    },
                );
            }
        }
    }

    async fn tick(&mut self) {
        self.hurry = false;
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
        self.moving_primary.retain(|n, _| wanted.contains_key(n));
        let held = self.local.migrations.clone();
        // A VM that left by live migration: its VMM here ends by itself.
        let left: Vec<String> = self
            .running
            .keys()
            .filter(|n| !wanted.contains_key(*n) && held.held(n) == Some(Held::Left))
            .cloned()
            .collect();
        for name in left {
            self.running.remove(&name);
            supervisor::forget(&self.dir(&name));
            held.clear(&name);
        }
        // Stop what should not run here (deleted, stopped, placed elsewhere), but not
        // what a live migration holds.
        let unwanted: Vec<String> = self
            .running
            .keys()
            .filter(|n| !wanted.contains_key(*n) && held.held(n).is_none())
            .cloned()
            .collect();
        for name in unwanted {
            let vm: Option<Vm> = get(&self.node, VMS, &name);
            self.stop(&name, vm.as_ref()).await;
        }
        self.stop_held(&me).await;
        for vm in wanted.values() {
            match held.held(&vm.name) {
                None => {}
                Some(Held::Arrived) => {
                    if self.adopt(&vm.name) {
                        held.clear(&vm.name);
                    }
                    continue;
                }
                Some(Held::Leaving | Held::Left | Held::Arriving) => continue,
            }
            self.keep(vm).await;
        }
        tasks::follow(&self.node, &me).await;
        // This node's writer records of VMs not placed here (the first round is this
        // tesserad's start): none counts, but a migration arriving here records its
        // target VMM's key before the switch-over (left alone while a migration holds
        // the VM).
        let left = self
            .node
            .state
            .read(|t| writer_key::left_behind(t, &me, &|vm| held.held(vm).is_some()));
        if !left.is_empty() {
            writer_key::retire_left_behind(&self.node, &me, left).await;
        }
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
            let ran = r.launched.map(|t| t.elapsed());
            let status = match r.launched {
                // Our child: its status comes from its reaper, perhaps a moment later.
                Some(_) => self.exits.take_ended(pid, Duration::from_secs(1)).await,
                None => self.exits.take(pid),
            };
            let tail = supervisor::log_tail(&dir);
            self.running.remove(&name);
            supervisor::forget(&dir);
            return self.ended(vm, supervisor::ending(status, &tail), ran).await;
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
            .map_or(0, |c| c.restarts());
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
