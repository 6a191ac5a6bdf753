//! Replication protocol versions between stores of different releases: a connection
//! settles on the newest version both ends offer (ALPN `tessera-repl/<n>`); a replica
//! serves a primary of an older release (version 1) and refuses, writing nothing, a frame
//! of a version that connection did not settle on. (The other direction, a primary with a
//! replica of an older release, is `replication_snapshot_catchup`'s larger-copy test.)

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use tessera_pki::ClusterCa;
use tessera_replication::wire::{self, Decoder, Generation, Message, VolumeName};

use support::*;

fn protocol(conn: &quinn::Connection) -> Vec<u8> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .unwrap_or_default()
}

fn name(n: &str) -> VolumeName {
    VolumeName::new(n).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_primary_is_served_and_a_frame_newer_than_its_connection_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-versions-test").unwrap();
    let replica = replica_node2(root.path(), &ca, MIB).await;
    let tls = tessera_pki::client_config(&creds(&ca, "node1"), &ca.cert_pem).unwrap();

    // Two stores of this release settle on the newest version.
    let new = quic_connect(tls.clone(), replica.repl, "node2")
        .await
        .unwrap();
    assert_eq!(protocol(&new), b"tessera-repl/2");
    new.close(0u32.into(), b"done");

    // A primary of an older release offers version 1 only: it is served.
    let v1 = vec![b"tessera-repl/1".to_vec()];
    let old = quic_connect_offering(tls, replica.repl, "node2", v1)
        .await
        .unwrap();
    assert_eq!(protocol(&old), b"tessera-repl/1");
    let (mut send, mut recv) = old.open_bi().await.unwrap();
    let mut d = Decoder::speaking(1);
    let g = Generation(5);
    let fence = Message::Fence {
        volume: name("v"),
        generation: g,
    };
    assert_eq!(
        ask(&mut send, &mut recv, &mut d, &fence).await,
        Message::Reply {
            seq: 0,
            result: Ok(())
        }
    );
    let write = Message::Write {
        volume: name("v"),
        generation: g,
        seq: 1,
        offset: 0,
        fua: false,
        data: vec![0xAB; 4096],
    };
    assert_eq!(
        ask(&mut send, &mut recv, &mut d, &write).await,
        Message::Reply {
            seq: 1,
            result: Ok(())
        }
    );

    // A snapshot with a size exists from version 2 on: on this connection its frame is
    // refused (the stream is closed, no answer) and nothing is taken.
    let sized = Message::Snapshot {
        volume: name("v"),
        generation: g,
        seq: 2,
        name: name("s1"),
        size: Some(4096),
    };
    let frame = wire::encode(&sized).unwrap();
    assert_eq!(frame[4], 2, "a frame of version 2");
    send.write_all(&frame).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let answer = tokio::time::timeout(Duration::from_secs(20), recv.read(&mut buf))
        .await
        .expect("the replica neither answered nor closed the stream");
    assert!(
        !matches!(answer, Ok(Some(_))),
        "the replica answered a version-2 frame on a version-1 connection: {answer:?}"
    );
    let replica = tokio::task::spawn_blocking(move || {
        let info = replica.admin(tessera_store_admin::AdminOp::VolumeInfo { name: "v".into() });
        let data = replica.read("v", 0, 8192);
        (replica, info, data)
    });
    let (replica, info, data) = replica.await.unwrap();
    match info.unwrap() {
        tessera_store_admin::AdminReply::Volume(v) => {
            assert!(v.snapshots.is_empty(), "a snapshot was taken: {v:?}")
        }
        other => panic!("unexpected reply {other:?}"),
    }
    assert_eq!(&data[..4096], &[0xAB; 4096][..], "the acknowledged write");
    assert_eq!(&data[4096..], &[0u8; 4096][..]);
    let log = std::fs::read_to_string(replica.dir.with_extension("log")).unwrap();
    assert!(
        log.contains("frame of protocol version 2 on a connection that negotiated version 1"),
        "the refusal is logged: {log}"
    );
}
