//! A VM's writer key (issue #8): while a VM runs, only its own VMM writes its volume,
//! and a VMM whose disk's primary is on another node writes it over NBD on TCP (TLS,
//! with its node's certificate, like any holder of a certificate of the cluster CA).
//! So each VMM this node starts gets a key of its own: 256 random bits, made here just
//! before the VMM starts (a start, a restart, an HA restart, a migration's target), given
//! to the VMM in its environment (never on its command line, which any local user reads)
//! and sent by it after its disk's export name (`tessera_nbd::export_name`). The cluster
//! state keeps only the key's blake3 digest, in `vm_writers/<vm>@<node>`, committed
//! before the VMM starts; the key itself is in the VMM's memory only, never logged.
//!
//! A store's `tesserad` admits a writer presenting a key when it hashes to the digest
//! recorded for the VM on the node the VM is placed on (`placed_on`): a VMM of an earlier
//! start (its record was replaced) or of a node the VM left (an HA restart, a migration's
//! switch-over moves `placed_on`) is refused. The digests are compared in constant time
//! (`blake3::Hash`'s equality).
//!
//! Records do not pile up (one per VM per node it ever ran on): the transaction that
//! moves `placed_on` away from a node (an HA restart, a migration's switch-over, a start
//! placed elsewhere) deletes that node's record in the same Raft entry ([`retire_moved`]),
//! a migration's target whose VMM never took over deletes its own once the VM is not
//! placed there ([`retire_unplaced`]), and a VM's deletion deletes all of its records
//! ([`delete_all`]). What these missed (a migration's target whose `tesserad` restarted
//! during the migration, records an older version kept, a deletion that did not commit)
//! each node deletes itself: its own records of VMs not placed on it, at its start and
//! at every round of its reconciler ([`left_behind`], [`retire_left_behind`]). Why this
//! opens no window for an old VMM: admission only ever
//! looks at the record of the node the VM is placed on, so a record deleted together
//! with (or after) the move that took `placed_on` away from its node was already
//! unused: before that entry its VMM is the writer, as it should be; from it on its key
//! is refused with or without the record. No deletion ever touches the record of the
//! node the VM is placed on (each is conditioned on the VM record it read).

use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_api::Vm;
use tessera_state::{Command, Node, Require, Tables};

use crate::now_ms;
use crate::records::table::{VMS, VM_WRITERS};
use crate::tables::{del, get, put};

/// `vm_writers/<vm>@<node>`: the digest of the key of the VMM that node started last for
/// the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterRecord {
    /// blake3 of the key, hex.
    pub digest: String,
    /// The VM's `start_seq` the VMM was started for.
    pub start_seq: u64,
    /// When it was made (ms since the epoch).
    pub since_ms: u64,
}

/// The record's key for VM `vm` on node `node`.
pub fn record_key(vm: &str, node: &str) -> String {
    format!("{vm}@{node}")
}

/// The digest a key is recorded by.
pub fn digest(key: &str) -> blake3::Hash {
    blake3::hash(key.as_bytes())
}

/// A new key (64 hex digits of the OS's random numbers) and its record.
fn make(vm: &Vm) -> (String, WriterRecord) {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let key: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let record = WriterRecord {
        digest: digest(&key).to_hex().to_string(),
        start_seq: vm.start_seq,
        since_ms: now_ms(),
    };
    (key, record)
}

/// Makes the key of the VMM node `me` is about to start for `vm` and records its digest
/// in the cluster state (replacing the one of this node's previous VMM for the VM); the
/// key, once committed. `Err`: why not (no quorum, the VM deleted), in words.
pub async fn issue(node: &Node, me: &str, vm: &Vm) -> Result<String, String> {
    let (key, record) = make(vm);
    node.write(Command::Txn {
        require: vec![Require::exists(VMS, &vm.name)],
        ops: vec![put(VM_WRITERS, &record_key(&vm.name, me), &record)],
    })
    .await
    .map_err(|e| format!("recording its VMM's writer key: {e}"))?;
    Ok(key)
}

/// The command deleting the record of the node `before` (a VM's record) was placed on,
/// for the transaction that writes `after` (the same VM) placed elsewhere or nowhere, and
/// that requires `before` unchanged; `None` when the VM stays where it was.
pub fn retire_moved(before: &Vm, after: &Vm) -> Option<Command> {
    let from = before.placed_on.as_deref()?;
    (after.placed_on.as_deref() != Some(from))
        .then(|| del(VM_WRITERS, &record_key(&before.name, from)))
}

