//! The keys a cluster derives from its join secret: one argon2id run (19 MiB, 2 passes,
//! tens of ms) salted with the cluster name and the cluster's random salt, split into the
//! discovery key (announcement MACs) and the join key (enrollment and join requests on
//! the node-to-node port). A captured datagram or join request then costs an attacker an
//! argon2id run per guess at the secret, not a hash.
//!
//! The salt: every node picks a random [`Salt`] when it starts and announces with it
//! (in the clear, in each datagram's header) until it belongs to a cluster. The node that
//! founds the cluster (the smallest node id of the agreed proposal) puts its own salt in
//! the [`Formed`](crate::formation::Formed) record; every member persists that record and
//! announces, enrolls and joins with that salt from then on, and a node that joins later
//! learns it from the members' announcements.
//!
//! Derivation is slow on purpose: a process derives each (secret, cluster, salt) once and
//! keeps the keys ([`derive`] caches them); nothing derives per datagram.

use std::sync::Mutex;

use rand::RngCore;

/// Salt length in bytes.
pub const SALT_LEN: usize = 16;

/// The KDF and its parameters (argon2id v1.3, memory in KiB, passes, lanes).
pub const KDF: &str = "argon2id-v19-m19456-t2-p1";

/// A cluster's random salt (public: it travels in every announcement).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Salt(pub [u8; SALT_LEN]);

impl Salt {
    /// A new random salt (from the OS generator).
    pub fn random() -> Salt {
        let mut s = [0u8; SALT_LEN];
        rand::rngs::OsRng.fill_bytes(&mut s);
        Salt(s)
    }

    /// The salt of a cluster formed before clusters had one (its `formed.json` has none):
    /// all zeros, so such a cluster's nodes still agree; the cluster name still salts it.
    pub const LEGACY: Salt = Salt([0; SALT_LEN]);

    /// Lowercase hex, as `formed.json` and announcements carry it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`Salt::to_hex`]'s form.
    pub fn from_hex(s: &str) -> Option<Salt> {
        if s.len() != SALT_LEN * 2 {
            return None;
        }
        let mut out = [0u8; SALT_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Salt(out))
    }
}

/// The keys derived from the join secret for one cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClusterKeys {
    /// Authenticates discovery announcements.
    pub discovery: [u8; 32],
    /// Signs enrollment and join requests on the node-to-node port.
    pub join: [u8; 32],
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKeys(..)")
    }
}

/// Why no keys could be derived (argon2 refused its input: not expected with our
/// parameters, but not a reason to panic either).
#[derive(Debug, thiserror::Error)]
#[error("deriving keys from the join secret: {0}")]
pub struct KdfError(String);

/// Derived keys by (blake3 of the secret, cluster name, salt). Bounded: a flood of
/// announcements with made-up salts cannot grow it without limit (the discovery loop
/// also limits how often it derives).
type Cache = Vec<(([u8; 32], String, Salt), ClusterKeys)>;
static DERIVED: Mutex<Cache> = Mutex::new(Vec::new());
const CACHE_MAX: usize = 64;

/// The argon2id salt: a domain label, the cluster name and the cluster's salt.
fn full_salt(cluster: &str, salt: &Salt) -> Vec<u8> {
    let mut s = b"tessera join secret v2\0".to_vec();
    s.extend_from_slice(cluster.as_bytes());
    s.push(0);
    s.extend_from_slice(&salt.0);
    s
}

/// The keys of cluster `cluster` with salt `salt` under join secret `secret`: one argon2id
/// run the first time, the cached keys after that. Blocks for tens of ms on a miss: call
/// it off an async executor's workers (`spawn_blocking`).
pub fn derive(secret: &str, cluster: &str, salt: &Salt) -> Result<ClusterKeys, KdfError> {
    let id = (
        *blake3::hash(secret.as_bytes()).as_bytes(),
        cluster.to_string(),
        *salt,
    );
    if let Some(k) = cached(&id) {
        return Ok(k);
    }
    let params =
        argon2::Params::new(19 * 1024, 2, 1, Some(64)).map_err(|e| KdfError(e.to_string()))?;
    let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 64];
    kdf.hash_password_into(secret.as_bytes(), &full_salt(cluster, salt), &mut out)
        .map_err(|e| KdfError(e.to_string()))?;
    let mut keys = ClusterKeys {
        discovery: [0; 32],
        join: [0; 32],
    };
    keys.discovery.copy_from_slice(&out[..32]);
    keys.join.copy_from_slice(&out[32..]);
    let mut cache = DERIVED.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= CACHE_MAX {
        cache.remove(0);
    }
    cache.push((id, keys));
    Ok(keys)
}

fn cached(id: &([u8; 32], String, Salt)) -> Option<ClusterKeys> {
    let cache = DERIVED.lock().unwrap_or_else(|p| p.into_inner());
    cache.iter().find(|(k, _)| k == id).map(|(_, v)| *v)
}

/// The keys for (`secret`, `cluster`, `salt`) if this process derived them already.
pub fn derived(secret: &str, cluster: &str, salt: &Salt) -> Option<ClusterKeys> {
    cached(&(
        *blake3::hash(secret.as_bytes()).as_bytes(),
        cluster.to_string(),
        *salt,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_argon2id_of_the_secret_salted_with_cluster_name_and_salt() {
        let salt = Salt([5; SALT_LEN]);
        let k = derive("correct horse battery staple", "lab", &salt).unwrap();
        // The same argon2id computation, done here by hand, gives the same keys.
        let params = argon2::Params::new(19 * 1024, 2, 1, Some(64)).unwrap();
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 64];
        let mut s = b"tessera join secret v2\0lab\0".to_vec();
        s.extend_from_slice(&[5; SALT_LEN]);
        a.hash_password_into(b"correct horse battery staple", &s, &mut out)
            .unwrap();
        assert_eq!(k.discovery, out[..32]);
        assert_eq!(k.join, out[32..]);
        assert_ne!(k.discovery, k.join);
        // Every input changes the keys: the salt, the cluster name, the secret.
        let other_salt = derive("correct horse battery staple", "lab", &Salt([6; SALT_LEN]));
        assert_ne!(other_salt.unwrap(), k);
        assert_ne!(
            derive("correct horse battery staple", "lab2", &salt).unwrap(),
            k
        );
        assert_ne!(
            derive("correct horse battery stapl3", "lab", &salt).unwrap(),
            k
        );
        // Derived once: the second call is the cached keys.
        assert_eq!(
            derived("correct horse battery staple", "lab", &salt),
            Some(k)
        );
        assert_eq!(
            derive("correct horse battery staple", "lab", &salt).unwrap(),
            k
        );
    }

    #[test]
    fn a_guess_costs_an_argon2id_run() {
        // Uncached derivations: each takes real time (tens of ms in release builds), so a
        // guesser cannot try secrets at hash speed.
        let t = std::time::Instant::now();
        for i in 0..3u8 {
            derive(
                &format!("guess number {i} ......"),
                "cost",
                &Salt([i; SALT_LEN]),
            )
            .unwrap();
        }
        let each = t.elapsed() / 3;
        assert!(
            each >= std::time::Duration::from_millis(5),
            "one derivation took only {each:?}"
        );
    }

    #[test]
    fn salts_round_trip_as_hex() {
        let s = Salt::random();
        assert_ne!(s, Salt::random());
        assert_eq!(Salt::from_hex(&s.to_hex()), Some(s));
        assert_eq!(Salt::from_hex("zz"), None);
        assert_eq!(Salt::from_hex(&"g".repeat(32)), None);
    }
}
