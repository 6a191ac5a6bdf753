//! Events for blocks a volume's primary repaired (issue #8): a read on the primary's
//! store that hits a block failing its checksum takes the block from an in-sync replica
//! (the store's `repl/primary/repair.rs`), and a replica's copy found bad is given the
//! primary's bytes; the primary lists each repair in `replication_status`, and each one
//! listed becomes a `volume.repaired` event naming the volume (and snapshot), the range,
//! the node whose copy was good (for a replica's, the primary's node, the source of the
//! bytes) and, for a replica's, the node whose copy was repaired: by name in its
//! message (the store reports them by certificate name), by id in its `nodes`
//! (`super::naming`), the repaired copy's node first for a replica's.
//!
//! The store keeps its last repairs in memory and lists them at every poll, so an event's
//! id is made from the repair itself: written again (after this daemon restarted) it
//! replaces itself instead of adding a second event.

use std::collections::{HashMap, HashSet};

use tessera_api::Event;
use tessera_state::{Command, Node};
use tessera_store_admin::{BlockRepaired, VolumeReplication};

use super::naming::NodeNames;
use crate::records::table::EVENTS;

/// The repairs already made events, per volume (time, offset, node).
#[derive(Default)]
pub struct Recorded {
    by_volume: HashMap<String, HashSet<(u64, u64, String)>>,
}

/// Records a `volume.repaired` event for each repair in `report` (the status of `volume`
/// from the store of `primary`, the node id of its primary) not recorded yet.
pub async fn record(node: &Node, primary: &str, report: &VolumeReplication, done: &mut Recorded) {
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
    let names = NodeNames::of(&super::node_records(node));
    let ops = new
        .iter()
        .map(|r| event(volume, primary, r, &names))
        .collect();
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

/// The event for repair `r` of `volume` whose primary is node `primary`, under an id made
/// from the repair.
fn event(volume: &str, primary: &str, r: &BlockRepaired, names: &NodeNames) -> Command {
    let mut id = format!(
        "{:016}-repaired-{volume}-{:x}-{}",
        r.time_ms, r.offset, r.from
    );
    if let Some(s) = &r.snapshot {
        id.push_str(&format!("-at-{s}"));
    }
    if let Some(on) = &r.on {
        id.push_str(&format!("-on-{on}"));
    }
    let (message, nodes) = names.render(&message(volume, primary, r));
    crate::tables::put(
        EVENTS,
        &id.clone(),
        Event {
            id,
            time_ms: r.time_ms,
            kind: "volume.repaired".into(),
            target: volume.into(),
            user: "tesserad".into(),
            message,
            source: None,
            nodes,
        },
    )
}

/// What repair `r` of `volume` (primary: node `primary`) did, naming both nodes as the
/// primary's repair does: the copy that was bad and the one the bytes came from.
fn message(volume: &str, primary: &str, r: &BlockRepaired) -> String {
    let what = match &r.snapshot {
        Some(s) => format!("snapshot {s} of volume {volume}"),
        None => format!("volume {volume}"),
    };
    match &r.on {
        None => format!(
            "{} bytes at offset {} of {what} failed their checksum on the primary's copy \
             and were repaired from the copy on node {}; the read succeeded",
            r.len, r.offset, r.from
        ),
        Some(on) => format!(
            "{} bytes at offset {} of {what} failed their checksum on the copy on node {on} \
             and were repaired from the primary's copy on node {primary}",
            r.len, r.offset
        ),
    }
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
            on: None,
            snapshot: None,
        };
        let m = message("disk0", "n1", &r);
        for part in ["disk0", "1048576", "12288", "node2", "primary's copy and"] {
            assert!(m.contains(part), "{m}");
        }
        // A replica's copy repaired, of a snapshot: named, and its own event id.
        let on = BlockRepaired {
            on: Some("node3".into()),
            snapshot: Some("nightly".into()),
            from: "primary".into(),
            ..r.clone()
        };
        let m = message("disk0", "n1", &on);
        for part in [
            "snapshot nightly of volume disk0",
            "on node node3",
            "from the primary's copy on node n1",
        ] {
            assert!(m.contains(part), "{m}");
        }
        let names = NodeNames::of(&std::collections::HashMap::new());
        let ids = |r: &BlockRepaired| format!("{:?}", event("disk0", "n1", r, &names));
        assert_ne!(ids(&r), ids(&on));
    }

    /// A replica's copy repaired: the event names the repaired copy's node (reported by
    /// its certificate name) and the primary's (the source), by name in the message and
    /// by id in `nodes`, the repaired one first, as the message names them.
    #[test]
    fn a_replicas_repair_names_the_repaired_node_and_the_primarys() {
        let (primary, replica) = ("1111111111111111aa", "2222222222222222bb");
        let records = std::collections::HashMap::from([
            (
                primary.to_string(),
                serde_json::json!({"name": "node1", "raft_id": 0x1111_1111_1111_1111_u64}),
            ),
            (
                replica.to_string(),
                serde_json::json!({"name": "node2", "raft_id": 0x2222_2222_2222_2222_u64}),
            ),
        ]);
        let names = NodeNames::of(&records);
        let r = BlockRepaired {
            offset: 4096,
            len: 4096,
            from: "primary".into(),
            time_ms: 1,
            on: Some("2222222222222222".into()),
            snapshot: None,
        };
        let Command::Put { value, .. } = event("rv", primary, &r, &names) else {
            panic!("not a put");
        };
        let msg = value["message"].as_str().unwrap();
        assert!(
            msg.contains("on the copy on node node2")
                && msg.contains("from the primary's copy on node node1"),
            "{msg}"
        );
        assert_eq!(value["nodes"], serde_json::json!([replica, primary]));
    }
}
