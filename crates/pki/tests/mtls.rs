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

/// Runs one server accepting one connection; returns whether both sides completed the
/// handshake and exchanged a message.
async fn exchange(
    server: (NodeCredentials, String),
    client: (NodeCredentials, String),
    connect_to: &str,
) -> bool {
    let sc = Arc::new(server_config(&server.0, &server.1).unwrap());
    let cc = Arc::new(client_config(&client.0, &client.1).unwrap());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(sc).accept(s).await.ok()?;
        let mut b = [0u8; 5];
        tls.read_exact(&mut b).await.ok()?;
        tls.write_all(b"pong!").await.ok()?;
        tls.flush().await.ok()?;
        Some(b)
    });
    let name = ServerName::try_from(node_dns_name(connect_to).unwrap()).unwrap();
    let s = TcpStream::connect(addr).await.unwrap();
    let client_ok = async {
        let mut tls = tokio_rustls::TlsConnector::from(cc)
            .connect(name, s)
            .await
            .ok()?;
        tls.write_all(b"ping!").await.ok()?;
        tls.flush().await.ok()?;
        let mut b = [0u8; 5];
        tls.read_exact(&mut b).await.ok()?;
        Some(b)
    }
    .await;
    let server_ok = srv.await.unwrap();
    client_ok == Some(*b"pong!") && server_ok == Some(*b"ping!")
}

#[tokio::test]
async fn nodes_of_one_cluster_talk_and_impostors_are_refused() {
    let ca = ClusterCa::mint("c1").unwrap();
    let other = ClusterCa::mint("c2").unwrap();
    let a = || node(&ca, "node-a");
    let b = || node(&ca, "node-b");

    assert!(
        exchange(
            (a(), ca.cert_pem.clone()),
            (b(), ca.cert_pem.clone()),
            "node-a"
        )
        .await,
        "two members must talk"
    );
    // A client whose certificate comes from another cluster's CA.
    assert!(
        !exchange(
            (a(), ca.cert_pem.clone()),
            (node(&other, "node-b"), other.cert_pem.clone()),
            "node-a"
        )
        .await
    );
    // A server from another cluster, even when the client only checks names.
    assert!(
        !exchange(
            (node(&other, "node-a"), other.cert_pem.clone()),
            (b(), ca.cert_pem.clone()),
            "node-a"
        )
        .await
    );
    // The right cluster but the wrong node: the client meant node-c.
    assert!(
        !exchange(
            (a(), ca.cert_pem.clone()),
            (b(), ca.cert_pem.clone()),
            "node-c"
        )
        .await
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
        tokio_rustls::TlsAcceptor::from(sc).accept(s).await.is_ok()
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
    assert!(
        !srv.await.unwrap(),
        "the server accepted a client without a certificate"
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
    assert!(ca.issue("not a csr", "node-a").is_err());
}
