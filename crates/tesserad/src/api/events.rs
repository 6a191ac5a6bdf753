//! Events: what happened in the cluster, who did it, when. Each one is written in the
//! same transaction as the change it describes, in the `events` table keyed by time, so
//! keys sort in order. The leader trims the table to the newest [`KEEP`].

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tessera_state::Command;
use utoipa::{IntoParams, ToSchema};

use super::auth::{authorize, random_id, Role};
use super::{now_ms, put, synced, ApiError, ErrorBody, St};

/// How many events the cluster keeps.
pub const KEEP: usize = 10_000;
/// At most this many are deleted per trim.
const TRIM_STEP: usize = 500;

/// Something that happened.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Sortable id: time, then a random part.
    pub id: String,
    /// When (ms since the epoch).
    pub time_ms: u64,
    /// What kind, e.g. `volume.create`, `vm.update`, `task.failed`.
    pub kind: String,
    /// What it is about (a volume, VM, user... name).
    pub target: String,
    /// Who did it (a user, or `tesserad` for the system).
    pub user: String,
    /// In words.
    pub message: String,
}

/// The command recording an event (to put in the same transaction as the change).
pub fn event(kind: &str, target: &str, user: &str, message: &str) -> Command {
    let time_ms = now_ms();
    let id = format!("{time_ms:016}-{}", random_id());
    put(
        "events",
        &id.clone(),
        Event {
            id,
            time_ms,
            kind: kind.into(),
            target: target.into(),
            user: user.into(),
            message: message.into(),
        },
    )
}

/// Which events.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only events after this id.
    since: Option<String>,
    /// At most this many, the newest (default 100, at most 10000).
    limit: Option<usize>,
}

/// Events after `since` (all without it), oldest first: a range of the ordered table, so
/// a stream woken by every change reads only what is new.
fn after(n: &tessera_state::Node, since: Option<&str>) -> Vec<Event> {
    use std::ops::Bound;
    let from = match since {
        Some(s) => Bound::Excluded(s.to_string()),
        None => Bound::Unbounded,
    };
    n.state.read(|t| {
        t.get("events")
            .map(|ev| {
                ev.range((from, Bound::Unbounded))
                    .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The latest events, oldest first.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Event]), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(st): St,
    headers: HeaderMap,
    q: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    authorize(&st, &headers, Role::Auditor, false).await?;
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=KEEP).contains(&limit) {
        return Err(ApiError::bad("limit: must be 1 to 10000"));
    }
    let n = synced(&st).await?;
    let mut ev = after(&n, q.since.as_deref());
    let skip = ev.len().saturating_sub(limit);
    ev.drain(..skip);
    Ok(Json(ev))
}

/// A live stream of events (Server-Sent Events, one `event` per cluster event, its data
/// the event as JSON), starting after `since` or now.
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events", params(EventQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "text/event-stream of Event"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn stream(
    State(st): St,
    headers: HeaderMap,
    q: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    authorize(&st, &headers, Role::Auditor, false).await?;
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let n = synced(&st).await?;
    let start = q.since.unwrap_or_else(|| {
        n.state
            .read(|t| t.get("events").and_then(|e| e.keys().next_back().cloned()))
            .unwrap_or_default()
    });
    let rx = n.state.subscribe();
    let s = futures_util::stream::unfold(
        (n, rx, start, std::collections::VecDeque::<Event>::new()),
        |(n, mut rx, mut last, mut queue)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    let ev = SseEvent::default()
                        .event("event")
                        .id(e.id.clone())
                        .json_data(&e)
                        .unwrap_or_else(|_| SseEvent::default().comment("unencodable"));
                    return Some((Ok(ev), (n, rx, last, queue)));
                }
                let new = after(&n, Some(&last));
                if let Some(e) = new.last() {
                    last = e.id.clone();
                    queue.extend(new);
                    continue;
                }
                // Wait for the state to change (the stream ends with the node).
                rx.changed().await.ok()?;
            }
        },
    );
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The leader keeps the events table at [`KEEP`] entries.
pub async fn trim(n: &tessera_state::Node) {
    // The oldest keys beyond KEEP, in bounded steps: one huge transaction would stall
    // every other write behind it.
    let ops: Vec<Command> = n.state.read(|t| {
        t.get("events")
            .map(|e| {
                let excess = e.len().saturating_sub(KEEP).min(TRIM_STEP);
                e.keys()
                    .take(excess)
                    .map(|k| super::del("events", k))
                    .collect()
            })
            .unwrap_or_default()
    });
    if ops.is_empty() {
        return;
    }
    if let Err(e) = n
        .write(Command::Txn {
            require: vec![],
            ops,
        })
        .await
    {
        tracing::debug!(error = %e, "trimming events failed");
    }
}
