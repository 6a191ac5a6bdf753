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

use rand::RngCore;
use serde::{Deserialize, Serialize};
use tessera_api::Vm;
use tessera_state::{Command, Node, Require};

use crate::now_ms;
use crate::records::table::{VMS, VM_WRITERS};
use crate::tables::{get, put};

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
}
