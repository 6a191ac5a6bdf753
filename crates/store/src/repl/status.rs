//! `replication_status`: what every replicated volume is on this store, from memory only
//! (the admin op is polled; it must not touch the disk).

use tessera_store_admin::{AppliedPosition, ReplicaStatus, VolumeReplication};

use super::Replication;

impl Replication {
    /// Every volume this store is the primary or a replica of, by name.
    pub fn status(&self) -> Vec<VolumeReplication> {
        let mut out = Vec::new();
        for (volume, p) in self.primaries.all() {
            let replicas = p
                .replica_states()
                .into_iter()
                .map(|(peer, state, missed_bytes, (sent, wire))| ReplicaStatus {
                    node: peer.node,
                    addr: peer.addr.to_string(),
                    state,
                    missed_bytes,
                    catch_up_sent_bytes: sent,
                    catch_up_wire_bytes: wire,
                })
                .collect();
            out.push(VolumeReplication {
                volume,
                generation: p.generation().0,
                role: "primary".into(),
                configured: true,
                fenced_by: p.fenced_by(),
                replicas,
                last_applied: None,
                must_catch_up: false,
                repaired_blocks: p.repairs.count(),
                repairs: p.repairs.last(),
            });
        }
        for (volume, generation, last, must_catch_up) in self.replicas.states() {
            out.push(VolumeReplication {
                configured: !self.unconfigured.lock().contains(&volume),
                volume,
                generation,
                role: "replica".into(),
                fenced_by: None,
                replicas: Vec::new(),
                last_applied: last.map(|seq| AppliedPosition { generation, seq }),
                must_catch_up,
                repaired_blocks: 0,
                repairs: Vec::new(),
            });
        }
        for volume in self.waiting_primaries.lock().iter() {
            out.push(VolumeReplication {
                volume: volume.clone(),
                generation: self.store.generation(volume).unwrap_or(0),
                role: "primary".into(),
                configured: false,
                fenced_by: None,
                replicas: Vec::new(),
                last_applied: None,
                must_catch_up: false,
                repaired_blocks: 0,
                repairs: Vec::new(),
            });
        }
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        out
    }
}
