//! Secrets kept sealed in the replicated state: LDAP bind passwords and TOTP secrets.
//! Sealed like the CA key (`tessera_pki::seal`: XChaCha20-Poly1305 under an argon2id
//! key) with the cluster CA's private key as the secret: that key is itself sealed under
//! the join secret in the state, so a copy of `state.redb` gives neither.

use serde::{Deserialize, Serialize};

use super::directory::RealmRecord;
use super::{ApiError, ApiState};

/// A sealed secret, its bytes in hex (as the CA record keeps its sealed key).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealedHex {
    kdf: String,
    cluster: String,
    salt: String,
    nonce: String,
    ciphertext: String,
}

/// Bind passwords are sealed like the CA key (`tessera_pki::seal`: XChaCha20-Poly1305
/// under an argon2id key) with the cluster CA's private key as the secret: that key is
/// itself sealed under the join secret in the state, so a copy of `state.redb` gives
/// neither. A fixed salt makes it one derivation per process; nonces are random.
const SEAL_SALT: &[u8] = b"realm bind password v1";

fn seal_context(realm: &str) -> Vec<u8> {
    format!("tessera realm {realm} bind password").into_bytes()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The CA key and the cluster id sealing uses.
fn seal_secret(st: &ApiState) -> Result<(Vec<u8>, String), ApiError> {
    let n = super::node(st)?;
    let ca = n
        .cluster_ca()
        .map_err(|e| ApiError::internal(format!("the cluster CA: {e}")))?
        .ok_or_else(|| ApiError::unavailable("the cluster CA is not in the state yet"))?;
    let cluster = st
        .cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| ApiError::unavailable("this node has not joined a cluster yet"))?;
    Ok((ca.key_pem.into_bytes(), cluster))
}

/// Seals `realm`'s bind password (argon2id: off the async workers).
pub async fn seal(st: &ApiState, realm: &str, password: &str) -> Result<SealedHex, ApiError> {
    seal_bytes(st, seal_context(realm), password.as_bytes().to_vec()).await
}

/// Seals `pw` bound to `ctx` (which opening must give again), as bind passwords are.
pub async fn seal_bytes(st: &ApiState, ctx: Vec<u8>, pw: Vec<u8>) -> Result<SealedHex, ApiError> {
    let (secret, cluster) = seal_secret(st)?;
    let s = tokio::task::spawn_blocking(move || {
        tessera_pki::seal::seal(&secret, &cluster, SEAL_SALT, &pw, &ctx)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(SealedHex {
        kdf: s.kdf,
        cluster: s.cluster,
        salt: hex(&s.salt),
        nonce: hex(&s.nonce),
        ciphertext: hex(&s.ciphertext),
    })
}

/// Opens what [`seal`] sealed.
async fn open(st: &ApiState, realm: &str, s: &SealedHex) -> Result<String, ApiError> {
    let plain = open_bytes(st, seal_context(realm), s).await?;
    String::from_utf8(plain)
        .map_err(|_| ApiError::internal(format!("realm {realm}: the bind password is not UTF-8")))
}

/// Opens what [`seal_bytes`] sealed with the same `ctx`.
pub async fn open_bytes(st: &ApiState, ctx: Vec<u8>, s: &SealedHex) -> Result<Vec<u8>, ApiError> {
    let (secret, _) = seal_secret(st)?;
    let bad = || ApiError::internal("a sealed secret is malformed");
    let sealed = tessera_pki::seal::Sealed {
        kdf: s.kdf.clone(),
        cluster: s.cluster.clone(),
        salt: unhex(&s.salt).ok_or_else(bad)?,
        nonce: unhex(&s.nonce).ok_or_else(bad)?,
        ciphertext: unhex(&s.ciphertext).ok_or_else(bad)?,
    };
    tokio::task::spawn_blocking(move || tessera_pki::seal::open(&secret, &sealed, &ctx))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// The realm's bind password, opened, if it has one.
pub async fn bind_password(st: &ApiState, rec: &RealmRecord) -> Result<Option<String>, ApiError> {
    match &rec.sealed_bind_password {
        Some(s) => open(st, &rec.realm.name, s).await.map(Some),
        None => Ok(None),
    }
}
