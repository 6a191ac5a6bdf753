//! A fake replica of the cluster, for tests of a primary's store: it acknowledges every
//! fence, write, zeroes, trim, flush and `Unsettled` without storing anything, hands
//! any other request to the test, and tells the test each connection a fence came
//! through (the primary's link, on which a replica opens streams of its own).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tessera_pki::ClusterCa;
use tessera_replication::wire::{self, Decoder, Message};
use tokio::sync::mpsc;

use super::write_node_creds;

/// The answer to a request the fake does not acknowledge by itself (`None`: the stream
/// ends).
pub type Answer = Arc<dyn Fn(Message) -> Option<Message> + Send + Sync>;

/// Starts the fake replica with node certificate `id` of the cluster of `ca`: its
/// address, and the connections fenced through.
pub async fn fake_replica(
    root: &Path,
    ca: &ClusterCa,
    id: &str,
    other: Answer,
) -> (SocketAddr, mpsc::UnboundedReceiver<quinn::Connection>) {
    let tls = root.join(format!("{id}-tls"));
    write_node_creds(&tls, ca, id);
    let creds = tessera_store::tls::read_creds(&tls).unwrap().unwrap();
    let cfg = tessera_store::repl::quic::server_config(&tls, &creds).unwrap();
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let (tx, other) = (tx.clone(), other.clone());
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let stream = Stream {
                        conn: conn.clone(),
                        fenced: tx.clone(),
                        other: other.clone(),
                    };
                    tokio::spawn(stream.serve(send, recv));
                }
            });
        }
    });
    (addr, rx)
}

struct Stream {
    conn: quinn::Connection,
    fenced: mpsc::UnboundedSender<quinn::Connection>,
    other: Answer,
}

impl Stream {
    async fn serve(self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let mut d = Decoder::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let msg = loop {
                match d.next_message() {
                    Ok(Some(m)) => break m,
                    Ok(None) => {}
                    Err(_) => return,
                }
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        if d.push(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            };
            let reply = match msg {
                Message::Fence { .. } => {
                    let _ = self.fenced.send(self.conn.clone());
                    Message::Reply {
                        seq: 0,
                        result: Ok(()),
                    }
                }
                Message::Write { seq, .. }
                | Message::WriteZeroes { seq, .. }
                | Message::Trim { seq, .. }
                | Message::Flush { seq, .. } => Message::Reply {
                    seq,
                    result: Ok(()),
                },
                Message::Unsettled { request, .. } => Message::UnsettledReply {
                    request,
                    result: Ok(Vec::new()),
                },
                other => match (self.other)(other) {
                    Some(m) => m,
                    None => return,
                },
            };
            if send
                .write_all(&wire::encode(&reply).unwrap())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Store `node1` holding volume `v` of `size` bytes as its primary in generation 2, with
/// the fake replica `node` at `addr` as its one in-sync replica, and `data` written from
/// offset 0 through its NBD export by `nbdcopy` (flushed). Blocking.
pub fn primary_over_fake(
    root: &Path,
    ca: &ClusterCa,
    node: &str,
    addr: SocketAddr,
    size: u64,
    data: &[u8],
) -> super::Node {
    let n1 = super::Node::start(root, "node1", ca);
    n1.create("v", size);
    let role: tessera_store_admin::ReplicationRole = serde_json::from_value(serde_json::json!({
        "type": "primary",
        "replicas": [tessera_store_admin::ReplicaPeer {
            node: node.into(),
            addr: addr.to_string(),
        }],
        "timeout_ms": 1500,
        "cluster_wait_ms": 1000,
    }))
    .unwrap();
    n1.admin(tessera_store_admin::AdminOp::SetReplication {
        volume: "v".into(),
        generation: 2,
        role,
    })
    .unwrap();
    let src = root.join("data.img");
    std::fs::write(&src, data).unwrap();
    super::run(
        std::process::Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(n1.uri("v")),
    );
    n1
}
