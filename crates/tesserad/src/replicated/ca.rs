//! The cluster CA in the replicated state: the join key that seals its key (argon2id of
//! the join secret), the founding node's CA recorded once formed, and a record left by an
//! older version (the key in the clear, or under the legacy join key) sealed again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tessera_pki::ClusterCa;
use tessera_state::{Command, Node};

use super::credentials::tls_dir;

/// The key enrollment and join requests of cluster `f` (named `cluster_name` in the
/// seed) are signed with: derived from the join secret by argon2id with the cluster's
/// salt (`tessera_cluster::kdf`), off the async workers, once per process. It also seals
/// the CA's key in the replicated state.
pub async fn join_key(
    secret: &str,
    cluster_name: &str,
    f: &tessera_cluster::formation::Formed,
) -> anyhow::Result<[u8; 32]> {
    let (secret, name, salt) = (secret.to_string(), cluster_name.to_string(), f.salt());
    let keys =
        tokio::task::spawn_blocking(move || tessera_cluster::kdf::derive(&secret, &name, &salt))
            .await??;
    Ok(keys.join)
}

/// The join key of versions before the argon2id KDF (a blake3 derivation): only to open
/// a CA record sealed by such a version, which is then sealed again ([`reseal_ca`]).
pub fn legacy_join_key(secret: &str) -> [u8; 32] {
    blake3::derive_key("tessera raft join v1", secret.as_bytes())
}

/// What the CA record in the state needs.
pub enum CaRecordState {
    /// No record (yet).
    Absent,
    /// Sealed under this node's join key: nothing to do.
    Current,
    /// The key in the clear (written before keys were sealed), or sealed under the
    /// legacy join key: to be sealed again under the current key.
    Reseal(ClusterCa),
    /// Opens with neither key (another join secret?): left alone.
    Unopenable(String),
}

/// Classifies a CA record (see [`CaRecordState`]).
pub fn ca_record_state(
    rec: Option<&serde_json::Value>,
    key: &[u8; 32],
    legacy_key: &[u8; 32],
) -> CaRecordState {
    use tessera_state::ca_record::from_record;
    let Some(rec) = rec else {
        return CaRecordState::Absent;
    };
    if rec.get("key_pem").is_some() {
        return match from_record(rec, None) {
            Ok(ca) => CaRecordState::Reseal(ca),
            Err(e) => CaRecordState::Unopenable(e.to_string()),
        };
    }
    if from_record(rec, Some(key)).is_ok() {
        return CaRecordState::Current;
    }
    match from_record(rec, Some(legacy_key)) {
        Ok(ca) => CaRecordState::Reseal(ca),
        Err(e) => CaRecordState::Unopenable(e.to_string()),
    }
}

