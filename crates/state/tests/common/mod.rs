//! Helpers shared by the Raft tests: free ports, plain members, waiting for a leader or
//! a value.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_state::network::{self, Tls};
use tessera_state::{Command, Node};

/// A free port below the kernel's ephemeral range (32768+): a port from that range, once
/// released for a node's restart, can be taken meanwhile as the source port of some
/// other test's outgoing connection.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::SeqCst) % 10_000;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
}

/// Starts plain-TCP members (no TLS, no join key) with ids and addresses `addrs`, each in
/// `dir/n<id>`.
pub async fn start_plain(dir: &std::path::Path, addrs: &BTreeMap<u64, SocketAddr>) -> Vec<Node> {
    let mut nodes = Vec::new();
    for (id, addr) in addrs {
        nodes.push(
            Node::start(*id, *addr, &dir.join(format!("n{id}")), None, None)
                .await
                .unwrap(),
        );
    }
    nodes
}

pub async fn wait_leader(nodes: &[&Node]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders: Vec<Option<u64>> = nodes
            .iter()
            .map(|n| n.raft.metrics().borrow().current_leader)
            .collect();
        if let Some(Some(l)) = leaders.first() {
            if leaders.iter().all(|x| *x == Some(*l)) && nodes.iter().any(|n| n.id == *l) {
                return *l;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_value(n: &Node, key: &str, want: serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = n
            .state
            .read(|t| t.get("nodes").and_then(|t| t.get(key)).cloned());
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never got {key}={want} (has {got:?})",
            n.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `n` has `want` at `table`/`key`.
pub async fn wait_value_in(n: &Node, table: &str, key: &str, want: serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = n
            .state
            .read(|t| t.get(table).and_then(|t| t.get(key)).cloned());
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{table}/{key} never became {want}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn put(key: &str, v: serde_json::Value) -> Command {
    Command::Put {
        table: "nodes".into(),
        key: key.into(),
        value: v,
    }
}

/// Credentials for node `id` issued directly by `ca` (what the minting node does).
pub fn own_tls(ca: &tessera_pki::ClusterCa, id: u64) -> Tls {
    let (key_pem, csr) = tessera_pki::node_key_and_request(&network::cert_name(id)).unwrap();
    let creds = tessera_pki::NodeCredentials {
        key_pem,
        cert_pem: ca.issue(&csr, &network::cert_name(id)).unwrap(),
    };
    Tls::new(&creds, &ca.cert_pem).unwrap()
}
