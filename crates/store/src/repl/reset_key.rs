//! The replication endpoint's stateless-reset key, kept across restarts.
//!
//! A store killed and started again on the same address leaves its peers holding QUIC
//! connections to the old process. Their next packet reaches the new process, which
//! does not know the connection and answers with a *stateless reset* (RFC 9000 §10.3):
//! a token derived from the connection id with the endpoint's reset key. The peer
//! closes the connection at once only if the token matches the one the old process
//! issued, so only if the key is the same. With quinn's default (a random key per
//! process) it never matches, and the peer learns of the restart only from its idle
//! timeout or its own request timeout: a primary then stalled its writes for the whole
//! replica timeout before it heard the restarted replica refuse them (the EIO of
//! issue #8's "first write after a replica's store restart"). So the key is made once,
//! kept in the data directory (mode 0600, like the node key) and used by every start.
//!
//! quinn's default connection ids also carry a check keyed per process, and a packet
//! whose id fails it is dropped before any reset is considered: the new process would
//! drop every packet of the old connections. So the ids here ([`ConnectionIds`]) are
//! plain unpredictable bytes that every process accepts as possibly its own; an unknown
//! one draws the reset (quinn rate-limits resets and never sends one larger than the
//! packet that caused it).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use quinn::crypto::{CryptoError, HmacKey};
use quinn::{ConnectionId, ConnectionIdGenerator};

const KEY_LEN: usize = 32;
/// Bytes of a connection id (quinn's default length).
const CID_LEN: usize = 8;

/// A keyed BLAKE3 MAC as quinn's reset-token key.
pub struct ResetKey([u8; KEY_LEN]);

impl HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(KEY_LEN);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        KEY_LEN
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        let given: [u8; KEY_LEN] = signature.try_into().map_err(|_| CryptoError)?;
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.0, data) == blake3::Hash::from(given) {
            Ok(())
        } else {
            Err(CryptoError)
        }
    }
}

impl ResetKey {
    /// The key in `file`, made (random, mode 0600, synced) when it is missing or not a
    /// key. A key that cannot be kept still works for this process: the log says so,
    /// and peers then notice a restart only by their timeouts.
    pub fn load_or_create(file: &Path) -> ResetKey {
        if let Ok(bytes) = std::fs::read(file) {
            if let Ok(key) = <[u8; KEY_LEN]>::try_from(bytes.as_slice()) {
                return ResetKey(key);
            }
            tracing::warn!(file = %file.display(), "the QUIC reset key is unreadable; making a new one");
        }
        let key = match random_key() {
            Ok(k) => k,
            Err(e) => {
                // No randomness from the kernel: a key from the time and pid is still
                // unique per start, which is all quinn's default gives too.
                tracing::warn!(error = %e, "no random bytes for the QUIC reset key");
                let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
                *blake3::hash(seed.as_bytes()).as_bytes()
            }
        };
        if let Err(e) = store(file, &key) {
            tracing::warn!(file = %file.display(), error = %e,
                "could not keep the QUIC reset key: after a restart, peers notice it only by their timeouts");
        }
        ResetKey(key)
    }
}

/// Connection ids: a keyed BLAKE3 of a counter, the key random per process, so ids are
/// unpredictable and unlinkable; any id is accepted as possibly this endpoint's own.
pub struct ConnectionIds {
    key: [u8; KEY_LEN],
    next: u64,
}

impl ConnectionIds {
    /// A generator with a fresh key.
    pub fn new() -> ConnectionIds {
        let key = random_key().unwrap_or_else(|_| {
            let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
            *blake3::hash(seed.as_bytes()).as_bytes()
        });
        ConnectionIds { key, next: 0 }
    }
}

impl Default for ConnectionIds {
    fn default() -> ConnectionIds {
        ConnectionIds::new()
    }
}

impl ConnectionIdGenerator for ConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        self.next = self.next.wrapping_add(1);
        let id = blake3::keyed_hash(&self.key, &self.next.to_le_bytes());
        ConnectionId::new(&id.as_bytes()[..CID_LEN])
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

fn random_key() -> std::io::Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    Ok(key)
}

/// Writes `key` to `file` through a synced temporary file renamed over it.
fn store(file: &Path, key: &[u8; KEY_LEN]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(key)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_key_is_kept_across_loads_and_signs_like_a_mac() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("replication/quic-reset.key");
        let a = ResetKey::load_or_create(&file);
        let b = ResetKey::load_or_create(&file);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (mut sa, mut sb) = ([0u8; KEY_LEN], [0u8; KEY_LEN]);
        a.sign(b"connection id", &mut sa);
        b.sign(b"connection id", &mut sb);
        assert_eq!(sa, sb, "a second start signs like the first");
        assert!(b.verify(b"connection id", &sa).is_ok());
        assert!(b.verify(b"another id", &sa).is_err());
        assert!(b.verify(b"connection id", &sa[..16]).is_err());
        // A file that is not a key is replaced by a new one.
        std::fs::write(&file, b"short").unwrap();
        let c = ResetKey::load_or_create(&file);
        let mut sc = [0u8; KEY_LEN];
        c.sign(b"connection id", &mut sc);
        assert_ne!(sc, sa);
        assert_eq!(std::fs::read(&file).unwrap().len(), KEY_LEN);
    }

    #[test]
    fn connection_ids_differ_and_have_the_declared_length() {
        let mut g = ConnectionIds::new();
        let (a, b) = (g.generate_cid(), g.generate_cid());
        assert_eq!(a.len(), g.cid_len());
        assert_ne!(a, b);
        assert_ne!(
            ConnectionIds::new().generate_cid(),
            a,
            "another process's first id"
        );
    }
}
