//! Join authentication: the requests a node sends to enroll (get a certificate) and to
//! join (become a voter), and the enrollment answer, each carrying a keyed blake3 MAC
//! under the cluster's join key, with a freshness window against replays.

use serde::{Deserialize, Serialize};

use super::NodeId;

/// Join and enrollment requests older (or newer) than this are refused.
const FRESH_MS: u64 = 30_000;

/// Why a join or enrollment request (or an enrollment answer) is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The MAC does not match: the sender holds a different join key.
    #[error("{0} request failed authentication (different join secret?)")]
    Forged(&'static str),
    /// The MAC is not even a hash.
    #[error("malformed {0} signature")]
    Malformed(&'static str),
    /// Sent too long ago (or in the future): a replay, or clocks far apart.
    #[error("{0} request is stale (clocks more than 30 s apart?)")]
    Stale(&'static str),
}

/// Milliseconds since the epoch on this node's clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn keyed(key: &[u8; 32], parts: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().to_hex().to_string()
}

/// Whether two hex MACs are equal; a malformed one equals nothing.
fn same_mac(a: &str, b: &str) -> bool {
    // Compared as blake3 hashes: constant time.
    matches!((blake3::Hash::from_hex(a), blake3::Hash::from_hex(b)), (Ok(x), Ok(y)) if x == y)
}

fn fresh(sent_ms: u64, now_ms: u64, what: &'static str) -> Result<(), AuthError> {
    if now_ms.abs_diff(sent_ms) > FRESH_MS {
        return Err(AuthError::Stale(what));
    }
    Ok(())
}

/// A node's request for a certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Its Raft id (the certificate's name).
    pub id: NodeId,
    /// PKCS#10 request, PEM.
    pub csr_pem: String,
    /// IP addresses the certificate must also be valid for (its API's address).
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// Its clock, ms since the epoch.
    pub sent_ms: u64,
    /// Keyed hash of the above under the join key, hex.
    pub mac: String,
}

impl EnrollRequest {
    /// A signed request.
    pub fn new(
        key: &[u8; 32],
        id: NodeId,
        csr_pem: String,
        ips: &[std::net::IpAddr],
        sent_ms: u64,
    ) -> EnrollRequest {
        EnrollRequest {
            id,
            mac: Self::tag(key, id, &csr_pem, ips, sent_ms),
            csr_pem,
            ips: ips.to_vec(),
            sent_ms,
        }
    }

    fn tag(
        key: &[u8; 32],
        id: NodeId,
        csr: &str,
        ips: &[std::net::IpAddr],
        sent_ms: u64,
    ) -> String {
        let ips: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
        keyed(
            key,
            &[
                b"tessera enroll v1",
                &id.to_le_bytes(),
                csr.as_bytes(),
                ips.join(",").as_bytes(),
                &sent_ms.to_le_bytes(),
            ],
        )
    }

    /// Checks the MAC and freshness.
    pub fn verify(&self, key: &[u8; 32], now_ms: u64) -> Result<(), AuthError> {
        if !same_mac(
            &Self::tag(key, self.id, &self.csr_pem, &self.ips, self.sent_ms),
            &self.mac,
        ) {
            return Err(AuthError::Forged("enrollment"));
        }
        fresh(self.sent_ms, now_ms, "enrollment")
    }
}

/// The answer to an enrollment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollReply {
    /// The node's certificate, PEM.
    pub cert_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// Keyed hash under the join key of the request's MAC and both certificates: binds
    /// the answer to this request and to a holder of the secret.
    pub mac: String,
}

impl EnrollReply {
    /// The answer to the request whose MAC is `request_mac`, signed.
    pub fn new(key: &[u8; 32], request_mac: &str, cert_pem: String, ca_pem: String) -> EnrollReply {
        EnrollReply {
            mac: Self::tag(key, request_mac, &cert_pem, &ca_pem),
            cert_pem,
            ca_pem,
        }
    }

    fn tag(key: &[u8; 32], request_mac: &str, cert: &str, ca: &str) -> String {
        keyed(
            key,
            &[
                b"tessera enrolled v1",
                request_mac.as_bytes(),
                cert.as_bytes(),
                ca.as_bytes(),
            ],
        )
    }

