//! One replica's link task: a QUIC stream kept open to it, reconnecting after a loss.
//! Streams the replica opens on the link's connection ask for repairs of its copy
//! (`serve_replica.rs`).

use std::sync::Arc;

use tessera_replication::primary::ReplicaId;
use tessera_replication::wire::Decoder;
use tokio::sync::mpsc;

use super::super::quic::ReplEndpoint;
use super::serve_replica::{self, ServeReplicas};
use super::{Input, Peer, RECONNECT};

/// Queued frames are joined into one write up to this many bytes.
const BATCH_MAX: usize = 256 << 10;

/// Keeps one stream to replica `r` open, feeding what it reads to the driver and
/// writing what the driver sends; reconnects after a loss.
pub(super) async fn link(
    ep: Arc<ReplEndpoint>,
    r: ReplicaId,
    peer: Peer,
    driver: mpsc::UnboundedSender<Input>,
    restart: Arc<tokio::sync::Notify>,
    serving: Arc<ServeReplicas>,
) {
    let mut told = String::new();
    loop {
        let stream = match ep.connect(&peer.node, peer.addr).await {
            Ok(conn) => match conn.open_bi().await {
                Ok(s) => Ok((conn, s)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let (conn, (mut send, mut recv)) = match stream {
            Ok(s) => s,
            Err(e) => {
                if e != told {
                    tracing::warn!(node = %peer.node, addr = %peer.addr, error = %e, "cannot reach a replica; retrying");
                    told = e;
                }
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        told.clear();
        tracing::info!(node = %peer.node, addr = %peer.addr, "replica connected");
        let (tx, mut frames) = mpsc::unbounded_channel::<Vec<u8>>();
        if driver.send(Input::Connected { from: r, tx }).is_err() {
            return;
        }
        let writer = tokio::spawn(async move {
            while let Some(mut f) = frames.recv().await {
                // Small frames queued meanwhile go in the same write (one wake-up of the
                // connection instead of one per 4K write at queue depth).
                while f.len() < BATCH_MAX {
                    match frames.try_recv() {
                        Ok(next) if f.len() + next.len() <= BATCH_MAX => f.extend_from_slice(&next),
                        Ok(next) => {
                            if send.write_all(&f).await.is_err() {
                                return;
                            }
                            f = next;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if send.write_all(&f).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 256 << 10];
        let why = 'read: loop {
            loop {
                match decoder.next_message() {
                    Ok(Some(msg)) => {
                        if driver.send(Input::Received { from: r, msg }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => break 'read format!("bad frame from the replica: {e}"),
                }
            }
            // Whatever has arrived, up to the buffer: replies are small, many in one read.
            let want = buf.len();
            let read = tokio::select! {
                read = recv.read(&mut buf[..want]) => read,
                _ = restart.notified() => break "a new stream for the replica's rejoin".to_string(),
                // Both cancel-safe: a stream is taken only when this branch wins.
                Ok((their_send, their_recv)) = conn.accept_bi() => {
                    tokio::spawn(serve_replica::serve(
                        serving.clone(),
                        peer.node.clone(),
                        their_send,
                        their_recv,
                    ));
                    continue;
                }
            };
            match read {
                Ok(Some(n)) => {
                    if let Err(e) = decoder.push(&buf[..n]) {
                        break format!("bad frame from the replica: {e}");
                    }
                }
                Ok(None) => break "the replica ended the stream".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        writer.abort();
        conn.close(0u32.into(), b"stream lost");
        tracing::warn!(node = %peer.node, reason = %why, "replica stream lost");
        if driver.send(Input::Disconnected { from: r }).is_err() {
            return;
        }
        tokio::time::sleep(RECONNECT).await;
    }
}
