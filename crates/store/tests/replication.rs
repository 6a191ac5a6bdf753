//! Replication between `tessera-store` processes over QUIC with mutual TLS (issue #8):
//! three stores with node certificates of one CA, a primary and two replicas set through
//! the admin socket, data written with `nbdcopy` and read back from every copy; fencing
//! by a newer generation; a killed replica failing writes instead of acknowledging them;
//! bad peers and bad frames refused with nothing written; and a refused write's reason
//! reaching nbdcopy.

// Test code: the unexpected should panic where it happens.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_pki::{ClusterCa, NodeCredentials};
use tessera_replication::wire::{self, Decoder, Generation, Message, ReplyError, VolumeName};

mod support;
use support::*;

#[test]
fn three_copies_match_a_fenced_primary_and_a_dead_replica_fail_writes() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-test").unwrap();
    let mut nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root.path(), id, &ca))
        .collect();
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);

    // A primary and two replicas, in generation 2.
    for n in [n1, n2, n3] {
        n.create("v", 16 * MIB);
    }
    n2.replica_of("v", 2);
    n3.replica_of("v", 2);
    n1.primary_of("v", 2, &[n2, n3]);

    let data = pattern("replication", (8 * MIB) as usize);
    let src = root.path().join("data.img");
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(n1.uri("v")));

    // A replica is not written by local clients.
    let mut local = n2.nbd("v");
    assert!(local.write(0, &[1u8; 4096], false).is_err());

    let expected = blake3::hash(&[data.clone(), vec![0u8; (8 * MIB) as usize]].concat());
    for n in [n1, n2, n3] {
        let out = root.path().join(format!("{}-copy.img", n.id));
        run(Command::new("nbdcopy").arg(n.uri("v")).arg(&out));
        let copy = std::fs::read(&out).unwrap();
        assert_eq!(copy.len() as u64, 16 * MIB);
        assert_eq!(
            blake3::hash(&copy),
            expected,
            "{}'s copy differs from what was written",
            n.id
        );
    }

    // Fencing: the replica of `f` is told of generation 3; the primary of 2 is refused.
    n1.create("f", MIB);
    n2.create("f", MIB);
    n2.replica_of("f", 2);
    n1.primary_of("f", 2, &[n2]);
    let mut c = n1.nbd("f");
    c.write(0, &[0xAA; 4096], false).unwrap();
    c.flush().unwrap();
    n2.replica_of("f", 3);
    let t = Instant::now();
    assert!(
        c.write(4096, &[0xBB; 4096], false).is_err(),
        "a fenced primary got a write acknowledged"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the fence is answered at once, not by a timeout ({:?})",
        t.elapsed()
    );
    assert!(
        c.flush().is_err(),
        "a fenced primary got a flush acknowledged"
    );
    let replica = n2.read("f", 0, 8192);
    assert_eq!(&replica[..4096], &[0xAA; 4096][..]);
    assert_eq!(
        &replica[4096..],
        &[0u8; 4096][..],
        "the fenced write reached the replica"
    );

    // A replica killed: the next write fails within the bound instead of completing.
    let dead = nodes.pop().unwrap();
    drop(dead);
    let mut c = nodes[0].nbd("v");
    let t = Instant::now();
    let r = c.write(0, &[0x55; 4096], true);
    assert!(r.is_err(), "a write was acknowledged without a replica");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the write hung for {:?}",
        t.elapsed()
    );

    // The cluster's answer (here by hand): generation 3 without the dead replica. Writes
    // complete again, and what the dead one misses is recorded durably.
    let (n1, n2) = (&nodes[0], &nodes[1]);
    n1.primary_of("v", 3, &[n2]);
    c.write(8192, &[0x66; 4096], true).unwrap();
    c.flush().unwrap();
    assert_eq!(n2.read("v", 8192, 4096), vec![0x66; 4096]);
    let missed = std::fs::read_to_string(n1.dir.join("replication/v.node3.missed")).unwrap();
    assert!(
        missed.lines().any(|l| l == "8192 4096"),
        "the missed region is not recorded: {missed:?}"
    );
}

