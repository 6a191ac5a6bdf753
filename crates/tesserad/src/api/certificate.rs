//! The API and console's own certificate: an administrator uploads a PEM chain and key
//! (`POST /api/v1/certificate`), checked before anything is kept; the chain and the key,
//! sealed, go into the replicated state (`api_certificate/current`), and every node's
//! listener presents it from its next handshake on for the names it covers (the node's
//! cluster-CA certificate for every other name and for connections by address), without a
//! restart. `DELETE` goes back to the cluster CA's certificates only.
//!
//! The key is sealed the way the CA key is (`tessera_pki::seal`: XChaCha20-Poly1305 under
//! an argon2id key, bound to the chain) with key material derived from the cluster CA's
//! private key, which is itself sealed under the join secret: whoever can open the CA can
//! open this key, and a copy of the state alone opens neither.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use tessera_api::{CertificateStatus, InstalledCertificate, NewCertificate};
use tessera_pki::api_cert::{self, Checked, SwappableCert};
use tessera_pki::seal::{self, Sealed};
use tessera_state::Require;

use super::extract::{Administrator, Auditor, Auth, Body, Synced};
use super::{commit, del, now_ms, put, read, ApiError, ApiState, ErrorBody, St};
use crate::tables::event;

/// Where the installed certificate lives: `api_certificate/current`.
pub const TABLE: &str = "api_certificate";
const KEY: &str = "current";
/// How often each node looks for a changed record.
const WATCH: Duration = Duration::from_secs(1);

/// The sealing secret for API certificate keys: derived from the cluster CA's key.
fn secret(ca_key_pem: &str) -> [u8; 32] {
    blake3::derive_key("tessera api certificate key seal v1", ca_key_pem.as_bytes())
}

fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER.decode(s.as_bytes()).ok()
}

/// The cluster CA, opened (argon2id the first time in a process: off the async workers).
async fn cluster_ca(n: Arc<tessera_state::Node>) -> Result<tessera_pki::ClusterCa, ApiError> {
    tokio::task::spawn_blocking(move || {
        n.cluster_ca()
            .map_err(|e| ApiError::internal(format!("cannot open the cluster CA: {e}")))?
            .ok_or_else(|| ApiError::unavailable("the cluster CA is not in the cluster state yet"))
    })
    .await
    .map_err(|e| ApiError::internal(format!("opening the cluster CA failed: {e}")))?
}

/// The chain and key of a record, checked again (a record is only served if it still
/// passes: an expired one falls back to the cluster CA's certificate).
fn open(rec: &Value, ca_key_pem: &str) -> Result<Checked, String> {
    let chain = rec["cert_pem"].as_str().ok_or("no cert_pem")?;
    let s = &rec["sealed_key"];
    let text = |f: &str| s[f].as_str().ok_or(format!("no sealed_key.{f}"));
    let bytes = |f: &str| unhex(text(f)?).ok_or(format!("bad sealed_key.{f}"));
    let sealed = Sealed {
        kdf: text("kdf")?.to_string(),
        cluster: text("cluster")?.to_string(),
        salt: bytes("salt")?,
        nonce: bytes("nonce")?,
        ciphertext: bytes("ciphertext")?,
    };
    let key = seal::open(&secret(ca_key_pem), &sealed, chain.as_bytes())
        .map_err(|e| format!("the key does not open: {e}"))?;
    let key = String::from_utf8(key).map_err(|_| "the key is not text".to_string())?;
    let now = (now_ms() / 1000) as i64;
    api_cert::check(chain, &key, now).map_err(|e| e.0)
}

fn status(rec: Option<Value>) -> Json<CertificateStatus> {
    Json(CertificateStatus {
        installed: rec.and_then(|r| serde_json::from_value(r["info"].clone()).ok()),
    })
}

/// The certificate the API and console serve.
#[utoipa::path(get, path = "/api/v1/certificate", tag = "cluster", operation_id = "get_certificate",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = CertificateStatus), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(_: Auth<Auditor>, n: Synced) -> Result<Json<CertificateStatus>, ApiError> {
    Ok(status(read(&n, TABLE, KEY)?))
}

