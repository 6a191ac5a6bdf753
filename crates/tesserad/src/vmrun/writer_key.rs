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
//! ([`delete_all`]). Why this opens no window for an old VMM: admission only ever
//! looks at the record of the node the VM is placed on, so a record deleted together
//! with (or after) the move that took `placed_on` away from its node was already
//! unused: before that entry its VMM is the writer, as it should be; from it on its key
//! is refused with or without the record. No deletion ever touches the record of the
//! node the VM is placed on (each is conditioned on the VM record it read).

use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_api::Vm;
use tessera_state::{Command, Node, Require};

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
/// left is replaced by this node's next key for the VM, or deleted with the VM.
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
}
