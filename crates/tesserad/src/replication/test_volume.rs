//! The volume record the replication decisions' unit tests start from (failover, resync
//! and primary moves decide on the same record).

use tessera_api::{CopyState, VolumeCopy};

use crate::records::{Volume, VolumeState};

/// A ready 4 KiB volume `v` in `generation` with these copies (node, state, joining);
/// the first copy's node is the primary's.
pub fn volume(generation: u64, copies: &[(&str, CopyState, bool)]) -> Volume {
    Volume {
        name: "v".into(),
        node: copies[0].0.into(),
        size_bytes: 4096,
        state: VolumeState::Ready,
        origin: None,
        nbd: None,
        created_ms: 0,
        replicas: copies.len() as u8,
        generation,
        copies: copies
            .iter()
            .map(|(n, s, j)| VolumeCopy {
                node: n.to_string(),
                state: *s,
                catch_up: None,
                joining: *j,
                rebuild: false,
            })
            .collect(),
        operator_override: None,
    }
}

/// The same in generation 4, no copy joining.
pub fn vol(copies: &[(&str, CopyState)]) -> Volume {
    let copies: Vec<_> = copies.iter().map(|&(n, s)| (n, s, false)).collect();
    volume(4, &copies)
}
