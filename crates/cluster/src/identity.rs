//! A node's persistent identity: made on first start, kept across restarts, gone with the
//! data directory (wiping it makes a new node).

use std::path::Path;

use rand::RngCore;
use serde::{Deserialize, Serialize};

/// A node's id: 128 random bits, hex.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a node knows about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The node id.
    pub node_id: NodeId,
    /// Seconds since the epoch when the identity was made.
    pub created: u64,
}

/// Errors loading or saving the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// File I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The file exists but is not an identity.
    #[error("{0} is damaged: {1}")]
    Damaged(String, String),
}

impl Identity {
    /// Loads `dir/identity.json`, or makes and saves a new identity if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let path = dir.join("identity.json");
        let p = path.display().to_string();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| IdentityError::Damaged(p, e.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| IdentityError::Io(dir.display().to_string(), e))?;
                let mut raw = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut raw);
                let id = Identity {
                    node_id: NodeId(raw.iter().map(|b| format!("{b:02x}")).collect()),
                    created: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                };
                let tmp = dir.join("identity.json.tmp");
                let text = serde_json::to_vec_pretty(&id)
                    .map_err(|e| IdentityError::Damaged(p.clone(), e.to_string()))?;
                std::fs::write(&tmp, text).map_err(|e| IdentityError::Io(p.clone(), e))?;
                std::fs::rename(&tmp, &path).map_err(|e| IdentityError::Io(p.clone(), e))?;
                Ok(id)
            }
            Err(e) => Err(IdentityError::Io(p, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_restart_and_not_a_wipe() {
        let d = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(d.path()).unwrap();
        let b = Identity::load_or_create(d.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.node_id.0.len(), 32);
        std::fs::remove_file(d.path().join("identity.json")).unwrap();
        let c = Identity::load_or_create(d.path()).unwrap();
        assert_ne!(a.node_id, c.node_id);
        std::fs::write(d.path().join("identity.json"), "{broken").unwrap();
        assert!(matches!(
            Identity::load_or_create(d.path()),
            Err(IdentityError::Damaged(..))
        ));
    }
}
