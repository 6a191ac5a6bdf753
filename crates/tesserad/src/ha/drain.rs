//! The drain of nodes in maintenance, the daemon side: the manager's `MigrateVm` orders are
//! carried out one at a time, each by beginning the same live migration
//! `POST /vms/{name}/migrate` begins (`api::vm_migrate`, placed and reserved like any
//! other, carried out by `crate::migrate`).
//!
//! A migration that cannot begin (the scheduler refuses the target, the VM is paused or
//! migrating already) or that ends with the VM still on its node is reported (an
//! `ha.migrate` event, once per reason) and tried again after [`RETRY_AFTER`]; the VM
//! keeps running where it is, it is never stopped for a drain. The manager is told the
//! migration ended (the VM's node reports it running, or, when it does not run there any
//! more, stopped) so it counts the VM where it really is.

use std::collections::{HashMap, VecDeque};

use tessera_api::{VmState, VmStatus};
use tessera_ha::{Input, Millis, NodeId, StopCause, VmFact, VmId};
use tessera_state::Node;

use crate::api::vm_migrate::begin_for_drain;
use crate::api::ApiState;
use crate::migrate::Migration;
use crate::records::table::{MAINTENANCE, MIGRATIONS, TASKS, VMS};
use crate::records::{Task, Vm};
use crate::tables::get;
use crate::vmrun::VM_STATUS;

/// How long a VM whose migration failed or could not begin waits before the next try.
pub const RETRY_AFTER: Millis = 30_000;

/// The user the drain's migrations are begun for (tasks and events show it).
const USER: &str = "tesserad";

/// A move the manager ordered.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Order {
    vm: String,
    from: String,
    to: String,
}

/// The drain's state on the leader.
#[derive(Default)]
pub struct Drains {
    /// Ordered, not begun yet, in the manager's order (highest priority first).
    queue: VecDeque<Order>,
    /// The migration under way and its task.
    running: Option<(Order, String)>,
    /// The last failure reported per VM (each reported once until it changes).
    said: HashMap<String, String>,
    /// When a VM may be tried again.
    retry_at: HashMap<String, Millis>,
}

/// What the drain has to tell the manager and the log after a step.
#[derive(Default)]
pub struct Outcome {
    /// Inputs for the manager.
    pub inputs: Vec<Input>,
    /// VMs whose reported facts the shell must feed again (their cached ones are stale).
    pub refeed: Vec<String>,
    /// Events to write: (VM, message).
    pub events: Vec<(String, String)>,
}

impl Drains {
    /// The manager ordered `vm` moved `from` -> `to`.
    pub fn order(&mut self, vm: &VmId, from: &NodeId, to: &NodeId) {
        let o = Order {
            vm: vm.0.clone(),
            from: from.0.clone(),
            to: to.0.clone(),
        };
        self.queue.retain(|q| q.vm != o.vm);
        if self.running.as_ref().is_some_and(|(r, _)| r.vm == o.vm) {
            return;
        }
        self.queue.push_back(o);
    }

    /// Follows the migration under way and begins the next one when there is none.
    pub async fn step(&mut self, node: &Node, api: &ApiState, now: Millis) -> Outcome {
        let mut out = Outcome::default();
        if let Some((o, task)) = self.running.clone() {
            if get::<Migration>(node, MIGRATIONS, &o.vm).is_some() {
                return out;
            }
            self.running = None;
            let placed = get::<Vm>(node, VMS, &o.vm).and_then(|v| v.placed_on);
            if placed.as_deref() == Some(o.to.as_str()) {
                // Moved: the target's report tells the manager.
                self.said.remove(&o.vm);
            } else {
                let why = get::<Task>(node, TASKS, &task)
                    .and_then(|t| t.error)
                    .unwrap_or_else(|| "the migration ended without moving it".into());
                self.failed(node, &o, &why, now, &mut out);
            }
        }
        while self.running.is_none() {
            let Some(i) = self
                .queue
                .iter()
                .position(|o| self.retry_at.get(&o.vm).is_none_or(|t| now >= *t))
            else {
                break;
            };
            let Some(o) = self.queue.remove(i) else { break };
            let vm = get::<Vm>(node, VMS, &o.vm);
            let on_node = vm.as_ref().and_then(|v| v.placed_on.as_deref()) == Some(&o.from);
            let maintenance = node
                .state
                .read(|t| t.get(MAINTENANCE).is_some_and(|m| m.contains_key(&o.from)));
            if vm.is_none() {
                continue; // deleted: the manager forgets it
            }
            if !on_node || !maintenance {
                // Moved by someone else, or its node left maintenance: nothing to do.
                self.ended(node, &o, &mut out);
                continue;
            }
            match begin_for_drain(api, USER, &o.vm, &o.to).await {
                Ok(task) => {
                    tracing::info!(vm = %o.vm, from = %o.from, to = %o.to, task = %task.id, "maintenance drain: live migration begun");
                    self.running = Some((o, task.id));
                }
                Err(e) => self.failed(node, &o, &e.0, now, &mut out),
            }
        }
        out
    }

    fn failed(&mut self, node: &Node, o: &Order, why: &str, now: Millis, out: &mut Outcome) {
        self.retry_at.insert(o.vm.clone(), now + RETRY_AFTER);
        if self.said.get(&o.vm).map(String::as_str) != Some(why) {
            self.said.insert(o.vm.clone(), why.to_string());
            out.events.push((
                o.vm.clone(),
                format!(
                    "{} could not move {} -> {} to drain {} (maintenance): {why}; it stays on {}, tried again in {} s",
                    o.vm,
                    o.from,
                    o.to,
                    o.from,
                    o.from,
                    RETRY_AFTER / 1000
                ),
            ));
        }
        self.ended(node, o, out);
    }

    /// Tells the manager the move ordered is over without having happened: the VM is where
    /// its node's report says.
    fn ended(&mut self, node: &Node, o: &Order, out: &mut Outcome) {
        let status = get::<VmStatus>(node, VM_STATUS, &o.vm);
        let runs_there = status.as_ref().is_some_and(|s| {
            s.node == o.from && matches!(s.state, VmState::Running | VmState::Paused)
        });
        let fact = if runs_there {
            VmFact::Running
        } else {
            VmFact::Stopped(StopCause::Asked)
        };
        out.inputs.push(Input::Fact {
            vm: VmId(o.vm.clone()),
            node: NodeId(o.from.clone()),
            fact,
        });
        if !runs_there {
            out.refeed.push(o.vm.clone());
        }
    }
}
