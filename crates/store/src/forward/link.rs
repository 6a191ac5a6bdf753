//! A forwarded connection that outlives the other store's: when the QUIC connection to
//! the store a client is forwarded to breaks (that store restarted, died, or stopped
//! answering), the next request asks `tesserad` again where the copies are and connects
//! anew, to the primary's node or, when its store does not answer, to the next in-sync
//! copy's, where the first write makes that node the primary through the cluster. So
//! the client's own connection (NBD or QUIC) goes on: the requests that were in flight
//! on the broken connection are tried once more on the new one, and fail with `EIO`
//! only when that fails too.
//!
//! Fencing is kept across the break: a client whose writes went through node W is
//! fenced, as a client of W's own store would be, when at the reconnect the cluster's
//! primary is on another node while W's copy is still in sync (another client, or a
//! migration, moved it while the connection was down): its writes are refused
//! (`EPERM`, "connect again"), its reads are served. When W's copy left the in-sync set
//! (its store died: the cluster's failover moved the primary to an in-sync copy, which
//! holds every write acknowledged through W), the client goes on through the new
//! primary. A move by another writer in the moment between the failover and the
//! reconnect is not told apart from the failover.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tessera_nbd::proto::Errno;
use tessera_nbd::DeviceError;
use tessera_volume_client::{ClientError, Volume};

use super::{connect, Forwarder};
use crate::claim::{ClusterAsk, CopiesElsewhere};

/// One connection to another node's store, and which node that is.
pub(super) struct Remote {
    pub(super) volume: Arc<Volume>,
    pub(super) via: String,
}

/// The forwarded connection of one client: the current one, made again when it broke.
pub(super) struct Link {
    forwarder: Forwarder,
    cluster: ClusterAsk,
    export: String,
    volume: String,
    /// `None` once it broke, until the next request connects again.
    current: tokio::sync::Mutex<Option<Arc<Remote>>>,
    /// The largest size a store forwarded to gave: the NBD server's checks use it, and
    /// a volume only grows.
    size: AtomicU64,
    /// The node the client's last acknowledged write went through.
    wrote_via: Mutex<Option<String>>,
    /// Why this client's writes are refused, once it is fenced.
    fenced: Mutex<Option<String>>,
}

impl Link {
    pub(super) fn new(
        forwarder: Forwarder,
        cluster: ClusterAsk,
        export: &str,
        volume: &str,
        first: Remote,
    ) -> Link {
        Link {
            forwarder,
            cluster,
            export: export.to_string(),
            volume: volume.to_string(),
            size: AtomicU64::new(first.volume.size()),
            current: tokio::sync::Mutex::new(Some(Arc::new(first))),
            wrote_via: Mutex::new(None),
            fenced: Mutex::new(None),
        }
    }

    pub(super) fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// The node forwarded to now (the last one, while broken), for messages.
    pub(super) fn via(&self) -> String {
        match self.current.try_lock() {
            Ok(c) => c.as_ref().map_or_else(|| "?".into(), |r| r.via.clone()),
            Err(_) => "?".into(),
        }
    }

    /// Why a write of this client is refused, when it is fenced.
    pub(super) fn fenced(&self) -> Option<String> {
        self.fenced.lock().clone()
    }

    /// The connection to send a request on: the current one, or a new one when it broke.
    pub(super) async fn get(&self) -> Result<Arc<Remote>, DeviceError> {
        let mut current = self.current.lock().await;
        if let Some(r) = current.as_ref() {
            return Ok(r.clone());
        }
        let r = Arc::new(self.reconnect().await?);
        *current = Some(r.clone());
        Ok(r)
    }

    /// Notes that `r` failed with `e` (`None`: no answer in time): a broken or stalled
    /// connection is dropped, and the next request connects again; a refusal keeps it.
    pub(super) async fn failed(&self, r: &Arc<Remote>, e: Option<&ClientError>) {
        if matches!(e, Some(ClientError::Refused { .. })) {
            return;
        }
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, r)) {
            tracing::warn!(export = %self.export, node = %r.via,
                "the forwarded connection broke; the next request connects again");
            *current = None;
        }
    }

    /// Notes an acknowledged write through `r`.
    pub(super) fn wrote(&self, r: &Remote) {
        let mut w = self.wrote_via.lock();
        if w.as_deref() != Some(r.via.as_str()) {
            *w = Some(r.via.clone());
        }
    }

    async fn reconnect(&self) -> Result<Remote, DeviceError> {
        let (cluster, volume) = (self.cluster.clone(), self.volume.clone());
        let copies = tokio::task::spawn_blocking(move || cluster.copies_elsewhere(&volume))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| {
                self.cannot(format!(
                    "its forwarded connection broke, and tesserad did not say where the copies of volume {} are",
                    self.volume
                ))
            })?;
        let wrote_via = self.wrote_via.lock().clone();
        if let Some((w, p)) = fenced_by(wrote_via.as_deref(), &copies) {
            let why = format!(
                "volume {}: its primary moved to node {p} after this client wrote through node {w} (this node forwards it); this client's writes are refused (fenced); connect again to write",
                self.volume
            );
            tracing::warn!(export = %self.export, reason = %why, "a forwarded client is fenced");
            *self.fenced.lock() = Some(why);
        }
        let creds = tessera_volume_client::Credentials::from_dir(&self.forwarder.tls_dir)
            .map_err(|e| self.cannot(format!("forwarding again: {e}")))?;
        let (volume, via) = connect(&self.forwarder, &creds, &self.export, &copies.targets)
            .await
            .map_err(|tried| self.cannot(format!("connecting again failed: {tried}")))?;
        self.size.fetch_max(volume.size(), Ordering::Relaxed);
        tracing::info!(export = %self.export, node = %via,
            "the forwarded connection is made again");
        Ok(Remote {
            volume: Arc::new(volume),
            via,
        })
    }

    fn cannot(&self, why: String) -> DeviceError {
        let err = DeviceError::new(Errno::Io, format!("export {}: {why}", self.export));
        tracing::warn!(export = %self.export, reason = %err.message, "a forwarded request failed");
        err
    }
}

