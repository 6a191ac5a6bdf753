//! Holding a node's room from the moment a placement counts it until the placement
//! commits. Every placement on a node raises that node's counter
//! (`placements/<node id>`, `{"seq": N}`) in the placement's own transaction, and
//! requires the counter to be what it was *before* the rooms were read. Two starts
//! racing for the same node's last room both read the same counter: the first to commit
//! raises it, so the second's compare-and-swap fails and it is placed again with the
//! first VM counted, instead of both landing there.
//!
//! A stop frees room without touching the counter: a placement that counted a VM that
//! has since stopped only under-uses the node.

use serde_json::json;
use tessera_state::{Command, Node, Require};

use crate::records::table::PLACEMENTS;
use crate::tables::put;

/// Every node's placement counter. Read it *before* the rooms, so that any placement
/// after the rooms were read changes a counter a [`Reservation`] requires.
#[derive(Clone, Debug, Default)]
pub struct Counters(Vec<(String, u64)>);

impl Counters {
    /// The counters in the local copy of the cluster state.
    pub fn read(n: &Node) -> Counters {
        Counters(n.state.read(|t| {
            t.get(PLACEMENTS)
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| (k.clone(), v["seq"].as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    /// The reservation of `node`'s room as these counters saw it.
    pub fn reserve(&self, node: &str) -> Reservation {
        let old = self.0.iter().find(|(k, _)| k == node).map(|(_, s)| *s);
        Reservation {
            require: match old {
                Some(seq) => Require::equals(PLACEMENTS, node, json!({ "seq": seq })),
                None => Require::absent(PLACEMENTS, node),
            },
            op: put(PLACEMENTS, node, json!({ "seq": old.unwrap_or(0) + 1 })),
        }
    }
}

/// A node's room as a placement counted it, to be committed with the placement.
#[must_use = "the reservation must be committed with the placement"]
#[derive(Clone, Debug)]
pub struct Reservation {
    /// The counter unchanged since it was read.
    pub require: Require,
    /// The counter raised.
    pub op: Command,
}

impl Reservation {
    /// Adds the reservation to a transaction.
    pub fn into_txn(self, require: &mut Vec<Require>, ops: &mut Vec<Command>) {
        require.push(self.require);
        ops.push(self.op);
    }
}

/// Whether a failed requirement is a placement that lost a race for a node's room.
pub fn raced(r: &Require) -> bool {
    r.table == PLACEMENTS
}

/// The refusal of a placement that lost the race for `r`'s node.
pub fn raced_message(r: &Require) -> String {
    format!(
        "node {}'s room changed meanwhile (another VM was placed there); try again",
        r.key
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_requires_the_counter_it_saw_and_raises_it() {
        let none = Counters::default().reserve("n1");
        assert_eq!(none.require, Require::absent(PLACEMENTS, "n1"));
        let c = Counters(vec![("n1".into(), 7), ("n2".into(), 2)]);
        let r = c.reserve("n1");
        assert_eq!(
            r.require,
            Require::equals(PLACEMENTS, "n1", json!({"seq": 7}))
        );
        assert_eq!(
            serde_json::to_value(&r.op).unwrap(),
            serde_json::to_value(put(PLACEMENTS, "n1", json!({"seq": 8}))).unwrap()
        );
        assert!(raced(&r.require));
        assert!(raced_message(&r.require).contains("node n1's room changed meanwhile"));
    }
}
