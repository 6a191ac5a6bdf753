//! The node-to-node port's edges against one TLS member on loopback: half-open TLS
//! handshakes are capped (the oldest evicted) and closed after their deadline while a
//! member's RPCs are still served, and a removed node's certificate is answered with its
//! removal (which its transport keeps) instead of being served.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_state::network::{self, admission, Transport};
use tessera_state::{Command, Node, TransportError};
use tokio::io::AsyncReadExt;

use crate::common::{free_addr, own_tls};

fn put(table: &str, key: &str, v: serde_json::Value) -> Command {
    Command::Put {
        table: table.into(),
        key: key.into(),
        value: v,
    }
}

/// A single-member cluster (node 1) with TLS, its leader elected.
async fn one_member(ca: &tessera_pki::ClusterCa, dir: &std::path::Path) -> (Node, SocketAddr) {
    let addr = free_addr();
    let n1 = Node::start(1, addr, dir, Some([7u8; 32]), Some(own_tls(ca, 1)))
        .await
        .unwrap();
    n1.initialize(BTreeMap::from([(1, addr)])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while n1.raft.metrics().borrow().current_leader != Some(1) {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (n1, addr)
}

/// Whether the server closed `s` (end of stream or reset) within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_are_capped_and_timed_out_and_members_still_get_in() {
    let ca = tessera_pki::ClusterCa::mint("test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (n1, addr) = one_member(&ca, dir.path()).await;
    // Connections that never send a ClientHello: 20 more than the cap.
    let extra = 20;
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..admission::MAX_HANDSHAKES + extra {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The oldest ones beyond the cap are closed at once, not at their deadline.
    for (i, s) in silent.iter_mut().take(extra).enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(2)).await,
            "half-open connection {i} (beyond the cap of {}) was not closed at once",
            admission::MAX_HANDSHAKES
        );
    }
    assert!(opened.elapsed() < admission::HANDSHAKE_TIMEOUT);
    // A member's write is served while the port is full of half-open handshakes (its
    // own handshake evicts the oldest of them).
    let member = Transport::new(Some(own_tls(&ca, 1)));
    let t = Instant::now();
    member
        .forward_write(
            1,
            &addr.to_string(),
            put("nodes", "member", json!(1)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a member waited {:?} behind half-open handshakes",
        t.elapsed()
    );
    // The rest are closed by their deadline (plus a margin), not left open.
    let deadline = opened + admission::HANDSHAKE_TIMEOUT + Duration::from_secs(2);
    for (i, s) in silent.iter_mut().enumerate().skip(extra) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_within(s, left).await,
            "half-open connection {i} was still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    assert!(
        opened.elapsed() > admission::HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "half-open connections within the cap were closed before their deadline"
    );
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_told_it_was_removed() {
    let ca = tessera_pki::ClusterCa::mint("test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (n1, addr) = one_member(&ca, dir.path()).await;
    // Node 2 holds a certificate but is not a member; until it is recorded as removed it
    // is turned away without a word (as any non-member).
    let node2 = Transport::new(Some(own_tls(&ca, 2)));
    let write = || put("nodes", "from-2", json!(2));
    let r = node2
        .forward_write(1, &addr.to_string(), write(), Duration::from_secs(5))
        .await;
    assert!(matches!(r, Err(TransportError::Hangup { .. })), "{r:?}");
    assert_eq!(node2.removed(), None);
    // Recorded as removed (what DELETE /nodes/{id} does), it is told so.
    n1.write(put(
        admission::REMOVED_NODES,
        &network::cert_name(2),
        json!({"node": "two"}),
    ))
    .await
    .unwrap();
    let r = node2
        .forward_write(1, &addr.to_string(), write(), Duration::from_secs(5))
        .await;
    match r {
        Err(TransportError::Refused { message, .. }) => {
            assert!(message.contains(admission::REMOVED_WORDS), "{message}");
            assert!(message.contains("wipe"), "{message}");
        }
        other => panic!("a removed node was not told: {other:?}"),
    }
    let kept = node2.removed().expect("the transport kept the removal");
    assert!(kept.contains(&network::cert_name(2)), "{kept}");
    // Its write was not made.
    assert!(n1
        .state
        .read(|t| t.get("nodes").and_then(|n| n.get("from-2")).cloned())
        .is_none());
    // A member is still served.
    let member = Transport::new(Some(own_tls(&ca, 1)));
    member
        .forward_write(
            1,
            &addr.to_string(),
            put("nodes", "member", json!(1)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    n1.shutdown().await;
}
