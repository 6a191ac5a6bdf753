//! Who may take up the node-to-node port and who may enroll or join: the cap on TLS
//! handshakes in progress and their deadline, the cap on connections without a cluster
//! certificate, the identity checks of enrollment and join requests (a certificate speaks
//! for one node id; an id removed through the API, or one that is a running member,
//! cannot get a second certificate without an operator), and the answer a removed node
//! gets so it learns that it was removed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use super::{cert_name, NodeId};
use crate::types::Tables;

/// At most this many connections without a client certificate (enrolling nodes) at once;
/// one more is closed as soon as its handshake shows it has none. Members, who present
/// their certificate, never count against it.
pub const MAX_ANONYMOUS_CONNECTIONS: usize = 32;

/// At most this many TLS handshakes in progress at once; one more evicts the oldest
/// (closes it), so a flood of half-open handshakes cannot keep members out: a member's
/// handshake takes milliseconds, and is evicted only if this many new connections arrive
/// meanwhile.
pub const MAX_HANDSHAKES: usize = 64;

/// A TLS handshake not finished within this is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every refusal telling a node it was removed contains these words (the removed node
/// recognises its own removal by them, e.g. in an enrollment or join refusal).
pub const REMOVED_WORDS: &str = "was removed from the cluster";

/// The table where `DELETE /nodes/{id}` records removed nodes by Raft id (in hex, as
/// [`cert_name`] writes it): such an id may not enroll or join again.
pub const REMOVED_NODES: &str = "removed_nodes";

/// The slots for anonymous connections (see [`MAX_ANONYMOUS_CONNECTIONS`]).
#[derive(Clone)]
pub(crate) struct AnonymousSlots(Arc<Semaphore>);

impl Default for AnonymousSlots {
    fn default() -> Self {
        AnonymousSlots(Arc::new(Semaphore::new(MAX_ANONYMOUS_CONNECTIONS)))
    }
}

impl AnonymousSlots {
    /// A slot, held as long as the connection lives; `None` when all are taken.
    pub(crate) fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// The handshakes in progress on one listener (see [`MAX_HANDSHAKES`]).
#[derive(Default)]
pub(crate) struct Handshakes(Mutex<VecDeque<AbortHandle>>);

impl Handshakes {
    /// Counts the handshake task `h` in, closing the oldest ones beyond the cap.
    pub(crate) fn admit(&self, h: AbortHandle) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.retain(|t| !t.is_finished());
        while q.len() >= MAX_HANDSHAKES {
            if let Some(oldest) = q.pop_front() {
                oldest.abort();
            }
        }
        q.push_back(h);
    }
}

/// What node `id` is told when it was removed.
pub fn removed_message(id: NodeId) -> String {
    format!(
        "node {} {REMOVED_WORDS}: wipe its data directory and start it again to join as a \
         new node",
        cert_name(id)
    )
}

/// Why the caller holding `cert` is refused, if it is a node removed through the API.
pub(crate) fn removed_caller(t: &Tables, cert: &CertificateDer<'_>) -> Option<String> {
    t.get(REMOVED_NODES)?
        .keys()
        .filter_map(|k| NodeId::from_str_radix(k, 16).ok())
        .find(|id| cert_is_for(cert, *id))
        .map(removed_message)
}

/// Whether `cert` was issued to node `id` (its name is that id's).
pub(crate) fn cert_is_for(cert: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    tessera_pki::node_dns_name(&cert_name(id))
        .ok()
        .and_then(|n| ServerName::try_from(n).ok())
        .is_some_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
}

/// Why node `id` may not have a (new) certificate or join, if so: it was removed through
/// the API, or it is a member that registered (ran with a certificate) already.
pub(crate) fn refused_identity(t: &Tables, id: NodeId, is_member: bool) -> Option<String> {
    if t.get(REMOVED_NODES)
        .is_some_and(|r| r.contains_key(&cert_name(id)))
    {
        return Some(removed_message(id));
    }
    let registered = t
        .get("nodes")
        .is_some_and(|n| n.values().any(|rec| rec["raft_id"].as_u64() == Some(id)));
    (is_member && registered).then(|| {
        format!(
            "node {} is a running member of the cluster and has its certificate: a second one \
             needs an operator (remove the node through the API, wipe it, and start it again)",
            cert_name(id)
        )
    })
}