/// Seals the CA record again if a former version left it with the key in the clear or
/// under the legacy join key, so no `state.redb` keeps the CA key readable after an
/// upgrade (the old Raft log entries go with the next snapshot's log purge). Runs in the
/// background, retrying until the record is current; the write requires the record to be
/// unchanged, so members doing this at once write it once.
pub fn reseal_ca(node: Arc<Node>, key: [u8; 32], legacy_key: [u8; 32], cluster: String) {
    tokio::spawn(async move {
        for _ in 0..200 {
            let rec = node.state.read(|t| {
                t.get(tessera_state::ca_record::TABLE)
                    .and_then(|p| p.get(tessera_state::ca_record::KEY))
                    .cloned()
            });
            let (n, r) = (node.clone(), rec.clone());
            let c = cluster.clone();
            // Off the async workers: opening and sealing derive keys with argon2id.
            let work = tokio::task::spawn_blocking(move || {
                match ca_record_state(r.as_ref(), &key, &legacy_key) {
                    CaRecordState::Reseal(ca) => n.ca_record(&ca, &c).map(Some),
                    CaRecordState::Unopenable(e) => {
                        tracing::error!(error = %e, "the cluster CA's record opens with neither the join key nor the old one");
                        Ok(None)
                    }
                    CaRecordState::Absent | CaRecordState::Current => Ok(None),
                }
            })
            .await;
            let new = match work {
                Ok(Ok(Some(v))) => v,
                Ok(Ok(None)) if rec.is_some() => return,
                Ok(Ok(None)) => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot seal the cluster CA's key again");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "sealing the cluster CA's key again failed");
                    return;
                }
            };
            let Some(old) = rec else { continue };
            let cmd = Command::Txn {
                require: vec![tessera_state::Require::equals(
                    tessera_state::ca_record::TABLE,
                    tessera_state::ca_record::KEY,
                    old,
                )],
                ops: vec![Command::Put {
                    table: tessera_state::ca_record::TABLE.into(),
                    key: tessera_state::ca_record::KEY.into(),
                    value: new,
                }],
            };
            match node.write(cmd).await {
                Ok(a) if a.conflict.is_none() => {
                    tracing::info!("the cluster CA's key in the replicated state was in the clear or under an old key: sealed it again");
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "CA record not sealed again yet"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Records the cluster CA in the replicated state (so every member can enroll nodes),
/// retrying until a leader takes it, then removes the key's file in `data_dir`, which
/// only bridged a crash before that record.
pub fn publish_ca(node: Arc<Node>, ca: ClusterCa, data_dir: std::path::PathBuf, cluster: String) {
    tokio::spawn(async move {
        // The key is sealed with the join secret (argon2id: off the async workers).
        let (n, c) = (node.clone(), ca.clone());
        let value = match tokio::task::spawn_blocking(move || n.ca_record(&c, &cluster)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot seal the cluster CA's key; it stays in tls/ca.key");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "sealing the cluster CA's key failed");
                return;
            }
        };
        let cmd = Command::Txn {
            require: vec![tessera_state::Require::absent("pki", "ca")],
            ops: vec![Command::Put {
                table: "pki".into(),
                key: "ca".into(),
                value,
            }],
        };
        loop {
            match node.write(cmd.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "CA not recorded yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        forget_minted_ca(&node, &ca, &data_dir);
    });
}

/// Removes `<data_dir>/tls/ca.key` once the replicated state holds that same CA (a write
/// that returned is applied, so committed). A different CA on record keeps the file, so
/// no key is lost to a surprise.
fn forget_minted_ca(node: &Node, ca: &ClusterCa, data_dir: &Path) {
    let recorded = node.state.read(|t| {
        t.get("pki")
            .and_then(|p| p.get("ca"))
            .and_then(|r| r["cert_pem"].as_str().map(|c| c == ca.cert_pem))
    });
    let path = tls_dir(data_dir).join("ca.key");
    if recorded != Some(true) {
        tracing::warn!(path = %path.display(), "the replicated state holds another CA than the one this node minted; keeping its key file");
        return;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            // The removal is durable before anyone relies on the file being gone.
            if let Err(e) = std::fs::File::open(tls_dir(data_dir)).and_then(|d| d.sync_all()) {
                tracing::warn!(error = %e, "syncing the TLS directory after removing the CA key");
            }
            tracing::info!(path = %path.display(), "the cluster CA is in the replicated state: removed its key file");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "could not remove the CA key file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn clear_and_old_ca_records_are_to_be_sealed_again_and_current_ones_left() {
        let ca = ClusterCa::mint("c1").unwrap();
        let key = [1u8; 32];
        let legacy = legacy_join_key("correct horse battery staple");
        assert!(matches!(
            ca_record_state(None, &key, &legacy),
            CaRecordState::Absent
        ));
        // Written before keys were sealed: the key in the clear.
        let clear = json!({ "cert_pem": ca.cert_pem, "key_pem": ca.key_pem });
        assert!(
            matches!(ca_record_state(Some(&clear), &key, &legacy), CaRecordState::Reseal(c) if c.key_pem == ca.key_pem)
        );
        // Sealed by the version before the argon2id join key.
        let old = tessera_state::ca_record::to_record(&ca, &legacy, "c1").unwrap();
        assert!(
            matches!(ca_record_state(Some(&old), &key, &legacy), CaRecordState::Reseal(c) if c.key_pem == ca.key_pem)
        );
        // What a re-seal writes opens with the current key and needs nothing more.
        let new = tessera_state::ca_record::to_record(&ca, &key, "c1").unwrap();
        assert!(!new.to_string().contains("PRIVATE KEY"));
        assert!(matches!(
            ca_record_state(Some(&new), &key, &legacy),
            CaRecordState::Current
        ));
        // Another secret's record is left alone.
        let other = tessera_state::ca_record::to_record(&ca, &[9; 32], "c1").unwrap();
        assert!(matches!(
            ca_record_state(Some(&other), &key, &legacy),
            CaRecordState::Unopenable(_)
        ));
    }
}
