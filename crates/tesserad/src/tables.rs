//! The cluster state's tables as `tesserad` reads and changes them, for the REST API and
//! the task runner alike (no HTTP here): typed reads of records, the put and delete
//! commands, event records, and purging a table in bounded batches.

use rand::RngCore;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tessera_api::Event;
use tessera_state::{Command, Node, Tables};

use crate::now_ms;
use crate::records::table::EVENTS;

/// One table of the cluster state.
pub type Table = imbl::OrdMap<String, Value>;

/// A stored record that does not decode: a bug or a damaged state, never "not found".
#[derive(Debug, thiserror::Error)]
#[error("stored record {table}/{key} is unreadable: {source}")]
pub struct Unreadable {
    /// Its table.
    pub table: String,
    /// Its key.
    pub key: String,
    /// Why it does not decode.
    #[source]
    pub source: serde_json::Error,
}

/// One record, typed; `None` if absent.
pub fn read<T: DeserializeOwned>(
    n: &Node,
    table: &str,
    key: &str,
) -> Result<Option<T>, Unreadable> {
    n.state
        .read(|t| t.get(table).and_then(|t| t.get(key)).cloned())
        .map(|v| {
            serde_json::from_value(v).map_err(|source| Unreadable {
                table: table.into(),
                key: key.into(),
                source,
            })
        })
        .transpose()
}

/// One record, typed, for work that goes on without it (the task runner): a record that
/// does not decode is logged and read as absent.
pub fn get<T: DeserializeOwned>(n: &Node, table: &str, key: &str) -> Option<T> {
    read(n, table, key).unwrap_or_else(|e| {
        tracing::error!(error = %e, "reading a record failed");
        None
    })
}

/// The command writing `value` as `table/key`.
pub fn put(table: &str, key: &str, value: impl serde::Serialize) -> Command {
    Command::Put {
        table: table.into(),
        key: key.into(),
        value: json!(value),
    }
}

/// The command deleting `table/key`.
pub fn del(table: &str, key: &str) -> Command {
    Command::Delete {
        table: table.into(),
        key: key.into(),
    }
}

/// A short random id (tasks, events, tokens).
pub fn random_id() -> String {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The command recording an event (to put in the same transaction as the change it
/// describes). Keys start with the time, so the table sorts oldest first.
pub fn event(kind: &str, target: &str, user: &str, message: &str) -> Command {
    event_about_nodes(kind, target, user, message, Vec::new())
}

/// [`event`], about the nodes with ids `nodes` (which its message names by name).
pub fn event_about_nodes(
    kind: &str,
    target: &str,
    user: &str,
    message: &str,
    nodes: Vec<String>,
) -> Command {
    let time_ms = now_ms();
    let id = format!("{time_ms:016}-{}", random_id());
    put(
        EVENTS,
        &id.clone(),
        Event {
            id,
            time_ms,
            kind: kind.into(),
            target: target.into(),
            user: user.into(),
            message: message.into(),
            // The address of the API request this is written for, if any.
            source: crate::api::audit::source(),
            nodes,
        },
    )
}

/// At most this many records go per purge: one huge transaction would stall every other
/// write behind it.
pub const PURGE_BATCH: usize = 500;

/// The deletions of the first `limit` records of `table`, in key order, that `doomed`
/// picks, each followed by the deletions `along` says go with it (e.g. the token of an
/// expired token session). The scan stops at the `limit`-th record picked.
pub fn purge_ops(
    tables: &Tables,
    table: &str,
    limit: usize,
    mut doomed: impl FnMut(&str, &Value) -> bool,
    along: impl Fn(&str, &Value) -> Vec<Command>,
) -> Vec<Command> {
    let Some(records) = tables.get(table) else {
        return Vec::new();
    };
    records
        .iter()
        .filter(|(k, v)| doomed(k, v))
        .take(limit)
        .flat_map(|(k, v)| std::iter::once(del(table, k)).chain(along(k, v)))
        .collect()
}

/// Deletes what [`purge_ops`] picks, in one transaction. Best effort: a purge that fails
/// (no quorum, lost leadership) is logged and tried again by the next one.
pub async fn purge(
    n: &Node,
    table: &str,
    limit: usize,
    doomed: impl FnMut(&str, &Value) -> bool,
    along: impl Fn(&str, &Value) -> Vec<Command>,
) {
    let ops = n.state.read(|t| purge_ops(t, table, limit, doomed, along));
    if ops.is_empty() {
        return;
    }
    let count = ops.len();
    if let Err(e) = n
        .write(Command::Txn {
            require: vec![],
            ops,
        })
        .await
    {
        tracing::debug!(error = %e, table, count, "purge failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(rows: &[(&str, Value)]) -> Tables {
        let mut t = Table::new();
        for (k, v) in rows {
            t.insert(k.to_string(), v.clone());
        }
        let mut all = Tables::new();
        all.insert("t".to_string(), t);
        all
    }

    #[test]
    fn a_purge_takes_the_picked_records_in_key_order_up_to_its_limit() {
        let t = tables(&[
            ("a", json!(1)),
            ("b", json!(2)),
            ("c", json!(3)),
            ("d", json!(4)),
        ]);
        let odd = |_: &str, v: &Value| v.as_u64().is_some_and(|n| n % 2 == 1);
        let none = |_: &str, _: &Value| Vec::new();
        assert_eq!(
            purge_ops(&t, "t", 10, odd, none),
            vec![del("t", "a"), del("t", "c")]
        );
        assert_eq!(purge_ops(&t, "t", 1, odd, none), vec![del("t", "a")]);
        assert!(purge_ops(&t, "t", 0, odd, none).is_empty());
        assert!(purge_ops(&t, "missing", 10, odd, none).is_empty());
    }

    #[test]
    fn a_purge_stops_looking_once_it_has_enough() {
        let t = tables(&[("a", json!(1)), ("b", json!(2)), ("c", json!(3))]);
        let mut seen = 0;
        let ops = purge_ops(
            &t,
            "t",
            1,
            |_, _| {
                seen += 1;
                true
            },
            |_, _| Vec::new(),
        );
        assert_eq!(ops, vec![del("t", "a")]);
        assert_eq!(
            seen, 1,
            "the oldest-first trim must not scan the whole table"
        );
    }

    #[test]
    fn what_goes_along_follows_its_record() {
        let t = tables(&[("a", json!("x")), ("b", json!("y"))]);
        let ops = purge_ops(
            &t,
            "t",
            10,
            |_, _| true,
            |_, v| vec![del("other", v.as_str().unwrap_or_default())],
        );
        assert_eq!(
            ops,
            vec![
                del("t", "a"),
                del("other", "x"),
                del("t", "b"),
                del("other", "y")
            ]
        );
    }

    #[test]
    fn events_sort_by_time() {
        let (a, b) = (event("k", "t", "u", "m"), event("k", "t", "u", "m"));
        let key = |c: &Command| match c {
            Command::Put { table, key, .. } if table == EVENTS => key.clone(),
            other => panic!("not an event put: {other:?}"),
        };
        assert_ne!(key(&a), key(&b));
        assert!(key(&a)[..16] <= key(&b)[..16]);
        assert_eq!(random_id().len(), 16);
    }
}