/// Sends `bytes` on a new stream (finishing it when `finish`), then returns the first
/// message answered, or why none came.
async fn exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Result<Message, String> {
    let go = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(bytes).await.map_err(|e| e.to_string())?;
        if finish {
            send.finish().map_err(|e| e.to_string())?;
        }
        let mut d = Decoder::new();
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(m) = d.next_message().map_err(|e| e.to_string())? {
                return Ok(m);
            }
            match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
                Some(n) => d.push(&buf[..n]).map_err(|e| e.to_string())?,
                None => return Err("stream ended without a reply".to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), go)
        .await
        .unwrap_or_else(|_| Err("no reply within 5 s".into()))
}

fn write_msg(volume: &str, generation: u64, seq: u64, offset: u64, byte: u8) -> Vec<u8> {
    wire::encode(&Message::Write {
        volume: VolumeName::new(volume).unwrap(),
        generation: Generation(generation),
        seq,
        offset,
        fua: true,
        data: vec![byte; 4096],
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_and_bad_frames_are_refused_and_write_nothing() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("repl-test").unwrap();
    let other = ClusterCa::mint("another-cluster").unwrap();
    let replica = tokio::task::spawn_blocking({
        let (root, ca) = (root.path().to_path_buf(), ca.clone());
        move || {
            let n = Node::start(&root, "node2", &ca);
            n.create("v", MIB);
            n.create("other", MIB);
            n.replica_of("v", 5);
            n
        }
    })
    .await
    .unwrap();
    let to = replica.repl;
    let good = tessera_pki::client_config(&creds(&ca, "node1"), &ca.cert_pem).unwrap();

    // A certificate of another cluster, and no certificate at all: no stream is served.
    let foreign = tessera_pki::client_config(&creds(&other, "node1"), &ca.cert_pem).unwrap();
    let anonymous = {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    };
    // A user's client certificate of the right CA: may read exports, never replicate.
    let user = {
        let (cert_pem, key_pem) = ca.issue_client("alice").unwrap();
        tessera_pki::client_config(&NodeCredentials { cert_pem, key_pem }, &ca.cert_pem).unwrap()
    };
    for (what, tls, offset) in [
        ("another cluster's certificate", foreign, 4096u64),
        ("no client certificate", anonymous, 8192),
        ("a user's certificate", user, 12288),
    ] {
        let answered = match quic_connect(tls, to, "node2").await {
            Err(_) => None,
            Ok(conn) => exchange(&conn, &write_msg("v", 5, 1, offset, 0xEE), false)
                .await
                .ok(),
        };
        assert_eq!(answered, None, "{what}: the replica answered");
    }

    let conn = quic_connect(good, to, "node2").await.unwrap();
    let reply = |seq, result| Message::Reply { seq, result };
    // An older generation, a volume it does not hold, one that is not a replica here.
    assert_eq!(
        exchange(&conn, &write_msg("v", 4, 1, 16384, 0xEE), false).await,
        Ok(reply(
            1,
            Err(ReplyError::StaleGeneration {
                current: Generation(5)
            })
        ))
    );
    assert_eq!(
        exchange(&conn, &write_msg("nope", 5, 1, 0, 0xEE), false).await,
        Ok(reply(1, Err(ReplyError::UnknownVolume)))
    );
    assert_eq!(
        exchange(&conn, &write_msg("other", 5, 1, 0, 0xEE), false).await,
        Ok(reply(1, Err(ReplyError::NotReplica)))
    );
    // An oversize frame is refused from its length; a truncated one is never applied.
    let mut oversize = ((wire::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
    oversize.extend_from_slice(&[1, 3]);
    oversize.extend_from_slice(&[0xEE; 1000]);
    let r = exchange(&conn, &oversize, false).await;
    assert!(r.is_err(), "oversize frame answered: {r:?}");
    let mut truncated = write_msg("v", 5, 1, 20480, 0xEE);
    truncated.truncate(truncated.len() - 100);
    let r = exchange(&conn, &truncated, true).await;
    assert!(r.is_err(), "truncated frame answered: {r:?}");

    // The same connection's good write still works, and is the only one applied.
    assert_eq!(
        exchange(&conn, &write_msg("v", 5, 1, 0, 0x11), false).await,
        Ok(reply(1, Ok(())))
    );
    let (v, other_volume) = tokio::task::spawn_blocking(move || {
        let v = replica.read("v", 0, 6 * 4096);
        let o = replica.read("other", 0, 4096);
        drop(replica);
        (v, o)
    })
    .await
    .unwrap();
    assert_eq!(&v[..4096], &[0x11; 4096][..]);
    assert!(
        v[4096..].iter().all(|b| *b == 0),
        "a refused write reached the volume"
    );
    assert!(other_volume.iter().all(|b| *b == 0));
}

/// What a client we did not write hears when the store refuses its write: libnbd (the
/// library under nbdcopy) receives the store's words in the structured error reply and
/// prints them in its debug output (`nbdcopy -v`); qemu's NBD client drops them (it
/// keeps only the errno). Two refusals: a client that wrote through the primary after the
/// primary moved away (fenced: "connect again"), and a write to a replica copy of a
/// store with no tesserad to move the primary through.
#[test]
fn a_refused_write_reaches_the_nbd_client_with_its_reason() {
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::mint("refusal-test").unwrap();
    let n1 = Node::start(root.path(), "node1", &ca);
    let n2 = Node::start(root.path(), "node2", &ca);
    for n in [&n1, &n2] {
        n.create("v", 4 * MIB);
    }
    n2.replica_of("v", 2);
    n1.primary_of("v", 2, &[&n2]);

    // nbdcopy streaming from a pipe holds its connection to node1 while we feed it. Its
    // debug output goes to a file: a pipe nobody reads would fill and stall it.
    let debug = root.path().join("nbdcopy.err");
    let mut copy = Command::new("nbdcopy")
        .arg("-v")
        .arg("-")
        .arg(n1.uri("v"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&debug).unwrap())
        .spawn()
        .expect("nbdcopy (tests/setup installs it)");
    let mut feed = copy.stdin.take().unwrap();
    let first = pattern("before the move", MIB as usize);
    std::io::Write::write_all(&mut feed, &first).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while n1.read("v", 0, MIB as usize) != first {
        assert!(
            Instant::now() < deadline,
            "nbdcopy's first MiB never landed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The primary moves away (node1 becomes a replica of generation 3): nbdcopy's next
    // write through node1 is fenced.
    n1.replica_of("v", 3);
    // (nbdcopy stops at its first failed write: the rest of the pipe may be refused.)
    let _ = std::io::Write::write_all(&mut feed, &pattern("after", MIB as usize));
    drop(feed);
    let status = copy.wait().unwrap();
    let err = std::fs::read_to_string(&debug).unwrap();
    assert!(!status.success(), "a fenced client's write succeeded");
    let said = |words: &str| {
        err.lines()
            .any(|l| l.contains("structured error server message") && l.contains(words))
    };
    assert!(
        said("volume v: its primary moved to another node")
            && said("connect again to write through this node"),
        "nbdcopy did not get the store's reason: {}",
        tail(&err)
    );
    assert_eq!(
        n1.read("v", MIB, 4096),
        vec![0u8; 4096],
        "the fenced write landed"
    );

    // A replica copy on a store without tesserad: only the primary writes it.
    let src = root.path().join("one.img");
    std::fs::write(&src, vec![0x5au8; 65536]).unwrap();
    let out = Command::new("nbdcopy")
        .arg("-v")
        .arg(&src)
        .arg(n2.uri("v"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a replica copy took a client's write"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("structured error server message")
                && l.contains("volume v is a replica on this store: only its primary writes it")),
        "nbdcopy did not get the store's reason: {}",
        tail(&err)
    );
    assert_eq!(
        n2.read("v", 0, 65536),
        first[..65536],
        "the refused write landed"
    );
}

/// The last lines of a verbose client's output, for a failure's message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}
