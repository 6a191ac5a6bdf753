//! Real TLS handshakes over loopback between nodes holding certificates from the cluster
//! CA, and with impostors: a certificate from another CA, no certificate, the wrong node.

// Helpers of these tests unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use rustls_pki_types::ServerName;
use tessera_pki::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn node(ca: &ClusterCa, id: &str) -> NodeCredentials {
    let (key_pem, csr) = node_key_and_request(id).unwrap();
    NodeCredentials {
        key_pem,
        cert_pem: ca.issue(&csr, id).unwrap(),
    }
}

/// What each side of one exchange saw: `Ok` when it completed the handshake and got the
/// other side's message.
struct Outcome {
    client: std::io::Result<()>,
    server: std::io::Result<()>,
}

impl Outcome {
    fn talked(&self) -> bool {
        self.client.is_ok() && self.server.is_ok()
    }
}

/// The TLS error behind a failed side, if a TLS error it was.
fn tls_error(side: &std::io::Result<()>) -> Option<&rustls::Error> {
    side.as_ref()
        .err()?
        .get_ref()?
        .downcast_ref::<rustls::Error>()
}

fn is_cert_error(side: &std::io::Result<()>, want: fn(&rustls::CertificateError) -> bool) -> bool {
    matches!(tls_error(side), Some(rustls::Error::InvalidCertificate(e)) if want(e))
}

/// Runs one server accepting one connection and a client sending "ping!" to it, which
/// the server answers with "pong!".
async fn exchange(
    server: (NodeCredentials, String),
    client: (NodeCredentials, String),
    connect_to: &str,
) -> Outcome {
    let sc = Arc::new(server_config(&server.0, &server.1).unwrap());
    let cc = Arc::new(client_config(&client.0, &client.1).unwrap());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(sc).accept(s).await?;
        let mut b = [0u8; 5];
        tls.read_exact(&mut b).await?;
        assert_eq!(&b, b"ping!");
        tls.write_all(b"pong!").await?;
        tls.flush().await
    });
    let name = ServerName::try_from(node_dns_name(connect_to).unwrap()).unwrap();
    let s = TcpStream::connect(addr).await.unwrap();
    let client = async {
        let mut tls = tokio_rustls::TlsConnector::from(cc)
            .connect(name, s)
            .await?;
        tls.write_all(b"ping!").await?;
        tls.flush().await?;
        let mut b = [0u8; 5];
        tls.read_exact(&mut b).await?;
        assert_eq!(&b, b"pong!");
        Ok(())
    }
    .await;
    let server = srv.await.unwrap();
    Outcome { client, server }
}