/// Whether a client whose last write went through node `wrote_via` is fenced at a
/// reconnect, given where the copies are now: `(W, primary)` when the primary moved away
/// from W while W's copy is still in sync (another writer or a migration took it). Moved
/// away from a copy that left the in-sync set, it is the cluster's failover of a failed
/// copy, whose every acknowledged write the new primary holds: not fenced. A `tesserad`
/// that does not say which copies are in sync counts W as in sync (fenced: the safe
/// side).
fn fenced_by<'a>(
    wrote_via: Option<&'a str>,
    copies: &'a CopiesElsewhere,
) -> Option<(&'a str, &'a str)> {
    let (w, p) = (wrote_via?, copies.primary.as_deref()?);
    let still_in_sync = copies
        .in_sync
        .as_ref()
        .is_none_or(|l| l.iter().any(|n| n == w));
    (w != p && still_in_sync).then_some((w, p))
}

/// Whether a forwarded request that failed with `e` on its connection (`None`: no answer
/// within [`super::REQUEST_WAIT`]) is sent once more on a new connection, `resent`
/// saying whether it was already. Only a request whose connection broke under it (the
/// other store died, restarted, or went silent), and once: its reply never came, so it
/// was not acknowledged, and sending it again is what the client would do (a store still
/// alive behind a cut loses the primary, with a generation bump, to the copy whose node
/// the resent write reaches instead). Never a refusal: it is the other store's answer.
/// Never a request that timed out: the other store is still answering on that
/// connection and may still be working on it (a write may land later), so the client
/// gets `EIO` and decides, as with any write whose outcome is unknown; the connection is
/// dropped and the next request connects anew.
pub(super) fn resend(e: Option<&ClientError>, resent: bool) -> bool {
    !resent && e.is_some_and(|e| !matches!(e, ClientError::Refused { .. }))
}

/// Refuses a write of a fenced client.
pub(super) fn refuse_fenced(link: &Link) -> Result<(), DeviceError> {
    match link.fenced() {
        Some(why) => Err(DeviceError::new(Errno::Perm, why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copies(primary: &str, in_sync: Option<&[&str]>) -> CopiesElsewhere {
        CopiesElsewhere {
            message: String::new(),
            targets: Vec::new(),
            primary: Some(primary.into()),
            in_sync: in_sync.map(|l| l.iter().map(|n| n.to_string()).collect()),
        }
    }

    #[test]
    fn only_a_request_whose_connection_broke_is_sent_again_and_once() {
        let broke = ClientError::Connection("connection lost".into());
        assert!(resend(Some(&broke), false));
        assert!(!resend(Some(&broke), true), "sent a third time");
        let odd = ClientError::Protocol("a reply of 9 bytes".into());
        assert!(resend(Some(&odd), false));
        // No answer within the bound: it may still land; EIO, not sent again.
        assert!(!resend(None, false));
        // The other store's answer is final.
        let refused = ClientError::Refused {
            code: tessera_volume_client::ErrorCode::NotPermitted,
            message: "fenced".into(),
        };
        assert!(!resend(Some(&refused), false));
    }

    #[test]
    fn a_reconnecting_client_is_fenced_only_by_a_move_away_from_a_copy_still_in_sync() {
        let all = Some(&["node1", "node2", "node3"][..]);
        // Never wrote, or the primary stayed: nothing to fence.
        assert_eq!(fenced_by(None, &copies("node2", all)), None);
        assert_eq!(fenced_by(Some("node1"), &copies("node1", all)), None);
        // Another writer took the primary while node1's copy stayed in sync: fenced.
        assert_eq!(
            fenced_by(Some("node1"), &copies("node2", all)),
            Some(("node1", "node2"))
        );
        // The cluster's failover: node1's copy left the in-sync set.
        let failed_over = Some(&["node2", "node3"][..]);
        assert_eq!(
            fenced_by(Some("node1"), &copies("node2", failed_over)),
            None
        );
        // A tesserad that does not name the in-sync copies: the safe side.
        assert_eq!(
            fenced_by(Some("node1"), &copies("node2", None)),
            Some(("node1", "node2"))
        );
    }
}
