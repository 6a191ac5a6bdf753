//! The cluster CA's record in the replicated state (`pki/ca`): the certificate in the
//! clear, the private key sealed (`tessera_pki::seal`) with a key derived from the join
//! secret, so `state.redb` and its snapshots do not hold the CA key in the clear.

use serde_json::{json, Value};
use tessera_pki::seal::{self, Sealed};
use tessera_pki::{ClusterCa, PkiError};

/// The table and key of the record.
pub const TABLE: &str = "pki";
/// See [`TABLE`].
pub const KEY: &str = "ca";

/// Why the record does not give the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaRecordError {
    /// A field is missing or not what it should be.
    #[error("the CA record is malformed: {0}")]
    Malformed(&'static str),
    /// This node has no join secret to open the key with.
    #[error("this node has no join secret to open the CA key with")]
    NoSecret,
    /// The sealed key does not open (another join secret, or a changed record).
    #[error(transparent)]
    Seal(#[from] PkiError),
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

/// The record for `ca` of cluster `cluster`, its key sealed under `join_key` (key material
/// derived from the join secret) with a new random salt.
pub fn to_record(ca: &ClusterCa, join_key: &[u8; 32], cluster: &str) -> Result<Value, PkiError> {
    let s = seal::seal(
        join_key,
        cluster,
        &seal::new_salt(),
        ca.key_pem.as_bytes(),
        ca.cert_pem.as_bytes(),
    )?;
    Ok(json!({
        "cert_pem": ca.cert_pem,
        "sealed_key": {
            "kdf": s.kdf,
            "cluster": s.cluster,
            "salt": hex(&s.salt),
            "nonce": hex(&s.nonce),
            "ciphertext": hex(&s.ciphertext),
        }
    }))
}

/// The CA from its record. A record written before keys were sealed (`key_pem` in the
/// clear) still opens.
pub fn from_record(rec: &Value, join_key: Option<&[u8; 32]>) -> Result<ClusterCa, CaRecordError> {
    let cert_pem = rec["cert_pem"]
        .as_str()
        .ok_or(CaRecordError::Malformed("no cert_pem"))?
        .to_string();
    if let Some(key_pem) = rec["key_pem"].as_str() {
        return Ok(ClusterCa {
            cert_pem,
            key_pem: key_pem.to_string(),
        });
    }
    let s = &rec["sealed_key"];
    let text = |f: &'static str| s[f].as_str().ok_or(CaRecordError::Malformed(f));
    let bytes = |f: &'static str| unhex(text(f)?).ok_or(CaRecordError::Malformed(f));
    let sealed = Sealed {
        kdf: text("kdf")?.to_string(),
        cluster: text("cluster")?.to_string(),
        salt: bytes("salt")?,
        nonce: bytes("nonce")?,
        ciphertext: bytes("ciphertext")?,
    };
    let key = join_key.ok_or(CaRecordError::NoSecret)?;
    let plain = seal::open(key, &sealed, cert_pem.as_bytes())?;
    let key_pem = String::from_utf8(plain).map_err(|_| CaRecordError::Malformed("key"))?;
    Ok(ClusterCa { cert_pem, key_pem })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_record_holds_no_key_in_the_clear_and_opens_with_the_secret_only() {
        let ca = ClusterCa::mint("c1").unwrap();
        let rec = to_record(&ca, &[7; 32], "c1").unwrap();
        let text = rec.to_string();
        let body: String = ca
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(
            !text.contains("PRIVATE KEY") && !text.contains(&body),
            "{text}"
        );
        let back = from_record(&rec, Some(&[7; 32])).unwrap();
        assert_eq!(back.key_pem, ca.key_pem);
        assert!(matches!(
            from_record(&rec, Some(&[8; 32])),
            Err(CaRecordError::Seal(_))
        ));
        assert!(matches!(
            from_record(&rec, None),
            Err(CaRecordError::NoSecret)
        ));
        // A record from before sealing still opens.
        let old = json!({ "cert_pem": ca.cert_pem, "key_pem": ca.key_pem });
        assert_eq!(from_record(&old, None).unwrap().key_pem, ca.key_pem);
    }
}
