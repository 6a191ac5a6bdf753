//! Events: what happened in the cluster, who did it, when. Each one is written in the
//! same transaction as the change it describes, in the `events` table keyed by time, so
//! keys sort in order (`crate::tables::event` makes them). The leader trims the table to
//! the newest [`KEEP`] (`crate::housekeeping`).

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;

pub use tessera_api::{Event, EventQuery};
use tessera_api::{StreamQuery, StreamedEvent};

pub(crate) use crate::tables::event;

use super::extract::{Auditor, Auth, Synced, Q};
use super::{ApiError, ErrorBody};
use crate::records::table::EVENTS;

/// How many events the cluster keeps.
pub const KEEP: usize = tessera_api::limits::MAX_EVENTS;

/// Events after `since` (all without it), oldest first: a range of the ordered table, so
/// a stream woken by every change reads only what is new.
fn after(n: &tessera_state::Node, since: Option<&str>) -> Result<Vec<Event>, ApiError> {
    use std::ops::Bound;
    let from = match since {
        Some(s) => Bound::Excluded(s.to_string()),
        None => Bound::Unbounded,
    };
    n.state.read(|t| {
        t.get(EVENTS)
            .map(|ev| {
                ev.range((from, Bound::Unbounded))
                    .map(|(k, v)| {
                        serde_json::from_value(v.clone())
                            .map_err(|e| super::unreadable(EVENTS, k, e))
                    })
                    .collect()
            })
            .unwrap_or(Ok(Vec::new()))
    })
}

/// The latest events, oldest first.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", operation_id = "list_events",
    params(EventQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Event]), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn list(
    _: Auth<Auditor>,
    Q(q): Q<EventQuery>,
    n: Synced,
) -> Result<Json<Vec<Event>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=KEEP).contains(&limit) {
        return Err(ApiError::bad("limit: must be 1 to 10000"));
    }
    let mut ev = after(&n, q.since.as_deref())?;
    if let Some(u) = &q.user {
        // Who did it, or (logins and their refusals, changes to the user's account and
        // authenticator, what a directory sync did to it) who it was about.
        let about = |k: &str| {
            k.starts_with("login")
                || k.starts_with("user.")
                || k.starts_with("totp.")
                || k == "realm.sync"
        };
        ev.retain(|e| e.user == *u || (about(&e.kind) && e.target == *u));
    }
    let skip = ev.len().saturating_sub(limit);
    ev.drain(..skip);
    Ok(Json(ev))
}

/// A live stream of events (Server-Sent Events, one `event` per cluster event, its data
/// the event as JSON), starting after `since` or now.
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events",
    operation_id = "stream_events", params(StreamQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, description = "Server-Sent Events, each one's data an Event",
            content_type = "text/event-stream", body = StreamedEvent),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn stream(
    _: Auth<Auditor>,
    Q(q): Q<StreamQuery>,
    Synced(n): Synced,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let start = q.since.unwrap_or_else(|| {
        n.state
            .read(|t| t.get(EVENTS).and_then(|e| e.keys().next_back().cloned()))
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
                let new = match after(&n, Some(&last)) {
                    Ok(new) => new,
                    Err(e) => {
                        // The stream cannot skip a record it cannot read: end it.
                        tracing::error!(error = %e.1, "event stream ended");
                        return None;
                    }
                };
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
