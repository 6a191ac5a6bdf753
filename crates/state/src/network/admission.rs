//! Who may take up the node-to-node port and who may enroll or join: the cap on
//! connections without a cluster certificate, and the identity checks of enrollment and
//! join requests (a certificate speaks for one node id; an id removed through the API, or
//! one that is a running member, cannot get a second certificate without an operator).

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{cert_name, NodeId};
use crate::types::Tables;

/// At most this many connections without a client certificate (enrolling nodes) at once;
/// one more is closed as soon as its handshake shows it has none. Members, who present
/// their certificate, never count against it.
pub const MAX_ANONYMOUS_CONNECTIONS: usize = 32;

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
        return Some(format!(
            "node {} was removed from the cluster: wipe its data directory and start it again \
             to join as a new node",
            cert_name(id)
        ));
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