/// The commands deleting every record of VM `vm` (for the transaction deleting it).
pub fn delete_all(node: &Node, vm: &str) -> Vec<Command> {
    node.state.read(|t| {
        t.get(VM_WRITERS)
            .map(|records| {
                records
                    .keys()
                    .filter(|k| belongs_to(k, vm))
                    .map(|k| del(VM_WRITERS, k))
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether record key `key` is one of VM `vm`'s (node ids hold no `@`; a VM's name may).
fn belongs_to(key: &str, vm: &str) -> bool {
    key.rsplit_once('@').is_some_and(|(v, _)| v == vm)
}

/// Deletes node `me`'s record for VM `name` if the VM is not placed on `me` (a
/// migration's target whose VMM did not take over), in a transaction requiring the VM
/// record it read, so a switch-over committed meanwhile keeps it. Best effort: a record
/// left is deleted by the reconciler's next round ([`retire_left_behind`]).
pub async fn retire_unplaced(node: &Node, me: &str, name: &str) {
    for _ in 0..3 {
        let vm = get::<Vm>(node, VMS, name);
        if vm
            .as_ref()
            .is_some_and(|v| v.placed_on.as_deref() == Some(me))
        {
            return;
        }
        let require = match &vm {
            Some(v) => Require::equals(VMS, name, json!(v)),
            None => Require::absent(VMS, name),
        };
        let txn = Command::Txn {
            require: vec![require],
            ops: vec![del(VM_WRITERS, &record_key(name, me))],
        };
        match node.write(txn).await {
            Ok(a) if a.conflict.is_none() => return,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(vm = name, error = %e, "writer record not retired; replaced at the next start here");
                return;
            }
        }
    }
}

/// A record of node `me` that no longer counts: the VM it was made for is not placed on
/// `me`, or is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct LeftBehind {
    /// The VM's name.
    pub vm: String,
    /// The VM's record as read (`None`: the VM is deleted).
    vm_record: Option<serde_json::Value>,
    /// The writer record as read.
    record: serde_json::Value,
}

/// Node `me`'s records in `tables` for VMs not placed on `me` (or deleted), except those
/// of the VMs `arriving` names: a migration to `me` under way records its target VMM's
/// key before the switch-over places the VM here. A VM record that does not decode keeps
/// its records (unreadable is not "placed elsewhere").
pub fn left_behind(tables: &Tables, me: &str, arriving: &dyn Fn(&str) -> bool) -> Vec<LeftBehind> {
    let Some(records) = tables.get(VM_WRITERS) else {
        return Vec::new();
    };
    let vms = tables.get(VMS);
    records
        .iter()
        .filter_map(|(key, record)| {
            let (vm, node) = key.rsplit_once('@')?;
            if node != me || arriving(vm) {
                return None;
            }
            let vm_record = vms.and_then(|t| t.get(vm)).cloned();
            if let Some(v) = &vm_record {
                let placed = serde_json::from_value::<Vm>(v.clone()).ok()?.placed_on;
                if placed.as_deref() == Some(me) {
                    return None;
                }
            }
            Some(LeftBehind {
                vm: vm.to_string(),
                vm_record,
                record: record.clone(),
            })
        })
        .collect()
}

/// The transaction deleting `l` (a record of node `me`), requiring the VM record and the
/// writer record it read: a VM placed on `me` meanwhile, or a key issued on `me`
/// meanwhile (a migration's target, a start), keeps its record.
fn retire_txn(me: &str, l: &LeftBehind) -> Command {
    let key = record_key(&l.vm, me);
    let vm = match &l.vm_record {
        Some(v) => Require::equals(VMS, &l.vm, v.clone()),
        None => Require::absent(VMS, &l.vm),
    };
    Command::Txn {
        require: vec![vm, Require::equals(VM_WRITERS, &key, l.record.clone())],
        ops: vec![del(VM_WRITERS, &key)],
    }
}

/// Deletes node `me`'s records `left` ([`left_behind`]), each in its own transaction
/// ([`retire_txn`]); how many it deleted. One that conflicts (the state moved on) or
/// does not commit (no quorum) stays for the next round to look at again.
pub async fn retire_left_behind(node: &Node, me: &str, left: Vec<LeftBehind>) -> usize {
    let mut deleted = 0;
    for l in left {
        match node.write(retire_txn(me, &l)).await {
            Ok(a) if a.conflict.is_none() => {
                deleted += 1;
                tracing::info!(vm = %l.vm, "deleted this node's writer record of a VM not placed here (left behind)");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(vm = %l.vm, error = %e, "writer record left behind not deleted yet");
                break;
            }
        }
    }
    deleted
}

/// Whether `key` is the key of the VMM of `vm` on the node it is placed on, as this
/// node's copy of the cluster state has it.
pub fn is_current(node: &Node, vm: &Vm, key: &str) -> bool {
    let Some(on) = vm.placed_on.as_deref() else {
        return false;
    };
    let record: Option<WriterRecord> = get(node, VM_WRITERS, &record_key(&vm.name, on));
    matches(record.as_ref(), key)
}

/// Whether `key` hashes to `record`'s digest (in constant time).
pub fn matches(record: Option<&WriterRecord>, key: &str) -> bool {
    let Some(want) = record.and_then(|r| blake3::Hash::from_hex(&r.digest).ok()) else {
        return false;
    };
    digest(key) == want
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(start_seq: u64) -> Vm {
        serde_json::from_value(serde_json::json!({
            "name": "web", "vcpus": 1, "memory_mib": 64, "disks": ["v"],
            "kernel": null, "cmdline": null, "node": null,
            "desired_state": "running", "start_seq": start_seq,
            "generation": 1, "created_ms": 0, "updated_ms": 0,
        }))
        .unwrap()
    }

    #[test]
    fn a_key_matches_only_its_own_record() {
        let (key, record) = make(&vm(3));
        assert_eq!(key.len(), 64, "256 bits, hex");
        assert_eq!(record.start_seq, 3);
        assert!(matches(Some(&record), &key));
        // Wrong: another key, a key one digit off, nothing.
        let (other, next) = make(&vm(4));
        assert_ne!(other, key);
        assert!(!matches(Some(&record), &other));
        let mut off = key.clone().into_bytes();
        off[63] = if off[63] == b'0' { b'1' } else { b'0' };
        assert!(!matches(Some(&record), &String::from_utf8(off).unwrap()));
        assert!(!matches(Some(&record), ""));
        // Stale: the next start's record replaced this one.
        assert!(!matches(Some(&next), &key));
        assert!(matches(Some(&next), &other));
        // No record, or a record that does not parse: nothing matches.
        assert!(!matches(None, &key));
        let broken = WriterRecord {
            digest: "zz".into(),
            ..record
        };
        assert!(!matches(Some(&broken), &key));
        // The record never holds the key.
        assert!(!serde_json::to_string(&next).unwrap().contains(&other));
    }

    fn placed(on: Option<&str>) -> Vm {
        let mut v = vm(1);
        v.placed_on = on.map(str::to_string);
        v
    }

    /// A move away from a node retires that node's record, in the move's own transaction;
    /// a VM staying where it was keeps it, and the new node's record is never touched.
    #[test]
    fn a_move_retires_the_record_of_the_node_left() {
        let gone = |c: Option<Command>| match c {
            Some(Command::Delete { table, key }) => Some((table, key)),
            None => None,
            Some(other) => panic!("not a delete: {other:?}"),
        };
        // HA restart or switch-over: a to b.
        assert_eq!(
            gone(retire_moved(&placed(Some("a")), &placed(Some("b")))),
            Some((VM_WRITERS.to_string(), "web@a".to_string()))
        );
        // A restart on the same node replaces its record instead.
        assert_eq!(
            gone(retire_moved(&placed(Some("a")), &placed(Some("a")))),
            None
        );
        // Never placed: nothing to retire.
        assert_eq!(gone(retire_moved(&placed(None), &placed(Some("b")))), None);
    }

    #[test]
    fn a_vms_deletion_finds_its_records_only() {
        assert!(belongs_to(&record_key("web", "n1"), "web"));
        assert!(!belongs_to(&record_key("web2", "n1"), "web"));
        assert!(!belongs_to(&record_key("we", "n1"), "web"));
        assert!(belongs_to(&record_key("a@b", "n1"), "a@b"));
        assert!(!belongs_to(&record_key("a@b", "n1"), "a"));
    }

    fn named(name: &str, on: Option<&str>) -> Vm {
        let mut v = placed(on);
        v.name = name.to_string();
        v
    }

    fn record_of(n: u8) -> WriterRecord {
        WriterRecord {
            digest: format!("{n:064x}"),
            start_seq: 1,
            since_ms: u64::from(n),
        }
    }

    /// Which of node "me"'s records count as left behind: those of VMs placed elsewhere,
    /// placed nowhere or deleted; not those of VMs placed on "me", of VMs a migration to
    /// "me" holds, of VMs whose record does not decode, nor other nodes' records.
    #[test]
    fn left_behind_are_this_nodes_records_of_vms_not_placed_here() {
        let mut vms = imbl::OrdMap::new();
        let mut records = imbl::OrdMap::new();
        for (vm, on) in [
            ("moved", Some("b")),
            ("here", Some("me")),
            ("stopped", None),
            ("arriving", Some("b")),
            ("a@b", Some("b")),
        ] {
            vms.insert(vm.to_string(), json!(named(vm, on)));
        }
        vms.insert("broken".to_string(), json!({"name": "broken"}));
        let mine = [
            "moved", "here", "stopped", "arriving", "a@b", "broken", "deleted",
        ];
        for (i, vm) in (0u8..).zip(mine) {
            records.insert(record_key(vm, "me"), json!(record_of(i)));
        }
        // Another node's records of a VM placed elsewhere than on it: not this node's.
        records.insert(record_key("moved", "c"), json!(record_of(9)));
        let mut tables = Tables::new();
        tables.insert(VMS.to_string(), vms);
        tables.insert(VM_WRITERS.to_string(), records);
        let left = left_behind(&tables, "me", &|vm| vm == "arriving");
        let names: Vec<&str> = left.iter().map(|l| l.vm.as_str()).collect();
        assert_eq!(names, ["a@b", "deleted", "moved", "stopped"]);
        // Each carries what the deletion requires: the records as read.
        let deleted = &left[1];
        assert_eq!(deleted.vm_record, None);
        assert_eq!(deleted.record, json!(record_of(6)));
        assert_eq!(left[2].vm_record, Some(json!(named("moved", Some("b")))));
        // Nothing to look at: nothing left behind.
        assert!(left_behind(&Tables::new(), "me", &|_| false).is_empty());
    }

    /// A one-member Raft cluster in `dir`, its leader elected.
    async fn one_node(dir: &std::path::Path) -> Node {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let node = Node::start(1, addr, dir, None, None).await.unwrap();
        node.initialize(std::collections::BTreeMap::from([(1, addr)]))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while node.raft.metrics().borrow().current_leader != Some(1) {
            assert!(std::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        node
    }

    fn writer(node: &Node, vm: &str, on: &str) -> Option<WriterRecord> {
        get(node, VM_WRITERS, &record_key(vm, on))
    }

    /// Through Raft: the records left behind are deleted, the others stay; a deletion
    /// decided on a read the state then moved past (the VM placed here, a key issued
    /// here meanwhile) deletes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_left_behind_are_deleted_but_not_what_changed_since_the_read() {
        let d = tempfile::tempdir().unwrap();
        let node = one_node(d.path()).await;
        let n = &node;
        let write = |cmd: Command| async move {
            let a = n.write(cmd).await.unwrap();
            assert!(a.conflict.is_none(), "{a:?}");
        };
        for (vm, on) in [
            ("moved", Some("b")),
            ("here", Some("me")),
            ("target", Some("b")),
            ("back", Some("b")),
        ] {
            write(put(VMS, vm, named(vm, on))).await;
        }
        // Keys issued on "me" (the VM record must exist), and one of a VM since deleted.
        let mut keys = std::collections::HashMap::new();
        for vm in ["moved", "here", "target", "back", "deleted"] {
            let v = named(vm, Some("me"));
            if vm == "deleted" {
                write(put(VMS, vm, &v)).await;
            }
            keys.insert(vm, issue(&node, "me", &v).await.unwrap());
        }
        write(del(VMS, "deleted")).await;
        write(put(VM_WRITERS, &record_key("moved", "b"), record_of(1))).await;

        let read = |node: &Node| node.state.read(|t| left_behind(t, "me", &|_| false));
        let left = read(&node);
        let names: Vec<&str> = left.iter().map(|l| l.vm.as_str()).collect();
        assert_eq!(names, ["back", "deleted", "moved", "target"]);
        // Meanwhile: "target" gets a new key here (a migration's target VMM), "back" is
        // placed here again. Their deletions, decided before, conflict.
        let new_key = issue(&node, "me", &named("target", Some("b")))
            .await
            .unwrap();
        write(put(VMS, "back", named("back", Some("me")))).await;
        assert_eq!(retire_left_behind(&node, "me", left).await, 2);

        assert_eq!(writer(&node, "moved", "me"), None);
        assert_eq!(writer(&node, "deleted", "me"), None);
        let current = |vm: &str, key: &str| matches(writer(&node, vm, "me").as_ref(), key);
        assert!(
            current("here", &keys["here"]),
            "the record of a VM placed here"
        );
        assert!(current("target", &new_key), "a key issued after the read");
        assert!(
            current("back", &keys["back"]),
            "a VM placed here after the read"
        );
        // Another node's record is its own to delete.
        assert_eq!(writer(&node, "moved", "b"), Some(record_of(1)));
        // The next round finds what the state now says is left behind: "target" (still
        // placed on b, no migration holding it here).
        let again: Vec<String> = read(&node).into_iter().map(|l| l.vm).collect();
        assert_eq!(again, ["target"]);
        node.shutdown().await;
    }
}