    /// Whether it answers the request whose MAC is `request_mac` and comes from a holder
    /// of `key`.
    pub fn is_authentic(&self, key: &[u8; 32], request_mac: &str) -> bool {
        same_mac(
            &Self::tag(key, request_mac, &self.cert_pem, &self.ca_pem),
            &self.mac,
        )
    }
}

/// A node's request to join the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Its Raft id.
    pub id: NodeId,
    /// Its Raft address.
    pub addr: String,
    /// Its clock, ms since the epoch (requests older than 30 s are refused).
    pub sent_ms: u64,
    /// blake3 keyed hash of id, address and time under the join key, hex.
    pub mac: String,
}

impl JoinRequest {
    fn tag(key: &[u8; 32], id: NodeId, addr: &str, sent_ms: u64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(b"tessera join v1\0");
        h.update(&id.to_le_bytes());
        h.update(addr.as_bytes());
        h.update(b"\0");
        h.update(&sent_ms.to_le_bytes());
        h.finalize()
    }

    /// A signed request.
    pub fn new(key: &[u8; 32], id: NodeId, addr: &str, sent_ms: u64) -> JoinRequest {
        JoinRequest {
            id,
            addr: addr.to_string(),
            sent_ms,
            mac: Self::tag(key, id, addr, sent_ms).to_hex().to_string(),
        }
    }

    /// Checks the signature and freshness.
    pub fn verify(&self, key: &[u8; 32], now_ms: u64) -> Result<(), AuthError> {
        let got = blake3::Hash::from_hex(&self.mac).map_err(|_| AuthError::Malformed("join"))?;
        // blake3::Hash compares in constant time.
        if Self::tag(key, self.id, &self.addr, self.sent_ms) != got {
            return Err(AuthError::Forged("join"));
        }
        fresh(self.sent_ms, now_ms, "join")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];
    const OTHER: [u8; 32] = [9; 32];

    #[test]
    fn a_join_request_verifies_only_under_its_key_and_while_fresh() {
        let r = JoinRequest::new(&KEY, 4, "127.0.0.1:7000", 100_000);
        assert_eq!(r.verify(&KEY, 100_000 + FRESH_MS), Ok(()));
        assert_eq!(r.verify(&OTHER, 100_000), Err(AuthError::Forged("join")));
        assert_eq!(
            r.verify(&KEY, 100_000 + FRESH_MS + 1),
            Err(AuthError::Stale("join"))
        );
        let mut moved = r.clone();
        moved.addr = "127.0.0.1:7001".into();
        assert_eq!(moved.verify(&KEY, 100_000), Err(AuthError::Forged("join")));
        let mut garbled = r;
        garbled.mac = "not hex".into();
        assert_eq!(
            garbled.verify(&KEY, 100_000),
            Err(AuthError::Malformed("join"))
        );
    }

    #[test]
    fn an_enrollment_and_its_answer_are_bound_to_the_key_and_each_other() {
        let ip: std::net::IpAddr = "10.0.0.4".parse().unwrap();
        let r = EnrollRequest::new(&KEY, 4, "csr".into(), &[ip], 100_000);
        assert_eq!(r.verify(&KEY, 100_000), Ok(()));
        assert_eq!(
            r.verify(&OTHER, 100_000),
            Err(AuthError::Forged("enrollment"))
        );
        assert_eq!(
            r.verify(&KEY, 100_000 - FRESH_MS - 1),
            Err(AuthError::Stale("enrollment"))
        );
        let mut widened = r.clone();
        widened.ips.push("10.0.0.5".parse().unwrap());
        assert_eq!(
            widened.verify(&KEY, 100_000),
            Err(AuthError::Forged("enrollment"))
        );

        let a = EnrollReply::new(&KEY, &r.mac, "cert".into(), "ca".into());
        assert!(a.is_authentic(&KEY, &r.mac));
        assert!(!a.is_authentic(&OTHER, &r.mac));
        let another = EnrollRequest::new(&KEY, 5, "csr".into(), &[ip], 100_000);
        assert!(!a.is_authentic(&KEY, &another.mac));
        let mut swapped = a;
        swapped.ca_pem = "another ca".into();
        assert!(!swapped.is_authentic(&KEY, &r.mac));
    }
}