#[tokio::test]
async fn nodes_of_one_cluster_talk_and_impostors_are_refused() {
    let ca = ClusterCa::mint("c1").unwrap();
    let other = ClusterCa::mint("c2").unwrap();
    let a = || node(&ca, "node-a");
    let b = || node(&ca, "node-b");

    let members = exchange(
        (a(), ca.cert_pem.clone()),
        (b(), ca.cert_pem.clone()),
        "node-a",
    )
    .await;
    assert!(
        members.talked(),
        "two members must talk: client {:?}, server {:?}",
        members.client,
        members.server
    );
    // A client whose certificate comes from another cluster's CA, though it trusts ours
    // (the CA certificate is no secret): the server refuses it for its issuer.
    let impostor = exchange(
        (a(), ca.cert_pem.clone()),
        (node(&other, "node-b"), ca.cert_pem.clone()),
        "node-a",
    )
    .await;
    assert!(
        is_cert_error(&impostor.server, |e| matches!(
            e,
            rustls::CertificateError::UnknownIssuer
        )),
        "{:?}",
        impostor.server
    );
    assert!(impostor.client.is_err());
    // A node of another cluster altogether: it refuses our server for its issuer, and
    // the server hears so.
    let foreign = exchange(
        (a(), ca.cert_pem.clone()),
        (node(&other, "node-b"), other.cert_pem.clone()),
        "node-a",
    )
    .await;
    assert!(
        is_cert_error(&foreign.client, |e| matches!(
            e,
            rustls::CertificateError::UnknownIssuer
        )),
        "{:?}",
        foreign.client
    );
    assert!(
        matches!(
            tls_error(&foreign.server),
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))
        ),
        "{:?}",
        foreign.server
    );
    // A server from another cluster: the client refuses it for its issuer.
    let foreign_server = exchange(
        (node(&other, "node-a"), other.cert_pem.clone()),
        (b(), ca.cert_pem.clone()),
        "node-a",
    )
    .await;
    assert!(
        is_cert_error(&foreign_server.client, |e| matches!(
            e,
            rustls::CertificateError::UnknownIssuer
        )),
        "{:?}",
        foreign_server.client
    );
    // The right cluster but the wrong node: the client meant node-c, and refuses node-a's
    // certificate for its name.
    let wrong_node = exchange(
        (a(), ca.cert_pem.clone()),
        (b(), ca.cert_pem.clone()),
        "node-c",
    )
    .await;
    assert!(
        is_cert_error(&wrong_node.client, |e| matches!(
            e,
            rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. }
        )),
        "{:?}",
        wrong_node.client
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = ClusterCa::mint("c1").unwrap();
    let (key_pem, csr) = node_key_and_request("node-a").unwrap();
    let server = NodeCredentials {
        key_pem,
        cert_pem: ca.issue(&csr, "node-a").unwrap(),
    };
    let sc = Arc::new(server_config(&server, &ca.cert_pem).unwrap());
    let mut roots = rustls::RootCertStore::empty();
    for c in <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(
        ca.cert_pem.as_bytes(),
    ) {
        roots.add(c.unwrap()).unwrap();
    }
    let cc = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio_rustls::TlsAcceptor::from(sc)
            .accept(s)
            .await
            .map(|_| ())
    });
    let s = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(node_dns_name("node-a").unwrap()).unwrap();
    // TLS 1.3 lets the client finish first; the server's verdict is what counts.
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(cc).connect(name, s).await {
        let _ = tls.write_all(b"x").await;
        let mut b = [0u8; 1];
        assert!(
            tls.read_exact(&mut b).await.is_err(),
            "an anonymous client got data"
        );
    }
    let verdict = srv.await.unwrap();
    assert!(
        matches!(
            verdict
                .as_ref()
                .err()
                .and_then(|e| e.get_ref())
                .and_then(|e| e.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "the server did not refuse the client for presenting no certificate: {verdict:?}"
    );
}

#[test]
fn the_ca_decides_the_name_not_the_request() {
    let ca = ClusterCa::mint("c1").unwrap();
    // A request claiming another node's name is issued for the id the CA was told.
    let (_, csr) = node_key_and_request("node-b").unwrap();
    let pem = ca.issue(&csr, "node-a").unwrap();
    let text = String::from_utf8_lossy(
        &<rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(
            pem.as_bytes(),
        )
        .next()
        .unwrap()
        .unwrap(),
    )
    .into_owned();
    assert!(text.contains("node-a.node.tessera"));
    assert!(!text.contains("node-b.node.tessera"));
    assert!(matches!(
        node_dns_name("bad name"),
        Err(PkiError::BadNodeId(_))
    ));
    // Not a request at all: refused as such (the same CA issued from a real one above).
    assert!(matches!(
        ca.issue("not a csr", "node-a"),
        Err(PkiError::Cert(_))
    ));
}

#[tokio::test]
async fn a_user_client_certificate_is_accepted_as_a_client_of_its_cluster_only() {
    let ca = ClusterCa::mint("c1").unwrap();
    let (cert_pem, key_pem) = ca.issue_client("alice").unwrap();
    let user = NodeCredentials { key_pem, cert_pem };
    let talked = exchange(
        (node(&ca, "node-a"), ca.cert_pem.clone()),
        (user, ca.cert_pem.clone()),
        "node-a",
    )
    .await;
    assert!(
        talked.talked(),
        "a user certificate of the cluster CA must be accepted as a TLS client: client {:?}, server {:?}",
        talked.client,
        talked.server
    );
    let other = ClusterCa::mint("c2").unwrap();
    let (cert_pem, key_pem) = other.issue_client("mallory").unwrap();
    let refused = exchange(
        (node(&ca, "node-a"), ca.cert_pem.clone()),
        (NodeCredentials { key_pem, cert_pem }, ca.cert_pem.clone()),
        "node-a",
    )
    .await;
    assert!(
        !refused.talked(),
        "a user certificate of another CA was accepted"
    );
    assert!(
        ca.issue_client("").is_err(),
        "an empty user name was certified"
    );
}
