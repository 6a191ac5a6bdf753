//! The health of this node's block store: `tesserad` asks its `tessera-store` for its
//! `status` every few seconds (admin socket, short timeout), keeps the answer for the API
//! and the status socket, publishes it with the node's record, and records an event when
//! the store becomes degraded, unreachable or healthy again.
//!
//! What a poll means ([`judge`]) and which changes are news ([`news`]) are pure functions;
//! [`start`] is the loop around them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_api::{NodeStorage, StorageState};
use tessera_state::Command;
use tessera_store::admin_client::{AdminClient, AdminClientError};
use tessera_store_admin::{AdminOp, AdminReply};

use crate::tables::event;
use crate::{now_ms, SharedNode};

/// How often the store is asked.
const POLL: Duration = Duration::from_secs(5);
/// How long one answer may take before the store counts as unreachable. The status op
/// reads only memory and the catalog; a store this slow to say so is in trouble anyway.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The latest answer (none before the first poll ends), and a signal that it changed
/// state, so the node's record is republished at once rather than at the next round.
#[derive(Default)]
pub struct Health {
    latest: Mutex<Option<NodeStorage>>,
    /// Notified when the state (not just `checked_ms`) changes. One waiter (the loop
    /// publishing the node's record); a change while it is busy is kept for it.
    pub changed: tokio::sync::Notify,
}

impl Health {
    /// The latest answer, if a poll has ended.
    pub fn latest(&self) -> Option<NodeStorage> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, now: NodeStorage) {
        let before = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(now.clone());
        if before.is_none_or(|b| (b.state, b.reason) != (now.state, now.reason)) {
            self.changed.notify_one();
        }
    }
}

/// What one poll says about the store.
pub fn judge(answer: Result<AdminReply, AdminClientError>, checked_ms: u64) -> NodeStorage {
    let (state, reason) = match answer {
        Ok(AdminReply::Status(s)) => match s.degraded {
            None => (StorageState::Ok, None),
            Some(why) => (StorageState::Degraded, Some(why)),
        },
        Ok(other) => (
            StorageState::Unreachable,
            Some(format!("tessera-store answered status with {other:?}")),
        ),
        Err(e) => (StorageState::Unreachable, Some(e.to_string())),
    };
    NodeStorage {
        state,
        reason,
        checked_ms,
    }
}

/// The event (kind, message) a poll calls for, given the state last announced (`None`:
/// nothing yet since `tesserad` started). A healthy store at start, or one not reachable
/// yet, is not news; becoming degraded always is, even at start.
pub fn news(announced: Option<StorageState>, now: &NodeStorage) -> Option<(&'static str, String)> {
    let reason = now.reason.as_deref().unwrap_or("no reason given");
    match (announced, now.state) {
        (a, s) if a == Some(s) => None,
        (None, StorageState::Ok | StorageState::Unreachable) => None,
        (_, StorageState::Degraded) => Some((
            "storage.degraded",
            format!("storage degraded: {reason}; every flush fails until tessera-store restarts"),
        )),
        (_, StorageState::Unreachable) => Some((
            "storage.unreachable",
            format!("storage unreachable: {reason}"),
        )),
        (_, StorageState::Ok) => Some(("storage.ok", "storage healthy again".to_string())),
    }
}

/// Asks the store at `socket` for its status, in one connection, within [`TIMEOUT`].
fn ask(socket: &std::path::Path) -> Result<AdminReply, AdminClientError> {
    let mut c = AdminClient::connect(socket)?;
    c.set_timeout(Some(TIMEOUT))?;
    c.call(AdminOp::Status {})
}

