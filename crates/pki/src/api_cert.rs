//! A certificate of the operator's own for the REST API and web console (instead of the
//! cluster CA's node certificate): checking an upload before it is used (PEM that parses,
//! a key that matches the leaf, a leaf valid now, a chain in order), describing it, and
//! choosing per TLS connection which certificate to present (the uploaded one for the
//! names it covers, the node's own for everything else).

use std::sync::{Arc, RwLock};

use rustls::crypto::ring::default_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why an uploaded certificate or key is refused, in words for the operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct BadCertificate(pub String);

fn bad(msg: impl Into<String>) -> BadCertificate {
    BadCertificate(msg.into())
}

/// What an operator sees of an installed certificate (never its key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The leaf's subject, as text.
    pub subject: String,
    /// The leaf's issuer, as text.
    pub issuer: String,
    /// The DNS names (and IP addresses, as text) the leaf is for.
    pub names: Vec<String>,
    /// Valid from / until (seconds since the epoch).
    pub not_before_s: i64,
    /// Valid until (seconds since the epoch).
    pub not_after_s: i64,
    /// SHA-256 of the leaf's DER, hex with colons (as browsers show it).
    pub sha256: String,
    /// Certificates in the chain, the leaf included.
    pub chain_len: usize,
}

/// A checked certificate: ready to serve.
pub struct Checked {
    /// The chain and its key, for rustls.
    pub key: Arc<CertifiedKey>,
    /// What it is.
    pub info: CertificateInfo,
}

