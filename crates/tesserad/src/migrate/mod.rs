//! Live migration of a running VM to another node (issue #12), the daemon side. The VMMs
//! move the VM between them (`tessera-vmm`'s pre-copy over TLS, docs/vmm.md); the two
//! nodes' `tesserad`s decide, through the cluster state, which of them runs it.
//!
//! A migration is a record `migrations/<vm>` ([`Migration`]) that the API writes with
//! its task, and that moves through its phases by compare-and-swap:
//!
//! 1. `preparing`: the target node (`target`) starts a VMM waiting for the VM
//!    (`--incoming`, its taps and the disk it will use) and writes where it listens and
//!    the token the source must present: `listening`.
//! 2. The source node (`source`) sets `transferring` and tells its VMM to migrate; it
//!    follows the VMM's figures into the task.
//! 3. When the target VMM holds the whole VM (`loaded`), the target node commits the
//!    switch-over in one transaction: the VM's `placed_on` becomes the target, the
//!    volume's primary moves there with a generation raise (when it holds an in-sync
//!    copy: `replication::moves::plan`), the record becomes `switched_over`. Then it tells
//!    its store to serve the volume as primary, and its VMM to run the guest. Both
//!    stores take their new roles at once; the new primary asks the source's again until
//!    it is a replica of the new generation ([`release`] says why).
//! 4. The source VMM hears the guest runs there and exits; the source node ends the task
//!    and deletes the record.
//!
//! A cancel (the API), a failure on either side, or a timeout writes `failed`, and only
//! from a phase before `switched_over`: that compare-and-swap and the switch-over's
//! exclude each other, so exactly one happens. A `failed` migration's source VMM resumes
//! the guest; its target VMM is killed. Until the switch-over the target never runs the
//! guest, and after it the source's writes are fenced by the new generation.
//!
//! The reconciler (`vmrun`) leaves the VMMs a migration holds to it ([`Registry`]): a
//! leaving VM's VMM is neither kept nor stopped, an arriving one not started twice, and
//! an arrived one adopted.

mod progress;
mod release;
mod source;
mod target;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tessera_api::{MigrationPhase, Task};
use tessera_state::{Command, Node, Require};

use crate::records::table::{MIGRATIONS, TASKS};
use crate::tables::{get, put};
use crate::vmrun::supervisor::{self, Exits};

/// `migrations/<vm>`: a live migration under way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    /// Its task's id.
    pub task: String,
    /// The VM.
    pub vm: String,
    /// The node it leaves.
    pub from: String,
    /// The node it goes to.
    pub to: String,
    /// Where it stands.
    pub phase: MigrationPhase,
    /// The VM's `start_seq` when asked: a start or stop meanwhile ends the migration.
    pub start_seq: u64,
    /// The downtime target, ms.
    pub downtime_ms: u64,
    /// The memory rate cap, KiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_kib_s: Option<u64>,
    /// Where the target VMM listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The one-time token the target VMM wants from the source (only the two VMMs and
    /// members of the cluster read it; it is not in any API answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who asked.
    pub user: String,
    /// When (ms since the epoch).
    pub created_ms: u64,
}

/// What a migration holds of a VM on this node, for the reconciler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Source: the VM's VMM is being sent away: neither kept nor stopped.
    Leaving,
    /// Source: the VM runs on the target; its VMM here ends by itself. Forget it (no
    /// stop, no report) once the VM is placed elsewhere.
    Left,
    /// Target: the VMM waiting for the VM is the migration's, not started for the VM.
    Arriving,
    /// Target: the guest runs in the VMM the migration started: adopt it.
    Arrived,
}

