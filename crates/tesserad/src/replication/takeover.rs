//! Exports from any node (issue #8): this node's store asks (over the status socket) to
//! become the primary of a replicated volume a client opened there for writing. The
//! primary moves as for a VM starting here ([`super::moves::plan`]: only to an in-sync
//! copy that is not joining, the generation raised in the same compare-and-swap of the
//! volume record), so the previous primary is fenced: its store becomes a replica of the
//! new generation, and the new primary's first question to each replica fences it before
//! any write is served here.
//!
//! Refused, in words the client sees: a volume a VM uses (its primary moves only with the
//! VM: start, migration, HA), a copy here that is not in sync, a one-copy volume. A store
//! asked for a volume it holds no copy of is told where the copies are and which nodes'
//! stores to forward its client to, and asks before the client's writes whether a VM
//! uses the volume.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_api::{DesiredState, Vm, VmState};
use tessera_state::Node;
use tessera_store_admin::{AdminOp, AdminReply};

use crate::records::table::{SNAPSHOTS, VMS, VOLUMES};
use crate::records::{Snapshot, Volume, VolumeState};
use crate::tables::get;

/// How long the store is given to serve the volume as its primary after the move.
const STORE_WAIT: Duration = Duration::from_secs(20);
/// How often it is asked meanwhile.
const ASK_EVERY: Duration = Duration::from_millis(20);
/// Compare-and-swap attempts when the record changes under the move.
const ATTEMPTS: usize = 5;

/// Makes node `me` the primary of `volume` for an export client there; the generation it
/// serves in once its store does, or why not.
pub async fn take_primary(node: &Arc<Node>, me: &str, volume: &str) -> Result<u64, String> {
    // The decision is taken on the cluster's latest state, not a lagging copy of it.
    node.sync()
        .await
        .map_err(|e| crate::replicated::sync_failure(&e).to_string())?;
    let mut generation = None;
    for _ in 0..ATTEMPTS {
        let v = get::<Volume>(node, VOLUMES, volume)
            .ok_or_else(|| format!("there is no volume {volume} in the cluster"))?;
        refuse_if_used(node, me, &v)?;
        if v.node == me {
            generation = Some(v.generation);
            break;
        }
        let mut new = movable(node, me, &v)?;
        new.nbd = super::nbd_uri(&super::node_records(node), me, &v.name);
        let msg = format!(
            "primary moved from {} to {} for an export client (NBD or QUIC) there; generation {}",
            name_of(node, &v.node),
            name_of(node, me),
            new.generation
        );
        if super::resync::write(node, &v, &new, &[("volume.primary_moved", msg)]).await {
            tracing::info!(
                volume,
                generation = new.generation,
                "moved the volume's primary here for an export client"
            );
            generation = Some(new.generation);
            break;
        }
    }
    let generation = generation.ok_or_else(|| {
        format!("volume {volume} kept changing while its primary was being moved here; try again")
    })?;
    wait_for_store(volume, generation).await?;
    Ok(generation)
}

/// Where the copies of `volume` are, for a client of node `me`, whose store holds none:
/// `None` when the cluster has no such volume. The store forwards the client's requests
/// to the first of `targets` it reaches (`tessera-store`'s `forward`): the primary's
/// node, then the other in-sync copies' (where the first write makes that node the
/// primary, as for any client there); nodes known down go last. `message` says where
/// the copies are, for a client the store cannot serve.
pub fn copies_elsewhere(node: &Node, me: &str, volume: &str) -> Option<serde_json::Value> {
    let v = get::<Volume>(node, VOLUMES, volume)?;
    let mut on: Vec<String> = v.copies.iter().map(|c| name_of(node, &c.node)).collect();
    if on.is_empty() {
        on.push(name_of(node, &v.node));
    }
    let message = format!(
        "node {} holds no copy of volume {volume}; its copies are on {} (primary: {}): connect to one of those",
        name_of(node, me),
        on.join(", "),
        name_of(node, &v.node)
    );
    let records = super::node_records(node);
    let down = |id: &str| super::liveness(me, id) == super::Liveness::Down;
    let targets: Vec<serde_json::Value> = forward_order(&v, me, &down)
        .iter()
        .filter_map(|id| {
            let addr = records.get(id)?["nbd"].as_str()?.to_string();
            Some(serde_json::json!({ "node": name_of(node, id), "addr": addr }))
        })
        .collect();
    // A forwarding store whose connection broke tells from these whether the primary
    // moved away from the node its client wrote through because that copy failed (the
    // cluster's failover) or for another writer (then its client is fenced).
    let primary = name_of(node, &v.node);
    let in_sync: Vec<String> = v
        .copies
        .iter()
        .filter(|c| c.state == tessera_api::CopyState::InSync)
        .map(|c| name_of(node, &c.node))
        .collect();
    Some(serde_json::json!({
        "message": message, "targets": targets, "primary": primary, "in_sync": in_sync,
    }))
}

