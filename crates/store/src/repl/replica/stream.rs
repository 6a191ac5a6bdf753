//! The replica's side of a primary's stream: reads its frames, hands each request to the
//! service in order, and writes the answers in order, many in one write. A fence's
//! connection is noted as the way back to that volume's primary (`primary_conns.rs`).

use std::sync::Arc;

use tessera_replication::wire::{self, Decoder, Message};

use super::super::quic::{negotiated_version, peer_node, ReplEndpoint};
use super::{code, ReplicaService, READ_CHUNK};

/// Accepts connections on `ep` and serves their streams. Runs until dropped.
pub async fn serve(ep: Arc<ReplEndpoint>, service: Arc<ReplicaService>) {
    while let Some(incoming) = ep.quinn().accept().await {
        let service = service.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    service.limiter.warn("handshake", || {
                        format!("replication connection from {addr} refused: {e}")
                    });
                    return;
                }
            };
            let node = match peer_node(&conn) {
                Ok(n) => n,
                Err(e) => {
                    service.limiter.warn("handshake", || e.to_string());
                    conn.close(code::NOT_A_NODE.into(), b"not a node certificate");
                    return;
                }
            };
            tracing::debug!(%addr, %node, "replication connection");
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (service, node, conn) = (service.clone(), node.clone(), conn.clone());
                tokio::spawn(async move { serve_stream(service, node, conn, send, recv).await });
            }
        });
    }
}

async fn serve_stream(
    service: Arc<ReplicaService>,
    node: String,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // A frame of a version newer than the connection settled on is refused, as a store
    // of that version would refuse it (so a store held at an older version's wire
    // format, `--repl-max-version`, takes only what an older release could).
    let mut decoder = Decoder::speaking(negotiated_version(&conn));
    let mut buf = vec![0u8; READ_CHUNK];
    let close = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, c: u32| {
        let _ = send.reset(c.into());
        let _ = recv.stop(c.into());
    };
    // Encoded replies not yet written: the replies to every request already received go
    // out in one write, when the next read would wait (under load, one write for many).
    let mut out = Vec::new();
    // Answers in seq order, from this task and from writes applied on the blocking pool.
    let (outbox, mut answers) = tokio::sync::mpsc::unbounded_channel::<Message>();
    let encode = |m: &Message, out: &mut Vec<u8>| {
        wire::encode_into(m, out).map_err(|e| {
            tracing::error!(%node, error = %e, "could not encode a replication reply");
        })
    };
    loop {
        // Whole messages first, then a read of what has arrived, up to a chunk: many
        // small frames come in one read. An oversize length prefix is refused before more
        // than one chunk past it is read (the decoder checks it as soon as it is in).
        let msg = match decoder.next_message() {
            Ok(Some(m)) => m,
            Ok(None) => {
                let want = READ_CHUNK;
                // What has arrived already is taken without waiting (`read` is
                // cancel-safe); only before a wait do the pending replies go out.
                let ready = tokio::select! {
                    biased;
                    read = recv.read(&mut buf[..want]) => Some(read),
                    () = std::future::ready(()) => None,
                };
                let read = match ready {
                    Some(read) => read,
                    None => loop {
                        while let Ok(m) = answers.try_recv() {
                            if encode(&m, &mut out).is_err() {
                                close(&mut send, &mut recv, code::PROTOCOL);
                                return;
                            }
                        }
                        if !out.is_empty() {
                            if send.write_all(&out).await.is_err() {
                                return;
                            }
                            out.clear();
                        }
                        // Both are cancel-safe: an answer settled on the blocking pool
                        // goes out while the next request is awaited.
                        tokio::select! {
                            read = recv.read(&mut buf[..want]) => break read,
                            m = answers.recv() => {
                                if let Some(m) = m {
                                    if encode(&m, &mut out).is_err() {
                                        close(&mut send, &mut recv, code::PROTOCOL);
                                        return;
                                    }
                                }
                            }
                        }
                    },
                };
                match read {
                    Ok(Some(n)) => {
                        if let Err(e) = decoder.push(&buf[..n]) {
                            service.limiter.warn("malformed", || {
                                format!("replication stream from {node}: bad frame: {e}")
                            });
                            close(&mut send, &mut recv, code::MALFORMED);
                            return;
                        }
                        continue;
                    }
                    Ok(None) => {
                        if !decoder.at_boundary() {
                            service.limiter.warn("malformed", || {
                                format!(
                                    "replication stream from {node} ended inside a frame ({} bytes of it): dropped",
                                    decoder.buffered()
                                )
                            });
                        }
                        let _ = send.finish();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(%node, error = %e, "replication stream ended");
                        return;
                    }
                }
            }
            Err(e) => {
                service.limiter.warn("malformed", || {
                    format!("replication stream from {node}: bad frame: {e}")
                });
                close(&mut send, &mut recv, code::MALFORMED);
                return;
            }
        };
        if let Message::Fence { volume, generation } = &msg {
            service
                .primary_conns
                .note(volume.as_str(), &node, generation.0, &conn);
        }
        if let Err((c, why)) = service.submit(msg, &outbox).await {
            service.limiter.warn("protocol", || {
                format!("replication stream from {node}: {why}")
            });
            close(&mut send, &mut recv, c);
            return;
        }
        while let Ok(m) = answers.try_recv() {
            if encode(&m, &mut out).is_err() {
                close(&mut send, &mut recv, code::PROTOCOL);
                return;
            }
        }
    }
}
