//! The cluster's certificate authority: minting it at formation, issuing node
//! certificates from certificate requests (a node's private key never leaves it), and the
//! mutual-TLS configurations node-to-node traffic uses: a server accepts only clients with
//! a certificate from the cluster CA, and a client accepts only a server whose certificate
//! the cluster CA issued for the node it meant to reach.
//!
//! It holds no state of its own: where the CA key lives is the caller's decision (tesserad
//! keeps it in the replicated state; docs/security.md says how it is protected there).

#![forbid(unsafe_code)]

use std::sync::Arc;

pub mod api_cert;
pub mod seal;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::ring::default_provider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Key or certificate generation or parsing.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// PEM text that does not hold what it should.
    #[error("PEM: {0}")]
    Pem(String),
    /// A node name that cannot be a DNS name.
    #[error("invalid node id {0:?}")]
    BadNodeId(String),
    /// Sealing or opening a secret failed.
    #[error("seal: {0}")]
    Seal(String),
}

/// The DNS name a node's certificate is issued for (and clients verify).
pub fn node_dns_name(node_id: &str) -> Result<String, PkiError> {
    if node_id.is_empty()
        || node_id.len() > 63
        || !node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(PkiError::BadNodeId(node_id.to_string()));
    }
    Ok(format!("{node_id}.node.tessera"))
}

/// The cluster CA: certificate and private key, as PEM.
#[derive(Clone)]
pub struct ClusterCa {
    /// CA certificate (distributed to every node).
    pub cert_pem: String,
    /// CA private key (kept secret by the cluster).
    pub key_pem: String,
}

impl ClusterCa {
    /// Mints a new CA for the cluster `cluster_id` (valid 20 years).
    pub fn mint(cluster_id: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(
            DnType::CommonName,
            format!("Tessera cluster {cluster_id} CA"),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let cert = p.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a node certificate from the node's request. Only the public key is taken
    /// from the request: the name, usages and validity are the CA's.
    pub fn issue(&self, csr_pem: &str, node_id: &str) -> Result<String, PkiError> {
        self.issue_with_ips(csr_pem, node_id, &[])
    }

    /// Like [`ClusterCa::issue`], also valid for these IP addresses (the node's
    /// management address, so clients of its HTTPS API can check it).
    pub fn issue_with_ips(
        &self,
        csr_pem: &str,
        node_id: &str,
        ips: &[std::net::IpAddr],
    ) -> Result<String, PkiError> {
        let dns = node_dns_name(node_id)?;
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let ca = CertificateParams::from_ca_cert_pem(&self.cert_pem)?.self_signed(&ca_key)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::CommonName, node_id);
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::DnsName(dns.try_into()?)];
        p.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2045, 1, 1);
        csr.params = p;
        Ok(csr.signed_by(&ca, &ca_key)?.pem())
    }
    /// Makes a key and a client-only certificate for user `user` (NBD over TLS: the
    /// store accepts any certificate of the cluster CA). The key is generated here, by the
    /// node holding the CA, and handed to the user over the authenticated HTTPS API.
    /// Returns `(cert_pem, key_pem)`.
    pub fn issue_client(&self, user: &str) -> Result<(String, String), PkiError> {
        if user.is_empty() || user.len() > 64 || user.chars().any(|c| c.is_control()) {
            return Err(PkiError::BadNodeId(user.to_string()));
        }
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let ca = CertificateParams::from_ca_cert_pem(&self.cert_pem)?.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::OrganizationalUnitName, "user");
        dn.push(DnType::CommonName, user);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        // qemu refuses a client certificate without key encipherment, whatever the key.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Short-lived compared with node certificates: there is no revocation list, so
        // an exported credential stops working by expiring.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = time_from_unix(now + CLIENT_CERT_DAYS * 86_400);
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// How long a user's client certificate ([`ClusterCa::issue_client`]) is valid.
pub const CLIENT_CERT_DAYS: i64 = 30;

fn time_from_unix(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

// A node's key pair and (once issued) certificate.
pub struct NodeCredentials {
    /// Private key, PEM (never leaves the node).
    pub key_pem: String,
    /// Certificate from the cluster CA, PEM.
    pub cert_pem: String,
}

/// Makes a node key and the certificate request to send to the CA.
pub fn node_key_and_request(node_id: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![node_dns_name(node_id)?])?;
    p.distinguished_name.push(DnType::CommonName, node_id);
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let v: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let v = v.map_err(|e| PkiError::Pem(e.to_string()))?;
    if v.is_empty() {
        return Err(PkiError::Pem("no certificate".into()));
    }
    Ok(v)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem(e.to_string()))
}

fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(PkiError::Tls)?;
    }
    Ok(roots)
}

/// TLS server side of node-to-node traffic: presents this node's certificate and requires
/// a client certificate issued by the cluster CA.
pub fn server_config(node: &NodeCredentials, ca_pem: &str) -> Result<ServerConfig, PkiError> {
    let provider = Arc::new(default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .build()
            .map_err(|e| PkiError::Pem(format!("client verifier: {e}")))?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&node.cert_pem)?, key(&node.key_pem)?)?)
}

/// Like [`server_config`], but a client without a certificate may also connect: such a
/// connection may only enroll (ask for a certificate with a request authenticated by the
/// join secret). The caller checks the peer's certificates before serving anything else.
pub fn server_config_allowing_enrollment(
    node: &NodeCredentials,
    ca_pem: &str,
) -> Result<ServerConfig, PkiError> {
    let provider = Arc::new(default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::Pem(format!("client verifier: {e}")))?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&node.cert_pem)?, key(&node.key_pem)?)?)
}

/// The client side of enrollment: a node without a certificate does not know the cluster
/// CA yet, so it cannot check the server's certificate. TLS here only hides the exchange;
/// its authenticity comes from the join-secret MAC on the reply, which the caller must
/// verify before trusting anything in it.
pub fn enrollment_client_config() -> Result<ClientConfig, PkiError> {
    let provider = Arc::new(default_provider());
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(UncheckedServer(provider)))
        .with_no_client_auth())
}

/// Accepts any server certificate but still checks the handshake signatures (so the
/// server holds the key of the certificate it shows).
#[derive(Debug)]
struct UncheckedServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for UncheckedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The HTTPS side of a node's REST API: its cluster certificate, no client certificates
/// (API clients authenticate with tokens), HTTP/1.1.
pub fn api_server_config(node: &NodeCredentials) -> Result<ServerConfig, PkiError> {
    let mut c = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs(&node.cert_pem)?, key(&node.key_pem)?)?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

/// TLS client side: trusts only the cluster CA and presents this node's certificate.
/// Connect with the server name [`node_dns_name`] of the node meant.
pub fn client_config(node: &NodeCredentials, ca_pem: &str) -> Result<ClientConfig, PkiError> {
    Ok(
        ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(ca_pem)?)
            .with_client_auth_cert(certs(&node.cert_pem)?, key(&node.key_pem)?)?,
    )
}