/// Every volume and snapshot of the cluster that is ready, as the exports a store
/// serves (`<volume>@<snapshot>` for a snapshot): a store lists the ones it holds no copy
/// of too (NBD_OPT_LIST), since it serves them by forwarding.
pub fn exports(node: &Node) -> serde_json::Value {
    let ready = |t: &crate::tables::Table, decode: fn(&serde_json::Value) -> bool| {
        t.iter()
            .filter(|(_, v)| decode(v))
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    };
    let (volumes, snapshots) = node.state.read(|t| {
        let volumes = t.get(VOLUMES).map(|t| {
            ready(t, |v| {
                serde_json::from_value::<Volume>(v.clone())
                    .is_ok_and(|v| v.state == VolumeState::Ready)
            })
        });
        let snapshots = t.get(SNAPSHOTS).map(|t| {
            ready(t, |v| {
                serde_json::from_value::<Snapshot>(v.clone())
                    .is_ok_and(|s| s.state == VolumeState::Ready)
            })
        });
        (volumes.unwrap_or_default(), snapshots.unwrap_or_default())
    });
    let listed = volumes
        .into_iter()
        .map(|name| serde_json::json!({ "name": name, "snapshot": false }))
        .chain(
            snapshots
                .into_iter()
                .map(|name| serde_json::json!({ "name": name, "snapshot": true })),
        );
    serde_json::json!({ "exports": listed.collect::<Vec<_>>() })
}

/// The nodes a store of node `me` holding no copy of `v` forwards its client to, the
/// first to try first: the primary's, then the other in-sync copies' (not joining: they
/// could not take the primary), the nodes `down` says are down last; never `me`.
fn forward_order(v: &Volume, me: &str, down: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut order = vec![v.node.clone()];
    order.extend(
        v.copies
            .iter()
            .filter(|c| c.node != v.node && c.state == tessera_api::CopyState::InSync && !c.joining)
            .map(|c| c.node.clone()),
    );
    order.retain(|id| id != me);
    // A stable sort: the primary stays first among the nodes not known down.
    order.sort_by_key(|id| down(id));
    order
}

/// Whether a client of node `me`'s store, which holds no copy of `volume` and forwards
/// to another node's, may write it: not when a VM uses it (the same words as on a node
/// holding a copy).
pub fn may_write(node: &Node, me: &str, volume: &str) -> Result<(), String> {
    let v = get::<Volume>(node, VOLUMES, volume)
        .ok_or_else(|| format!("there is no volume {volume} in the cluster"))?;
    refuse_if_used(node, me, &v)
}

/// Who a client of a node's own store is, as far as the store can tell.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriterId<'a> {
    /// Its process id, when it came on the store's Unix socket (`SO_PEERCRED`).
    pub pid: Option<u32>,
    /// The writer key it gave after the export's name, if any
    /// (`crate::vmrun::writer_key`).
    pub key: Option<&'a str>,
}