/// Checks `chain_pem` (the leaf first, then each issuer in order; the root may be left
/// out) and `key_pem` (PKCS#8, PKCS#1 or SEC1) at time `now_s` (seconds since the epoch).
/// The answer names the first problem found.
pub fn check(chain_pem: &str, key_pem: &str, now_s: i64) -> Result<Checked, BadCertificate> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("cert_pem: not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(bad(
            "cert_pem: no certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    if chain.len() > 8 {
        return Err(bad(
            "cert_pem: at most 8 certificates (the leaf and its issuers)",
        ));
    }
    let parsed: Vec<X509Certificate> = chain
        .iter()
        .enumerate()
        .map(|(i, c)| {
            X509Certificate::from_der(c.as_ref())
                .map(|(_, x)| x)
                .map_err(|e| {
                    bad(format!(
                        "cert_pem: certificate {} does not parse: {e}",
                        i + 1
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let leaf = &parsed[0];
    let (nb, na) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    if na <= now_s {
        return Err(bad(format!(
            "cert_pem: the certificate expired on {}",
            leaf.validity().not_after
        )));
    }
    if nb > now_s {
        return Err(bad(format!(
            "cert_pem: the certificate is not valid before {}",
            leaf.validity().not_before
        )));
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        let (child, issuer) = (&pair[0], &pair[1]);
        let order = "the chain must be the leaf first, then each certificate's issuer";
        if child.issuer() != issuer.subject() {
            return Err(bad(format!(
                "cert_pem: certificate {} (subject {}) was issued by {}, but certificate {} is {}: {order}",
                i + 1,
                child.subject(),
                child.issuer(),
                i + 2,
                issuer.subject()
            )));
        }
        if child.verify_signature(Some(issuer.public_key())).is_err() {
            return Err(bad(format!(
                "cert_pem: certificate {}'s signature does not verify with certificate {}'s key: {order}",
                i + 1,
                i + 2
            )));
        }
    }
    let names = names(leaf);
    if names.is_empty() {
        return Err(bad(
            "cert_pem: the certificate names no DNS name or address (subjectAltName): browsers would refuse it",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| bad(format!("key_pem: not a PEM private key: {e}")))?;
    let signing = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(format!("key_pem: unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain.clone(), signing);
    certified
        .keys_match()
        .map_err(|_| bad("key_pem: the private key does not belong to the certificate (the first one of cert_pem)"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, chain[0].as_ref());
    let sha256 = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(Checked {
        key: Arc::new(certified),
        info: CertificateInfo {
            subject: leaf.subject().to_string(),
            issuer: leaf.issuer().to_string(),
            names,
            not_before_s: nb,
            not_after_s: na,
            sha256,
            chain_len: chain.len(),
        },
    })
}

/// The names a certificate covers: its subjectAltName DNS names (lower case) and
/// addresses.
fn names(c: &X509Certificate) -> Vec<String> {
    let Ok(Some(san)) = c.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv4Addr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Whether `host` (a TLS server name) is one of `names`; `*.example.com` covers one label.
pub fn covers(names: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    names.iter().any(|n| {
        if let Some(rest) = n.strip_prefix("*.") {
            host.split_once('.')
                .is_some_and(|(label, tail)| !label.is_empty() && tail == rest)
        } else {
            *n == host
        }
    })
}

/// Chooses the certificate of each TLS connection: an installed certificate for a server
/// name (SNI) it covers, else the node's own (the cluster CA's), so clients that connect
/// by address or by a node name (the CLI, peers, tests) keep the certificate they trust.
pub struct SwappableCert {
    fallback: Arc<dyn ResolvesServerCert>,
    installed: RwLock<Option<(Arc<CertifiedKey>, Vec<String>)>>,
}

impl std::fmt::Debug for SwappableCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwappableCert").finish_non_exhaustive()
    }
}

impl SwappableCert {
    /// Presents what `fallback` resolves until [`SwappableCert::install`].
    pub fn new(fallback: Arc<dyn ResolvesServerCert>) -> SwappableCert {
        SwappableCert {
            fallback,
            installed: RwLock::new(None),
        }
    }

    /// From the next handshake on, presents `c` for the names it covers (`None`: the
    /// node's own certificate for every name again).
    pub fn install(&self, c: Option<&Checked>) {
        *self.installed.write().unwrap_or_else(|p| p.into_inner()) =
            c.map(|c| (c.key.clone(), c.info.names.clone()));
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name() {
            let installed = self.installed.read().unwrap_or_else(|p| p.into_inner());
            if let Some((key, names)) = installed.as_ref() {
                if covers(names, sni) {
                    return Some(key.clone());
                }
            }
        }
        self.fallback.resolve(hello)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{check, covers};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let k = KeyPair::generate().unwrap();
        (p.self_signed(&k).unwrap(), k)
    }

    fn leaf(
        names: &[&str],
        issuer: &(rcgen::Certificate, KeyPair),
        days: (i64, i64),
    ) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        let k = KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &issuer.0, &issuer.1).unwrap();
        (c.pem(), k.serialize_pem())
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn a_good_chain_is_described_and_bad_ones_named() {
        let root = ca("Test Root");
        let (cert, key) = leaf(
            &["api.example.test", "*.nodes.example.test"],
            &root,
            (-1, 30),
        );
        let chain = format!("{cert}{}", root.0.pem());
        let ok = check(&chain, &key, now()).unwrap();
        assert_eq!(ok.info.names, ["api.example.test", "*.nodes.example.test"]);
        assert_eq!(ok.info.chain_len, 2);
        assert_eq!(ok.info.sha256.len(), 32 * 3 - 1);
        assert!(ok.info.issuer.contains("Test Root"), "{}", ok.info.issuer);
        // Leaf alone is fine too.
        check(&cert, &key, now()).unwrap();

        let e = |chain: &str, key: &str| check(chain, key, now()).err().unwrap().0;
        assert!(e("garbage", &key).contains("no certificate"));
        assert!(e(&chain, "garbage").starts_with("key_pem: not a PEM private key"));
        let (_, other_key) = leaf(&["x.test"], &root, (-1, 30));
        assert!(e(&chain, &other_key).contains("does not belong"));
        let (old, old_key) = leaf(&["api.example.test"], &root, (-30, -1));
        assert!(e(&old, &old_key).contains("expired"));
        let (soon, soon_key) = leaf(&["api.example.test"], &root, (2, 30));
        assert!(e(&soon, &soon_key).contains("not valid before"));
        // Issuer before leaf, and a chain with another CA's certificate.
        let reversed = format!("{}{cert}", root.0.pem());
        assert!(e(&reversed, &key).contains("issued by"));
        let stranger = ca("Test Root");
        let wrong = format!("{cert}{}", stranger.0.pem());
        assert!(e(&wrong, &key).contains("signature does not verify"));
        let (none, none_key) = leaf(&[], &root, (-1, 30));
        assert!(e(&none, &none_key).contains("subjectAltName"));
    }

    #[test]
    fn names_cover_hosts_exactly_or_one_wildcard_label() {
        let names = vec![
            "api.example.test".to_string(),
            "*.nodes.example.test".to_string(),
        ];
        assert!(covers(&names, "api.example.test"));
        assert!(covers(&names, "API.Example.Test."));
        assert!(covers(&names, "n1.nodes.example.test"));
        assert!(!covers(&names, "a.b.nodes.example.test"));
        assert!(!covers(&names, "nodes.example.test"));
        assert!(!covers(&names, "other.example.test"));
    }
}