/// The VMs whose VMMs migrations hold on this node, shared with the reconciler, and the
/// exit statuses of the VMMs this `tesserad` started (the reconciler's and the
/// migrations').
#[derive(Clone, Default)]
pub struct Registry {
    held: Arc<Mutex<HashMap<String, Held>>>,
    /// Exit statuses of this `tesserad`'s VMM children.
    pub exits: Exits,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("held", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// What a migration holds of VM `vm` here, if anything.
    pub fn held(&self, vm: &str) -> Option<Held> {
        self.lock().get(vm).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, vm: &str, h: Held) {
        self.lock().insert(vm.to_string(), h);
    }

    /// The migration is done with VM `vm` here.
    pub fn clear(&self, vm: &str) {
        self.lock().remove(vm);
    }
}

/// What the migration loops need of this node.
#[derive(Clone)]
pub struct Local {
    /// This node's id.
    pub me: String,
    /// The reconciler's view of itself (runtime directories, TLS files, networks).
    pub vmrun: crate::vmrun::Local,
    /// The local store's admin socket.
    pub admin_socket: PathBuf,
}

/// How often the loop looks again without a change of the state.
const ROUND: Duration = Duration::from_millis(500);

/// Starts this node's migration loop once `node` has a Raft member: for every record
/// naming this node, the side it plays runs on its own task.
pub fn start(shared: crate::SharedNode, local: Local) {
    tokio::spawn(async move {
        let node = loop {
            if let Some(n) = shared.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let active: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut rx = node.state.subscribe();
        loop {
            for m in records(&node) {
                let side = if m.from == local.me {
                    "source"
                } else if m.to == local.me {
                    "target"
                } else {
                    continue;
                };
                let key = format!("{side}/{}", m.task);
                if !active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone())
                {
                    continue;
                }
                let (node, local, active) = (node.clone(), local.clone(), active.clone());
                tokio::spawn(async move {
                    if side == "source" {
                        source::run(&node, &local, m).await;
                    } else {
                        target::run(&node, &local, m).await;
                    }
                    active
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                });
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

/// Every migration record.
fn records(node: &Node) -> Vec<Migration> {
    node.state.read(|t| {
        t.get(MIGRATIONS)
            .map(|t| {
                t.values()
                    .filter_map(|v| serde_json::from_value::<Migration>(v.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The record of migration `task` of VM `vm`, if it is still that one.
fn record(node: &Node, vm: &str, task: &str) -> Option<Migration> {
    get::<Migration>(node, MIGRATIONS, vm).filter(|m| m.task == task)
}

/// Replaces record `old` by `new` if nobody changed it; true if written.
async fn swap(node: &Node, old: &Migration, new: &Migration, extra: Vec<Command>) -> bool {
    let mut ops = vec![put(MIGRATIONS, &old.vm, new)];
    ops.extend(extra);
    let res = node
        .write(Command::Txn {
            require: vec![Require::equals(MIGRATIONS, &old.vm, json!(old))],
            ops,
        })
        .await;
    matches!(res, Ok(a) if a.conflict.is_none())
}

/// Ends migration `m` as failed with `why`, unless it already switched over or ended;
/// returns the record as it stands after (failed, or whatever won).
async fn fail(node: &Node, m: &Migration, why: &str) -> Option<Migration> {
    for _ in 0..20 {
        let now = record(node, &m.vm, &m.task)?;
        if matches!(
            now.phase,
            MigrationPhase::SwitchedOver | MigrationPhase::Done | MigrationPhase::Failed
        ) {
            return Some(now);
        }
        let mut failed = now.clone();
        failed.phase = MigrationPhase::Failed;
        failed.error = Some(why.to_string());
        if swap(node, &now, &failed, Vec::new()).await {
            tracing::warn!(vm = %m.vm, task = %m.task, %why, "live migration failed");
            return Some(failed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    record(node, &m.vm, &m.task)
}

/// Changes task `id` with `f` (compare-and-swap, retried); `extra` commits with it.
async fn update_task(node: &Node, id: &str, f: impl Fn(&mut Task), extra: Vec<Command>) {
    for _ in 0..10 {
        let Some(old) = get::<Task>(node, TASKS, id) else {
            return;
        };
        let mut t = old.clone();
        f(&mut t);
        if t == old && extra.is_empty() {
            return;
        }
        let mut ops = vec![put(TASKS, id, &t)];
        ops.extend(extra.iter().cloned());
        let res = node
            .write(Command::Txn {
                require: vec![Require::equals(TASKS, id, json!(old))],
                ops,
            })
            .await;
        if matches!(res, Ok(a) if a.conflict.is_none()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(task = %id, "migration task not updated");
}

/// One call to a VMM's control socket, off the async workers.
async fn vmm_call(socket: PathBuf, op: Value) -> Result<Value, String> {
    tokio::task::spawn_blocking(move || supervisor::call(&socket, op).map_err(|e| e.to_string()))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}