/// Install a certificate of your own for the API and web console (replacing one installed
/// before). It is checked first (PEM that parses, a key that matches the leaf, a leaf
/// valid now naming at least one DNS name or address, each certificate issued by the
/// next): 400 names the problem and nothing changes. Every node serves it within seconds
/// for the names it covers.
#[utoipa::path(post, path = "/api/v1/certificate", tag = "cluster", operation_id = "install_certificate",
    request_body = NewCertificate,
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = CertificateStatus), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn install(
    State(st): St,
    p: Auth<Administrator>,
    n: Synced,
    Body(req): Body<NewCertificate>,
) -> Result<Json<CertificateStatus>, ApiError> {
    let now = (now_ms() / 1000) as i64;
    let checked =
        api_cert::check(&req.cert_pem, &req.key_pem, now).map_err(|e| ApiError::bad(e.0))?;
    let ca = cluster_ca(n.0.clone()).await?;
    let cluster = st
        .cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    let (chain, key) = (req.cert_pem.clone(), req.key_pem.clone());
    let sealed = tokio::task::spawn_blocking(move || {
        seal::seal(
            &secret(&ca.key_pem),
            &cluster,
            &seal::new_salt(),
            key.as_bytes(),
            chain.as_bytes(),
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("sealing the key failed: {e}")))?
    .map_err(|e| ApiError::internal(format!("sealing the key failed: {e}")))?;
    let i = checked.info;
    let info = InstalledCertificate {
        subject: i.subject,
        issuer: i.issuer,
        names: i.names,
        not_before_s: i.not_before_s,
        not_after_s: i.not_after_s,
        sha256: i.sha256,
        chain_len: i.chain_len,
        installed_ms: now_ms(),
        installed_by: p.user.clone(),
    };
    let rec = json!({
        "cert_pem": req.cert_pem,
        "sealed_key": {
            "kdf": sealed.kdf,
            "cluster": sealed.cluster,
            "salt": hex(&sealed.salt),
            "nonce": hex(&sealed.nonce),
            "ciphertext": hex(&sealed.ciphertext),
        },
        "info": info,
    });
    let what = format!(
        "API certificate installed for {} (SHA-256 {})",
        info.names.join(", "),
        info.sha256
    );
    commit(
        &st,
        Vec::<Require>::new(),
        vec![
            put(TABLE, KEY, &rec),
            event("certificate.install", "api", &p.user, &what),
        ],
        |_| String::new(),
    )
    .await?;
    tracing::info!(user = %p.user, sha256 = %info.sha256, "API certificate installed");
    Ok(status(Some(rec)))
}

/// Remove the installed certificate: every node serves its cluster-CA certificate again.
#[utoipa::path(delete, path = "/api/v1/certificate", tag = "cluster", operation_id = "remove_certificate",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = CertificateStatus), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Administrator>,
    n: Synced,
) -> Result<Json<CertificateStatus>, ApiError> {
    if read::<Value>(&n, TABLE, KEY)?.is_some() {
        commit(
            &st,
            Vec::new(),
            vec![
                del(TABLE, KEY),
                event(
                    "certificate.remove",
                    "api",
                    &p.user,
                    "API certificate removed: the cluster CA's certificates are served again",
                ),
            ],
            |_| String::new(),
        )
        .await?;
    }
    Ok(status(None))
}

/// The listener's TLS configuration with a certificate resolver that follows the
/// installed record: `tls` (the node's certificate) until a certificate is installed, and
/// for names it does not cover. A task watches the local replicated state and swaps the
/// certificate when the record changes.
pub fn serving(st: Arc<ApiState>, tls: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let resolver = Arc::new(SwappableCert::new(tls.cert_resolver.clone()));
    let mut config = (*tls).clone();
    config.cert_resolver = resolver.clone();
    tokio::spawn(watch(st, resolver));
    Arc::new(config)
}

async fn watch(st: Arc<ApiState>, resolver: Arc<SwappableCert>) {
    let mut last: Option<Value> = None;
    // Until when the certificate served is valid: past it, the node's own is served.
    let mut expires_s: Option<i64> = None;
    loop {
        tokio::time::sleep(WATCH).await;
        if expires_s.is_some_and(|e| e <= (now_ms() / 1000) as i64) {
            tracing::warn!(
                "the installed API certificate expired: serving the cluster CA's certificate"
            );
            resolver.install(None);
            expires_s = None;
        }
        let Ok(n) = super::node(&st) else { continue };
        let rec = n
            .state
            .read(|t| t.get(TABLE).and_then(|t| t.get(KEY)).cloned());
        if rec == last {
            continue;
        }
        let Some(r) = rec.clone() else {
            resolver.install(None);
            tracing::info!("API certificate removed: serving the cluster CA's certificate");
            (last, expires_s) = (None, None);
            continue;
        };
        let ca = match cluster_ca(n.clone()).await {
            Ok(ca) => ca,
            Err(e) => {
                // The CA record may not be here yet: try again next round.
                tracing::debug!(error = %e.1, "API certificate not opened yet");
                continue;
            }
        };
        let opened = tokio::task::spawn_blocking(move || open(&r, &ca.key_pem)).await;
        match opened {
            Ok(Ok(c)) => {
                tracing::info!(sha256 = %c.info.sha256, names = ?c.info.names, "serving the installed API certificate");
                resolver.install(Some(&c));
                expires_s = Some(c.info.not_after_s);
            }
            Ok(Err(e)) => {
                tracing::warn!("the installed API certificate is not served ({e}): serving the cluster CA's certificate");
                resolver.install(None);
                expires_s = None;
            }
            Err(e) => tracing::warn!("opening the installed API certificate failed: {e}"),
        }
        last = rec;
    }
}
