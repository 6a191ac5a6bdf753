//! Writes that apply once even when sent twice.
//!
//! A write a follower forwards to the leader can lose its answer (the leader stops, the
//! connection breaks, the time runs out) after the leader applied it, or before: the
//! follower cannot tell. So every write [`crate::Node::write`] makes carries an id, and
//! goes to Raft as one transaction that requires the id absent from table
//! [`WRITE_IDS`] and records it there: sending that transaction again changes nothing
//! if an earlier sending was applied, and fails its first requirement, which
//! [`settle`] turns into "done". The node can then send a write whose answer was lost
//! again, to whichever member leads by then, until one answer comes back.
//!
//! Nothing here is new to the replicated state machine: it is an ordinary transaction,
//! so members of an older release apply it the same way (a rolling upgrade keeps every
//! member's state identical). The ids are kept [`KEEP_MS`], then purged by the leader
//! (`tesserad`'s housekeeping).

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use crate::types::{Applied, Command, Require, Tables};

/// The table of the ids of recent writes: key the id, value `{"at_ms": <when sent>}`.
pub const WRITE_IDS: &str = "_write_ids";
/// How long an id is kept: far longer than a write is ever sent again (seconds).
pub const KEEP_MS: u64 = 10 * 60 * 1000;

/// A node's source of write ids: `<node>-<start>-<n>`, with `start` this process's start
/// time in nanoseconds (so a restarted node never repeats an id within [`KEEP_MS`]).
#[derive(Debug)]
pub struct Ids {
    prefix: String,
    next: AtomicU64,
}

impl Ids {
    /// The ids of node `node` in this process.
    pub fn new(node: u64) -> Ids {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ids {
            prefix: format!("{node}-{start:x}-"),
            next: AtomicU64::new(1),
        }
    }

    /// A new id.
    pub fn next(&self) -> String {
        format!(
            "{}{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// `cmd` as the transaction that applies it once under `id` (sent at `at_ms`).
pub fn wrap(id: &str, at_ms: u64, cmd: Command) -> Command {
    let (mut require, mut ops) = match cmd {
        Command::Txn { require, ops } => (require, ops),
        other => (Vec::new(), vec![other]),
    };
    // First: when an earlier sending was applied, the command's own requirements may
    // fail because of it (a create requires its record absent); the id must tell first.
    require.insert(
        0,
        Require {
            table: WRITE_IDS.into(),
            key: id.into(),
            exists: false,
            equals: None,
        },
    );
    ops.push(Command::Put {
        table: WRITE_IDS.into(),
        key: id.into(),
        value: json!({ "at_ms": at_ms }),
    });
    Command::Txn { require, ops }
}

/// The answer to a write wrapped under `id`: a conflict on the id itself means an earlier
/// sending was applied, which is the write done.
pub fn settle(id: &str, mut applied: Applied) -> Applied {
    if applied
        .conflict
        .as_ref()
        .is_some_and(|r| r.table == WRITE_IDS && r.key == id && !r.exists)
    {
        applied.conflict = None;
    }
    applied
}

/// Whether the id record `value` is older than [`KEEP_MS`] at `now_ms` (a record without
/// a time counts as old: nothing but [`wrap`] writes this table).
pub fn expired(value: &serde_json::Value, now_ms: u64) -> bool {
    value
        .get("at_ms")
        .and_then(serde_json::Value::as_u64)
        .is_none_or(|at| now_ms.saturating_sub(at) > KEEP_MS)
}

/// How many ids the state holds.
pub fn count(tables: &Tables) -> usize {
    tables.get(WRITE_IDS).map_or(0, |t| t.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::apply_for_test as apply;

    fn put(key: &str, v: i64) -> Command {
        Command::Put {
            table: "t".into(),
            key: key.into(),
            value: json!(v),
        }
    }

    fn create(key: &str, v: i64) -> Command {
        Command::Txn {
            require: vec![Require {
                table: "t".into(),
                key: key.into(),
                exists: false,
                equals: None,
            }],
            ops: vec![put(key, v)],
        }
    }

    #[test]
    fn a_write_sent_twice_applies_once_and_both_answers_say_done() {
        let mut t = Tables::new();
        let w = wrap("n1-a-1", 5, create("k", 1));
        let first = settle("n1-a-1", apply(&mut t, &w));
        assert_eq!(first.conflict, None);
        // Someone else changes the record in between; the second sending must not
        // overwrite it, and is answered as done (the first sending did it).
        apply(&mut t, &put("k", 7));
        let again = settle("n1-a-1", apply(&mut t, &w));
        assert_eq!(again.conflict, None);
        assert_eq!(t["t"]["k"], json!(7));
        assert_eq!(count(&t), 1);
    }

    #[test]
    fn a_plain_put_is_wrapped_and_a_new_id_is_a_new_write() {
        let mut t = Tables::new();
        let w = wrap("n1-a-1", 5, put("k", 1));
        assert_eq!(settle("n1-a-1", apply(&mut t, &w)).conflict, None);
        assert_eq!(t["t"]["k"], json!(1));
        assert_eq!(t[WRITE_IDS]["n1-a-1"], json!({ "at_ms": 5 }));
        let w2 = wrap("n1-a-2", 6, put("k", 2));
        assert_eq!(settle("n1-a-2", apply(&mut t, &w2)).conflict, None);
        assert_eq!(t["t"]["k"], json!(2));
        assert_eq!(count(&t), 2);
    }

    #[test]
    fn the_commands_own_conflict_is_still_told() {
        let mut t = Tables::new();
        apply(&mut t, &put("k", 1));
        let w = wrap("n2-b-1", 5, create("k", 2));
        let a = settle("n2-b-1", apply(&mut t, &w));
        let c = a.conflict.expect("the create's own requirement");
        assert_eq!((c.table.as_str(), c.key.as_str()), ("t", "k"));
        assert_eq!(t["t"]["k"], json!(1));
        assert_eq!(count(&t), 0, "a refused write records no id");
        // Another write's id conflicting is not this write's: not settled.
        let mut t = Tables::new();
        apply(&mut t, &wrap("x", 1, put("a", 1)));
        let other = Applied {
            conflict: Some(Require {
                table: WRITE_IDS.into(),
                key: "x".into(),
                exists: false,
                equals: None,
            }),
            ..Applied::default()
        };
        assert!(settle("y", other).conflict.is_some());
    }

    #[test]
    fn ids_expire_after_the_keep_time() {
        assert!(!expired(&json!({ "at_ms": 1_000 }), 1_000 + KEEP_MS));
        assert!(expired(&json!({ "at_ms": 1_000 }), 1_001 + KEEP_MS));
        assert!(expired(&json!("garbage"), 0));
        assert!(
            !expired(&json!({ "at_ms": 5_000 }), 1_000),
            "a clock behind"
        );
    }
}