/// Whether client `who` of node `me`'s own store may write `volume`: while a VM uses
/// it, only its VMM may (issue #8; a second writer would write under the guest): the
/// VMM that `vmm_of` says runs that VM on this node (its `run.json`), or the one holding
/// the writer key the cluster recorded for the VM on the node it is placed on (a VMM on
/// another node, over NBD on TCP). A volume the cluster does not know is not guarded here.
pub fn may_write_here(
    node: &Node,
    me: &str,
    volume: &str,
    who: WriterId<'_>,
    vmm_of: &dyn Fn(&str) -> Option<u32>,
) -> Result<(), String> {
    let Some(v) = get::<Volume>(node, VOLUMES, volume) else {
        return Ok(());
    };
    let key_ok = |vm: &Vm, key: &str| crate::vmrun::writer_key::is_current(node, vm, key);
    writer_of_used(
        &v,
        &vms(node),
        who,
        vmm_of,
        &key_ok,
        &|id| name_of(node, id),
        me,
    )
}

/// The rule of [`may_write_here`] on the VMs `vms`, keys checked by `key_ok`, nodes
/// named by `name`.
fn writer_of_used(
    v: &Volume,
    vms: &[Vm],
    who: WriterId<'_>,
    vmm_of: &dyn Fn(&str) -> Option<u32>,
    key_ok: &dyn Fn(&Vm, &str) -> bool,
    name: &dyn Fn(&str) -> String,
    me: &str,
) -> Result<(), String> {
    let Some(vm) = vms
        .iter()
        .find(|vm| vm.disks.contains(&v.name) && in_use(vm))
    else {
        return Ok(());
    };
    // This node's VMM, while the VM is placed here: a migration's target VMM writes
    // once the switch-over places the VM on its node, its source VMM no longer then.
    let placed_here = vm.placed_on.as_deref().is_none_or(|n| n == me);
    if placed_here && who.pid.is_some() && who.pid == vmm_of(&vm.name) {
        return Ok(());
    }
    if who.key.is_some_and(|k| key_ok(vm, k)) {
        return Ok(());
    }
    let on = vm.placed_on.as_deref().or(vm.node.as_deref()).map_or_else(
        || "no node yet".to_string(),
        |n| format!("node {}", name(n)),
    );
    let who = match (who.key, who.pid) {
        (Some(_), _) => "a client whose writer key is not that of its VMM for this start there (a VMM of an earlier start or of a node the VM left, or a wrong key)".to_string(),
        (None, Some(p)) => format!("process {p}"),
        (None, None) => "this client".to_string(),
    };
    Err(format!(
        "volume {} is in use by VM {} ({:?} on {on}): while it runs only its VMM writes it, not {who} through node {}'s store (reads are allowed); to write it, stop the VM first, or read a snapshot of it (tessera volume snapshot {} NAME, then export {}@NAME)",
        v.name,
        vm.name,
        vm.actual_state,
        name(me),
        v.name,
        v.name
    ))
}

