//! The API and console's own certificate (`/api/v1/certificate`): one uploaded by an
//! administrator, served by every node for the names it covers, instead of the cluster
//! CA's node certificates that browsers do not trust.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A certificate to install: PEM chain (the leaf first, then each issuer) and the leaf's
/// private key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewCertificate {
    /// PEM certificates: the leaf first, then each issuer in order (the root may be left
    /// out); at most 8.
    #[schema(min_length = 1, max_length = 131072)]
    pub cert_pem: String,
    /// The leaf's private key, PEM (PKCS#8, PKCS#1 or SEC1). Kept sealed in the cluster
    /// state, never shown again.
    #[schema(min_length = 1, max_length = 65536)]
    pub key_pem: String,
}

crate::object_only!(NewCertificate);

/// An installed certificate, as anyone may see it (never its key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstalledCertificate {
    /// The leaf's subject.
    pub subject: String,
    /// The leaf's issuer.
    pub issuer: String,
    /// The names (subjectAltName DNS names and addresses) it is served for.
    pub names: Vec<String>,
    /// Valid from (seconds since the epoch).
    pub not_before_s: i64,
    /// Valid until (seconds since the epoch).
    pub not_after_s: i64,
    /// SHA-256 fingerprint of the leaf (hex pairs with colons).
    pub sha256: String,
    /// Certificates in the chain, the leaf included.
    pub chain_len: usize,
    /// When it was installed (ms since the epoch).
    pub installed_ms: u64,
    /// Who installed it.
    pub installed_by: String,
}

/// What the nodes' API listeners serve: an installed certificate (for the names it
/// covers; every other name and connections by address get the node's cluster-CA
/// certificate), or none (`installed` null: the cluster CA's certificates only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CertificateStatus {
    /// The installed certificate, if any.
    pub installed: Option<InstalledCertificate>,
}
