//! The audit trail of API requests. Every request runs with its context (where it came
//! from, and who it is once its credentials are checked): events written while handling
//! it carry the source address in their own field (`crate::tables::event` reads it), and
//! a change that is refused (401, 403 or 409 on a POST, PUT, PATCH or DELETE) becomes an
//! event of its own, `request.refused`: who, from where, what was asked and the answer.
//! Logins are left out here: they write their own `login`/`login.failed` events.
//!
//! Refusals cost a write through the cluster state each, so an address gets at most
//! [`PER_MINUTE`] of them recorded a minute; the rest are counted in the log only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::extract::PeerAddr;
use super::{commit, ApiState};

/// What is known about the request being handled.
struct Context {
    source: Option<IpAddr>,
    caller: Mutex<Option<String>>,
}

tokio::task_local! {
    static REQUEST: Arc<Context>;
}

/// Refused changes recorded per address and minute.
pub const PER_MINUTE: u32 = 60;
/// Longest error text and path kept in an event.
const MAX_TEXT: usize = 300;

/// The address the request being handled came from (`None` outside a request: what
/// the cluster does by itself).
pub(crate) fn source() -> Option<String> {
    REQUEST
        .try_with(|c| c.source.map(|a| a.to_string()))
        .ok()
        .flatten()
}

/// Records who the request being handled is from (its credentials are valid).
pub(super) fn caller(user: &str) {
    let _ = REQUEST.try_with(|c| {
        *c.caller.lock().unwrap_or_else(|p| p.into_inner()) = Some(user.to_string());
    });
}

fn is_change(m: &Method) -> bool {
    matches!(
        *m,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

fn is_refusal(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::CONFLICT
    )
}

/// Per address: when its minute started, and how many refusals it had in it.
type Windows = HashMap<Option<IpAddr>, (Instant, u32)>;

/// Whether another refusal from `source` may be recorded now (a fixed one-minute window
/// per address).
fn admitted(source: Option<IpAddr>, now: Instant) -> bool {
    static SEEN: OnceLock<Mutex<Windows>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let window = Duration::from_secs(60);
    if seen.len() > 10_000 {
        seen.retain(|_, (start, _)| now.duration_since(*start) < window);
    }
    let e = seen.entry(source).or_insert((now, 0));
    if now.duration_since(e.0) >= window {
        *e = (now, 0);
    }
    e.1 += 1;
    e.1 <= PER_MINUTE
}

fn bounded(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

/// The middleware: runs the request in its context, and records a refused change.
pub(super) async fn record(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let source = req
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .map(|c| c.0 .0.ip());
    let ctx = Arc::new(Context {
        source,
        caller: Mutex::new(None),
    });
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    REQUEST
        .scope(ctx.clone(), async move {
            let res = next.run(req).await;
            let status = res.status();
            if !is_change(&method) || !is_refusal(status) || path == "/api/v1/login" {
                return res;
            }
            let (parts, body) = res.into_parts();
            // Error answers are small JSON; a larger body is passed on unread.
            let small = axum::body::HttpBody::size_hint(&body)
                .upper()
                .is_some_and(|u| u <= 16 * 1024);
            let (body, error) = if small {
                let bytes = axum::body::to_bytes(body, 16 * 1024)
                    .await
                    .unwrap_or_default();
                let error = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or_default();
                (axum::body::Body::from(bytes), error)
            } else {
                (body, String::new())
            };
            let who = ctx
                .caller
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if admitted(source, Instant::now()) {
                let what = format!(
                    "{method} {} refused: {}{}{}",
                    bounded(&path),
                    status.as_u16(),
                    if error.is_empty() { "" } else { " " },
                    bounded(&error)
                );
                let ev = super::events::event(
                    "request.refused",
                    &bounded(&path),
                    who.as_deref().unwrap_or("unauthenticated"),
                    &what,
                );
                // Written after the answer leaves: a refusal is not delayed (or stuck
                // when the cluster cannot write) for its record.
                tokio::spawn(async move {
                    if let Err(e) = commit(&st, vec![], vec![ev], |_| String::new()).await {
                        tracing::warn!(error = %e.1, "a refused request's event was not written");
                    }
                });
            } else {
                tracing::warn!(?source, %method, %path, %status, user = ?who, "refused request not recorded as an event: over {PER_MINUTE} a minute from this address");
            }
            Response::from_parts(parts, body)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_a_bounded_number_of_refusals_recorded_a_minute() {
        let a = Some(IpAddr::from([192, 0, 2, 7]));
        let b = Some(IpAddr::from([192, 0, 2, 8]));
        let t = Instant::now();
        for _ in 0..PER_MINUTE {
            assert!(admitted(a, t));
        }
        assert!(!admitted(a, t + Duration::from_secs(59)));
        assert!(admitted(b, t), "another address has its own count");
        assert!(admitted(a, t + Duration::from_secs(61)), "a new minute");
    }

    #[tokio::test]
    async fn events_made_while_handling_a_request_carry_its_source() {
        assert_eq!(source(), None);
        let ctx = Arc::new(Context {
            source: Some(IpAddr::from([10, 0, 0, 9])),
            caller: Mutex::new(None),
        });
        let got = REQUEST
            .scope(ctx.clone(), async {
                caller("alice@corp");
                source()
            })
            .await;
        assert_eq!(got.as_deref(), Some("10.0.0.9"));
        assert_eq!(ctx.caller.lock().unwrap().as_deref(), Some("alice@corp"));
    }
}
