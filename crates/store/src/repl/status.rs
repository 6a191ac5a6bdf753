//! `replication_status`: what every replicated volume is on this store, from memory only
//! (the admin op is polled; it must not touch the disk).

use tessera_store_admin::{ReplicaStatus, VolumeReplication};

use super::Replication;

impl Replication {
    /// Every volume this store is the primary or a replica of, by name.
    pub fn status(&self) -> Vec<VolumeReplication> {
        let mut out = Vec::new();
        for (volume, p) in self.primaries.all() {
            let replicas = p
                .replica_states()
                .into_iter()
                .map(|(peer, state)| ReplicaStatus {
                    node: peer.node,
                    addr: peer.addr.to_string(),
                    state,
                    missed_bytes: 0,
                    catch_up_sent_bytes: 0,
                    catch_up_wire_bytes: 0,
                })
                .collect();
            out.push(VolumeReplication {
                volume,
                generation: p.generation().0,
                role: "primary".into(),
                configured: true,
                fenced_by: None,
                replicas,
                last_applied: None,
                must_catch_up: false,
            });
        }
        for (volume, generation, lost) in self.replicas.states() {
            out.push(VolumeReplication {
                volume,
                generation,
                role: "replica".into(),
                configured: true,
                fenced_by: None,
                replicas: Vec::new(),
                last_applied: None,
                must_catch_up: lost,
            });
        }
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        out
    }
}