/// The cluster's VM records.
fn vms(node: &Node) -> Vec<Vm> {
    node.state.read(|t| {
        t.get(VMS)
            .map(|vms| {
                vms.values()
                    .filter_map(|r| serde_json::from_value::<Vm>(r.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// A VM that uses `v` and is not stopped keeps its primary: refused with its name and
/// node.
fn refuse_if_used(node: &Node, me: &str, v: &Volume) -> Result<(), String> {
    let vms = vms(node);
    let Some(vm) = vms
        .iter()
        .find(|vm| vm.disks.contains(&v.name) && in_use(vm))
    else {
        return Ok(());
    };
    let on = vm.node.as_deref().map_or_else(
        || "no node yet".to_string(),
        |n| format!("node {}", name_of(node, n)),
    );
    Err(format!(
        "volume {} is in use by VM {} ({:?} on {on}): it is not written through node {} (a VM's disk moves only with the VM); read a snapshot of it instead (tessera volume snapshot {} NAME, then export {}@NAME)",
        v.name,
        vm.name,
        vm.actual_state,
        name_of(node, me),
        v.name,
        v.name
    ))
}

/// Whether a VM holds its disk: running or about to, or in a state not known.
fn in_use(vm: &Vm) -> bool {
    vm.desired_state != DesiredState::Stopped
        || !matches!(vm.actual_state, VmState::Stopped | VmState::Crashed)
}

/// The record that makes `me` the primary of `v`, or why it cannot be.
fn movable(node: &Node, me: &str, v: &Volume) -> Result<Volume, String> {
    super::moves::plan(v, me).ok_or_else(|| why_not(v, me, &|id| name_of(node, id)))
}

/// Why `me` cannot become `v`'s primary (when [`super::moves::plan`] says no), with the
/// nodes' names from `name`.
fn why_not(v: &Volume, me: &str, name: &dyn Fn(&str) -> String) -> String {
    let (here, primary) = (name(me), name(&v.node));
    if !v.is_replicated() {
        return format!(
            "volume {} has one copy, on node {primary}: connect to node {primary}",
            v.name
        );
    }
    if v.state != VolumeState::Ready {
        return format!(
            "volume {} is not ready ({:?}); try again later",
            v.name, v.state
        );
    }
    let why = match v.copies.iter().find(|c| c.node == me) {
        None => "holds no copy of it".to_string(),
        Some(c) if c.joining => "holds a copy still rejoining the in-sync set".to_string(),
        Some(c) => format!("holds a copy that is {:?}", c.state).to_lowercase(),
    };
    format!(
        "node {here} {why}, so it cannot become volume {}'s primary now; connect to its primary, node {primary}, or wait until the copy here is in sync",
        v.name
    )
}

/// Waits until this node's store serves `volume` as its primary in `generation`.
async fn wait_for_store(volume: &str, generation: u64) -> Result<(), String> {
    let Some(socket) = super::ADMIN_SOCKET.get() else {
        return Err("this node's tesserad does not drive its store yet; try again".into());
    };
    let deadline = Instant::now() + STORE_WAIT;
    loop {
        let asked = tokio::time::timeout(
            Duration::from_secs(2),
            super::roles::call(socket, AdminOp::ReplicationStatus {}),
        )
        .await;
        if let Ok(Ok(AdminReply::Replication(held))) = asked {
            if super::moves::serves_as_primary(&held, volume, generation) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the cluster made this node volume {volume}'s primary (generation {generation}), but its store did not take the role within {} s; try again",
                STORE_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}

/// A node's name from its record, else its id.
fn name_of(node: &Node, id: &str) -> String {
    super::node_records(node)
        .get(id)
        .and_then(|r| r["name"].as_str().map(String::from))
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::CopyState::{CatchingUp, InSync, OutOfSync};

    fn name(id: &str) -> String {
        format!("node-{id}")
    }

    #[test]
    fn a_node_without_a_copy_forwards_to_the_primary_then_to_in_sync_copies_not_down() {
        let v = super::super::test_volume::volume(
            3,
            &[
                ("a", InSync, false),
                ("b", CatchingUp, false),
                ("c", InSync, true),
                ("d", InSync, false),
            ],
        );
        let none = |_: &str| false;
        assert_eq!(forward_order(&v, "e", &none), ["a", "d"]);
        // The primary's node known down: tried last.
        assert_eq!(forward_order(&v, "e", &|id| id == "a"), ["d", "a"]);
        // A one-copy volume: its node only.
        let one = super::super::test_volume::volume(3, &[("a", InSync, false)]);
        assert_eq!(forward_order(&one, "e", &none), ["a"]);
        // Never to itself (a stale view of the copies).
        assert_eq!(forward_order(&v, "d", &none), ["a"]);
    }

    #[test]
    fn while_a_vm_uses_a_volume_only_its_vmm_writes_it_through_this_node() {
        let v = super::super::test_volume::volume(3, &[("a", InSync, false)]);
        let vm = |name: &str, disk: &str, desired: &str, actual: &str| -> Vm {
            serde_json::from_value(serde_json::json!({
                "name": name, "vcpus": 1, "memory_mib": 64, "disks": [disk],
                "kernel": null, "cmdline": null, "node": "a",
                "desired_state": desired, "actual_state": actual,
                "generation": 1, "created_ms": 0, "updated_ms": 0,
            }))
            .unwrap()
        };
        let vmm = |vm: &str| (vm == "user").then_some(42);
        let keys = |_: &Vm, key: &str| key == "current";
        let pid = |pid| WriterId { pid, key: None };
        let rule = |vms: &[Vm], pid| writer_of_used(&v, vms, pid, &vmm, &keys, &name, "a");
        // No VM uses it: any client writes.
        assert_eq!(
            rule(&[vm("other", "w", "running", "running")], pid(None)),
            Ok(())
        );
        let used = [vm("user", "v", "running", "running")];
        // Its VMM (the pid this node's run.json names) writes; nothing else does.
        assert_eq!(rule(&used, pid(Some(42))), Ok(()));
        let e = rule(&used, pid(Some(7))).unwrap_err();
        assert!(
            e.contains("volume v is in use by VM user (Running on node node-a)"),
            "{e}"
        );
        assert!(
            e.contains("not process 7 through node node-a's store"),
            "{e}"
        );
        assert!(rule(&used, pid(None))
            .unwrap_err()
            .contains("not this client"));
        // This node's VMM of a VM placed on another node (a migration's either side
        // while the other is the VM's): refused.
        let mut moved = vm("user", "v", "running", "running");
        moved.placed_on = Some("b".into());
        assert!(rule(&[moved], pid(Some(42))).is_err());
        // A VM of another node, whose VMM is not this node's: refused too.
        let vmm_elsewhere = |_: &str| None;
        let who = pid(Some(42));
        assert!(writer_of_used(&v, &used, who, &vmm_elsewhere, &keys, &name, "a").is_err());
        // Over TCP (no pid): the VMM's current writer key writes; a missing, wrong or
        // stale key does not, in words.
        let key = |key| WriterId { pid: None, key };
        assert_eq!(rule(&used, key(Some("current"))), Ok(()));
        for bad in [Some("stale"), Some("")] {
            let e = rule(&used, key(bad)).unwrap_err();
            assert!(e.contains("whose writer key is not that of its VMM"), "{e}");
            assert!(e.contains("(reads are allowed)"), "{e}");
        }
        assert!(rule(&used, key(None))
            .unwrap_err()
            .contains("not this client"));
        // A stopped VM holds nothing.
        assert_eq!(
            rule(&[vm("user", "v", "stopped", "stopped")], pid(Some(7))),
            Ok(())
        );
    }

    #[test]
    fn a_copy_that_cannot_take_the_primary_says_why_and_where_to_go() {
        let v = super::super::test_volume::volume(
            3,
            &[
                ("a", InSync, false),
                ("b", CatchingUp, false),
                ("c", InSync, true),
            ],
        );
        let b = why_not(&v, "b", &name);
        assert!(
            b.contains("node node-b holds a copy that is catchingup"),
            "{b}"
        );
        assert!(b.contains("its primary, node node-a"), "{b}");
        let c = why_not(&v, "c", &name);
        assert!(c.contains("still rejoining"), "{c}");
        let d = why_not(&v, "d", &name);
        assert!(d.contains("node node-d holds no copy of it"), "{d}");
        let v =
            super::super::test_volume::volume(3, &[("a", InSync, false), ("b", OutOfSync, false)]);
        assert!(why_not(&v, "b", &name).contains("outofsync"));
        let mut one = v.clone();
        one.replicas = 1;
        one.copies.clear();
        assert!(why_not(&one, "b", &name).contains("has one copy, on node node-a"));
        let mut creating =
            super::super::test_volume::volume(3, &[("a", InSync, false), ("b", InSync, false)]);
        creating.state = VolumeState::Creating;
        assert!(why_not(&creating, "b", &name).contains("is not ready"));
        // Where the move is possible, the plan makes it (the same rule as a VM start).
        creating.state = VolumeState::Ready;
        assert_eq!(
            super::super::moves::plan(&creating, "b").map(|n| n.generation),
            Some(4)
        );
    }
}
