//! Sealing the cluster CA's private key for the replicated state: XChaCha20-Poly1305
//! under a key derived by argon2id from the join secret, salted with the cluster's id and
//! a random value of the cluster's own. A copy of a node's state (a disk, a backup) then
//! does not give away the CA without the join secret, and each guess at that secret costs
//! an argon2id run (64 MiB, 3 passes) rather than a hash.

use std::sync::Mutex;

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::PkiError;

/// The key derivation in use, recorded with each sealed value so it can change later.
pub const KDF: &str = "argon2id-v19-m65536-t3-p1";

/// A sealed secret and what is needed, with the join secret, to open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// [`KDF`] when sealed by this version.
    pub kdf: String,
    /// The cluster id mixed into the salt.
    pub cluster: String,
    /// The cluster's random salt (16 bytes).
    pub salt: Vec<u8>,
    /// XChaCha20 nonce (24 bytes), random per sealing.
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// Derived keys by (secret, cluster, salt): argon2id is deliberately slow, so a process
/// derives each key once.
type Cache = Vec<((Vec<u8>, String, Vec<u8>), [u8; 32])>;
static DERIVED: Mutex<Cache> = Mutex::new(Vec::new());

/// The sealing key for `secret` (the join secret, or key material derived from it) in
/// cluster `cluster` with the cluster's `salt`; cached per process.
pub fn derive(secret: &[u8], cluster: &str, salt: &[u8]) -> Result<[u8; 32], PkiError> {
    let id = (secret.to_vec(), cluster.to_string(), salt.to_vec());
    let mut cache = DERIVED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, k)) = cache.iter().find(|(k, _)| *k == id) {
        return Ok(*k);
    }
    let params = argon2::Params::new(64 * 1024, 3, 1, Some(32))
        .map_err(|e| PkiError::Seal(format!("argon2 parameters: {e}")))?;
    let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut full_salt = b"tessera ca seal v1\0".to_vec();
    full_salt.extend_from_slice(cluster.as_bytes());
    full_salt.push(0);
    full_salt.extend_from_slice(salt);
    let mut key = [0u8; 32];
    kdf.hash_password_into(secret, &full_salt, &mut key)
        .map_err(|e| PkiError::Seal(format!("argon2id: {e}")))?;
    cache.push((id, key));
    Ok(key)
}

/// A new random salt for a cluster.
pub fn new_salt() -> Vec<u8> {
    let mut salt = vec![0u8; 16];
    OsRng.fill_bytes(&mut salt);
    salt
}

/// Seals `plain` for cluster `cluster` (with its `salt`), bound to `context` (which must be
/// given again to open it: the CA's certificate, so a sealed key cannot be moved to
/// another record).
pub fn seal(
    secret: &[u8],
    cluster: &str,
    salt: &[u8],
    plain: &[u8],
    context: &[u8],
) -> Result<Sealed, PkiError> {
    let key = derive(secret, cluster, salt)?;
    let cipher = XChaCha20Poly1305::new(&key.into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plain,
                aad: context,
            },
        )
        .map_err(|_| PkiError::Seal("encryption failed".into()))?;
    Ok(Sealed {
        kdf: KDF.to_string(),
        cluster: cluster.to_string(),
        salt: salt.to_vec(),
        nonce: nonce.to_vec(),
        ciphertext,
    })
}

/// Opens what [`seal`] sealed; fails with the wrong secret, context or a changed value.
pub fn open(secret: &[u8], sealed: &Sealed, context: &[u8]) -> Result<Vec<u8>, PkiError> {
    if sealed.kdf != KDF {
        return Err(PkiError::Seal(format!(
            "unknown key derivation {:?}",
            sealed.kdf
        )));
    }
    if sealed.nonce.len() != 24 {
        return Err(PkiError::Seal("the nonce is not 24 bytes".into()));
    }
    let key = derive(secret, &sealed.cluster, &sealed.salt)?;
    let cipher = XChaCha20Poly1305::new(&key.into());
    cipher
        .decrypt(
            XNonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: context,
            },
        )
        .map_err(|_| {
            PkiError::Seal(
                "cannot open the sealed key: another join secret, or the record was changed".into(),
            )
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn opens_with_the_same_secret_only() {
        let salt = new_salt();
        let s = seal(b"right secret", "c1", &salt, b"the key", b"cert").unwrap();
        assert!(!s.ciphertext.windows(7).any(|w| w == b"the key"));
        assert_eq!(open(b"right secret", &s, b"cert").unwrap(), b"the key");
        assert!(open(b"wrong secret", &s, b"cert").is_err());
        assert!(open(b"right secret", &s, b"another cert").is_err());
        let mut moved = s.clone();
        moved.cluster = "c2".into();
        assert!(open(b"right secret", &moved, b"cert").is_err());
        let mut flipped = s;
        flipped.ciphertext[0] ^= 1;
        assert!(open(b"right secret", &flipped, b"cert").is_err());
    }
}