/// Polls the store at `admin_socket` for node `me` until the process ends. Events go
/// through `node` once this node is a member; one that cannot be committed (no quorum)
/// is tried again at the next poll.
pub fn start(admin_socket: PathBuf, me: String, node: SharedNode, health: Arc<Health>) {
    tokio::spawn(async move {
        let mut announced: Option<StorageState> = None;
        loop {
            let socket = admin_socket.clone();
            let asked = tokio::task::spawn_blocking(move || ask(&socket));
            // The socket timeout bounds each read and write; this bounds the whole call
            // (a connect to a store whose accept queue is full waits indefinitely).
            let answer = match tokio::time::timeout(TIMEOUT * 2, asked).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => Err(AdminClientError::Protocol(format!("status poll: {e}"))),
                Err(_) => Err(AdminClientError::Protocol(format!(
                    "no answer within {} s",
                    (TIMEOUT * 2).as_secs()
                ))),
            };
            let now = judge(answer, now_ms());
            if health.latest().map(|s| s.state) != Some(now.state) {
                let reason = now.reason.as_deref().unwrap_or("");
                match now.state {
                    StorageState::Ok => tracing::info!("the store answers: storage ok"),
                    StorageState::Degraded => tracing::error!(%reason, "storage degraded"),
                    StorageState::Unreachable => tracing::warn!(%reason, "storage unreachable"),
                }
            }
            let state = now.state;
            let news = news(announced, &now);
            // Published before the event is tried: the API shows the state even while
            // the cluster cannot record anything.
            health.set(now);
            if let Some((kind, message)) = news {
                let member = node.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(n) = member {
                    let txn = Command::Txn {
                        require: vec![],
                        ops: vec![event(kind, &me, "tesserad", &message)],
                    };
                    match tokio::time::timeout(POLL, n.write(txn)).await {
                        Ok(Ok(_)) => announced = Some(state),
                        Ok(Err(e)) => tracing::debug!(error = %e, "storage event not recorded yet"),
                        Err(_) => tracing::debug!("storage event not recorded yet: timed out"),
                    }
                }
            } else if announced.is_none() && state == StorageState::Ok {
                announced = Some(StorageState::Ok);
            }
            tokio::time::sleep(POLL).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_store_admin::{AdminError, ErrorKind, StoreStatus};

    fn status(degraded: Option<&str>) -> AdminReply {
        AdminReply::Status(StoreStatus {
            degraded: degraded.map(String::from),
            data_dir: "/var/lib/tessera/store".into(),
            version: "0.1.0".into(),
            volumes: 3,
            snapshots: 1,
        })
    }

    fn at(state: StorageState) -> NodeStorage {
        NodeStorage {
            state,
            reason: Some("why".into()),
            checked_ms: 1,
        }
    }

    #[test]
    fn a_poll_maps_to_ok_degraded_or_unreachable_with_the_reason() {
        let ok = judge(Ok(status(None)), 42);
        assert_eq!(
            ok,
            NodeStorage {
                state: StorageState::Ok,
                reason: None,
                checked_ms: 42
            }
        );
        let degraded = judge(Ok(status(Some("syncing WAL segment 3: EIO"))), 43);
        assert_eq!(degraded.state, StorageState::Degraded);
        assert_eq!(
            degraded.reason.as_deref(),
            Some("syncing WAL segment 3: EIO")
        );

        let gone = judge(
            Err(AdminClientError::Io {
                path: "/run/store/admin.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
            44,
        );
        assert_eq!(gone.state, StorageState::Unreachable);
        assert!(gone.reason.unwrap().contains("/run/store/admin.sock"));
        // An older store that does not know `status` is no proof of health.
        let old = judge(
            Err(AdminClientError::Refused(AdminError {
                kind: ErrorKind::BadRequest,
                message: "unknown variant `status`".into(),
            })),
            45,
        );
        assert_eq!(old.state, StorageState::Unreachable);
        assert!(old.reason.unwrap().contains("unknown variant"));
        let odd = judge(Ok(AdminReply::Done), 46);
        assert_eq!(odd.state, StorageState::Unreachable);
    }

    #[test]
    fn the_api_spells_the_states_as_documented() {
        for (s, word) in [
            (StorageState::Ok, "ok"),
            (StorageState::Degraded, "degraded"),
            (StorageState::Unreachable, "unreachable"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), word);
        }
        let v = serde_json::to_value(judge(Ok(status(Some("x"))), 7)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"state": "degraded", "reason": "x", "checked_ms": 7})
        );
    }

    #[test]
    fn only_changes_of_state_are_news_and_degraded_always_is() {
        use StorageState::{Degraded, Ok, Unreachable};
        let kind = |a, s| news(a, &at(s)).map(|(k, _)| k);
        // At start: a healthy store, or one not started yet, is not news.
        assert_eq!(kind(None, Ok), None);
        assert_eq!(kind(None, Unreachable), None);
        assert_eq!(kind(None, Degraded), Some("storage.degraded"));
        // The same state again is not news.
        for s in [Ok, Degraded, Unreachable] {
            assert_eq!(kind(Some(s), s), None, "{s:?}");
        }
        assert_eq!(kind(Some(Ok), Degraded), Some("storage.degraded"));
        assert_eq!(kind(Some(Ok), Unreachable), Some("storage.unreachable"));
        // A restart clears a degraded store: it goes away, then comes back healthy.
        assert_eq!(
            kind(Some(Degraded), Unreachable),
            Some("storage.unreachable")
        );
        assert_eq!(kind(Some(Unreachable), Ok), Some("storage.ok"));
        assert_eq!(kind(Some(Degraded), Ok), Some("storage.ok"));
        let (_, message) = news(Some(Ok), &at(Degraded)).unwrap();
        assert!(
            message.contains("why") && message.contains("restarts"),
            "{message}"
        );
    }

    #[test]
    fn a_change_of_state_wakes_the_publisher_and_a_new_check_alone_does_not() {
        use futures_util::FutureExt;
        let h = Health::default();
        assert_eq!(h.latest(), None);
        h.set(at(StorageState::Ok));
        assert!(h.changed.notified().now_or_never().is_some());
        h.set(NodeStorage {
            checked_ms: 2,
            ..at(StorageState::Ok)
        });
        assert!(h.changed.notified().now_or_never().is_none());
        assert_eq!(h.latest().map(|s| s.checked_ms), Some(2));
        h.set(at(StorageState::Degraded));
        assert!(h.changed.notified().now_or_never().is_some());
    }
}
