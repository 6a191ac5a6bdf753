//! What the leader drops from the cluster state so that it does not grow with every
//! login, change and task: events beyond the newest [`tessera_api::limits::MAX_EVENTS`],
//! expired sessions and API tokens (refused anyway), tasks finished over a week ago, the
//! ids of writes older than [`tessera_state::once::KEEP_MS`] (kept only so that a write
//! sent again is not applied twice).
//! Each is one [`purge`] of bounded size per sweep, so a backlog drains over a few sweeps
//! instead of stalling other writes.

use serde_json::Value;
use tessera_api::limits::MAX_EVENTS;
use tessera_state::once::{self, WRITE_IDS};
use tessera_state::{Command, Node};

use crate::now_ms;
use crate::records::table::{EVENTS, SESSIONS, TASKS, TOKENS};
use crate::records::Session;
use crate::tables::{del, purge, PURGE_BATCH};

/// How long finished tasks are kept.
const KEEP_FINISHED_MS: u64 = 7 * 24 * 3600 * 1000;

/// One round of housekeeping; the caller runs it on the leader only.
pub async fn sweep(n: &Node) {
    let events = n.state.read(|t| t.get(EVENTS).map_or(0, |e| e.len()));
    // Keys start with the time: the oldest come first.
    let excess = events.saturating_sub(MAX_EVENTS).min(PURGE_BATCH);
    purge(n, EVENTS, excess, |_, _| true, nothing_along).await;
    let now = now_ms();
    purge(
        n,
        SESSIONS,
        PURGE_BATCH,
        |_, v| session_expired(v, now),
        token_of_session,
    )
    .await;
    purge(
        n,
        TASKS,
        PURGE_BATCH,
        |_, v| finished_long_ago(v, now, KEEP_FINISHED_MS),
        nothing_along,
    )
    .await;
    purge(
        n,
        WRITE_IDS,
        PURGE_BATCH,
        |_, v| once::expired(v, now),
        nothing_along,
    )
    .await;
}

fn nothing_along(_: &str, _: &Value) -> Vec<Command> {
    Vec::new()
}

/// A session or token past its expiry. A record that is not a session is left alone: it
/// is nobody's credential, and deleting what we do not understand loses evidence.
fn session_expired(v: &Value, now_ms: u64) -> bool {
    serde_json::from_value::<Session>(v.clone()).is_ok_and(|s| s.expires_ms <= now_ms)
}

/// An API token's record goes with its session.
fn token_of_session(_: &str, v: &Value) -> Vec<Command> {
    match serde_json::from_value::<Session>(v.clone()) {
        Ok(s) if s.kind == "token" => vec![del(TOKENS, &s.id)],
        _ => Vec::new(),
    }
}

/// A task that finished more than `keep_ms` before `now_ms`.
fn finished_long_ago(v: &Value, now_ms: u64, keep_ms: u64) -> bool {
    v["finished_ms"]
        .as_u64()
        .is_some_and(|f| now_ms.saturating_sub(f) > keep_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{purge_ops, Table};
    use serde_json::json;
    use tessera_api::Role;

    fn with(table: &str, rows: Vec<(&str, Value)>) -> tessera_state::Tables {
        let mut t = Table::new();
        for (k, v) in rows {
            t.insert(k.to_string(), v);
        }
        let mut all = tessera_state::Tables::new();
        all.insert(table.to_string(), t);
        all
    }

    fn session(kind: &str, id: &str, expires_ms: u64) -> Value {
        json!(Session {
            user: "u".into(),
            role: Role::Auditor,
            expires_ms,
            kind: kind.into(),
            id: id.into(),
            credentials: String::new(),
        })
    }

    #[test]
    fn only_expired_sessions_and_their_tokens_are_dropped() {
        let tables = with(
            SESSIONS,
            vec![
                ("k1", session("session", "a", 100)),
                ("k2", session("token", "t2", 100)),
                ("k3", session("token", "t3", 10_000)),
                ("k4", json!("not a session")),
            ],
        );
        let expired = |limit, now| {
            purge_ops(
                &tables,
                SESSIONS,
                limit,
                |_, v| session_expired(v, now),
                token_of_session,
            )
        };
        assert_eq!(
            expired(100, 1_000),
            vec![del(SESSIONS, "k1"), del(SESSIONS, "k2"), del(TOKENS, "t2")]
        );
        assert_eq!(expired(1, 1_000), vec![del(SESSIONS, "k1")]);
        assert!(expired(100, 50).is_empty());
    }

    #[test]
    fn only_write_ids_past_their_keep_time_are_dropped() {
        let now = 10 * once::KEEP_MS;
        let tables = with(
            WRITE_IDS,
            vec![
                ("1-a-1", json!({ "at_ms": now - once::KEEP_MS - 1 })),
                ("1-a-2", json!({ "at_ms": now - 5_000 })),
                ("2-b-1", json!({ "at_ms": now - 2 * once::KEEP_MS })),
            ],
        );
        assert_eq!(
            purge_ops(
                &tables,
                WRITE_IDS,
                100,
                |_, v| once::expired(v, now),
                nothing_along
            ),
            vec![del(WRITE_IDS, "1-a-1"), del(WRITE_IDS, "2-b-1")]
        );
    }

    #[test]
    fn only_tasks_finished_long_ago_are_dropped() {
        let tables = with(
            TASKS,
            vec![
                ("old", json!({ "finished_ms": 1_000 })),
                ("recent", json!({ "finished_ms": 9_500 })),
                ("running", json!({ "finished_ms": null })),
            ],
        );
        let finished = |limit| {
            purge_ops(
                &tables,
                TASKS,
                limit,
                |_, v| finished_long_ago(v, 10_000, 1_000),
                nothing_along,
            )
        };
        assert_eq!(finished(100), vec![del(TASKS, "old")]);
        assert!(finished(0).is_empty());
    }
}
