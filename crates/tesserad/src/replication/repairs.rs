//! Events for blocks a volume's primary repaired from a replica (issue #8): a read on
//! the primary's store that hits a block failing its checksum takes the block from an
//! in-sync replica (the store's `repl/primary/repair.rs`) and lists it in
//! `replication_status`; each one listed becomes a `volume.repaired` event naming the
//! volume, the range and the node whose copy was good.
//!
//! The store keeps its last repairs in memory and lists them at every poll, so an event's
//! id is made from the repair itself: written again (after this daemon restarted) it
//! replaces itself instead of adding a second event.

use std::collections::{HashMap, HashSet};

use tessera_api::Event;
use tessera_state::{Command, Node};
use tessera_store_admin::{BlockRepaired, VolumeReplication};

use crate::records::table::EVENTS;

/// The repairs already made events, per volume (time, offset, node).
#[derive(Default)]
pub struct Recorded {
    by_volume: HashMap<String, HashSet<(u64, u64, String)>>,
}

/// Records a `volume.repaired` event for each repair in `report` (the primary's store's
/// status of `volume`) not recorded yet.
pub async fn record(node: &Node, report: &VolumeReplication, done: &mut Recorded) {
    let volume = report.volume.as_str();
    let seen = done.by_volume.entry(volume.to_string()).or_default();
    // Only what the store still lists can come again.
    seen.retain(|k| {
        report
            .repairs
            .iter()
            .any(|r| (r.time_ms, r.offset, r.from.clone()) == *k)
    });
    let new: Vec<&BlockRepaired> = report
        .repairs
        .iter()
        .filter(|r| !seen.contains(&(r.time_ms, r.offset, r.from.clone())))
        .collect();
    if new.is_empty() {
        return;
    }
    let ops = new.iter().map(|r| event(volume, r)).collect();
    let txn = Command::Txn {
        require: vec![],
        ops,
    };
    match node.write(txn).await {
        Ok(_) => {
            for r in new {
                seen.insert((r.time_ms, r.offset, r.from.clone()));
            }
        }
        Err(e) => tracing::debug!(volume, error = %e, "repair events not written; next round"),
    }
}

/// The event for repair `r` of `volume`, under an id made from the repair.
fn event(volume: &str, r: &BlockRepaired) -> Command {
    let id = format!(
        "{:016}-repaired-{volume}-{:x}-{}",
        r.time_ms, r.offset, r.from
    );
    crate::tables::put(
        EVENTS,
        &id.clone(),
        Event {
            id,
            time_ms: r.time_ms,
            kind: "volume.repaired".into(),
            target: volume.into(),
            user: "tesserad".into(),
            message: message(volume, r),
            source: None,
        },
    )
}

fn message(volume: &str, r: &BlockRepaired) -> String {
    format!(
        "{} bytes at offset {} of volume {volume} failed their checksum on the primary's copy \
         and were repaired from the copy on node {}; the read succeeded",
        r.len, r.offset, r.from
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_volume_offset_length_and_node() {
        let r = BlockRepaired {
            offset: 1 << 20,
            len: 12288,
            from: "node2".into(),
            time_ms: 1_700_000_000_000,
        };
        let m = message("disk0", &r);
        for part in ["disk0", "1048576", "12288", "node2"] {
            assert!(m.contains(part), "{m}");
        }
    }
}
