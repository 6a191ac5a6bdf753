//! What the store's replication tests share: `tessera-store serve` processes with node
//! certificates of one CA, driven through their admin and NBD sockets.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

pub mod fake_replica;
pub mod rot;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_nbd::Client;
use tessera_pki::{node_key_and_request, ClusterCa, NodeCredentials};
use tessera_store::admin_client::AdminClient;
use tessera_store_admin::{AdminOp, AdminReply, ReplicaPeer, ReplicationRole};

pub const MIB: u64 = 1 << 20;

/// A running `tessera-store serve` with replication on.
pub struct Node {
    child: Child,
    pub id: String,
    pub dir: PathBuf,
    pub repl: SocketAddr,
    tls: PathBuf,
    /// More arguments for `serve`, on every (re)start.
    pub args: Vec<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.dir.with_extension("log");
            eprintln!(
                "--- {} log:\n{}",
                self.id,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Node {
    pub fn start(root: &Path, id: &str, ca: &ClusterCa) -> Node {
        Node::start_with(root, id, ca, &[])
    }

    /// Like [`Node::start`], with more arguments for `serve`.
    pub fn start_with(root: &Path, id: &str, ca: &ClusterCa, args: &[&str]) -> Node {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let tls = root.join(format!("{id}-tls"));
        write_node_creds(&tls, ca, id);
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let repl: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = spawn(&dir, &tls, repl, &args);
        let n = Node {
            child,
            id: id.to_string(),
            dir,
            repl,
            tls,
            args,
        };
        n.wait_ready();
        n
    }

    /// Kills the store with SIGKILL (no clean shutdown) and starts it again on the same
    /// data directory and addresses.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// Kills the store with SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the store again on the same data directory and addresses (after [`kill`]).
    pub fn restart(&mut self) {
        for sock in ["admin.sock", "nbd.sock"] {
            let _ = std::fs::remove_file(self.dir.join(sock));
        }
        self.child = spawn(&self.dir, &self.tls, self.repl, &self.args);
        self.wait_ready();
    }

    /// Sends `signal` (a name `kill -s` takes: STOP, CONT) to the store: a stopped store
    /// answers nothing, as one cut off by a partition, and keeps its state.
    pub fn signal(&self, signal: &str) {
        run(Command::new("kill")
            .arg("-s")
            .arg(signal)
            .arg(self.child.id().to_string()));
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.dir.join("admin.sock")).is_err()
            || std::os::unix::net::UnixStream::connect(self.dir.join("nbd.sock")).is_err()
        {
            assert!(Instant::now() < deadline, "{} did not start", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn admin(&self, op: AdminOp) -> Result<AdminReply, String> {
        let mut c = AdminClient::connect(&self.dir.join("admin.sock")).unwrap();
        c.call(op).map_err(|e| e.to_string())
    }

    pub fn create(&self, volume: &str, size: u64) {
        self.admin(AdminOp::CreateVolume {
            name: volume.into(),
            size,
        })
        .unwrap();
    }

    pub fn replica_of(&self, volume: &str, generation: u64) {
        self.admin(AdminOp::SetReplication {
            volume: volume.into(),
            generation,
            role: ReplicationRole::Replica { catching_up: false },
        })
        .unwrap();
    }

    pub fn primary_of(&self, volume: &str, generation: u64, replicas: &[&Node]) {
        self.admin(AdminOp::SetReplication {
            volume: volume.into(),
            generation,
            // No cluster answers a failed replica here: a request fails 1 s after it.
            role: primary_role(
                replicas,
                &[],
                serde_json::json!({"timeout_ms": 1500, "cluster_wait_ms": 1000}),
            ),
        })
        .unwrap();
    }

    pub fn nbd(&self, volume: &str) -> Client {
        Client::connect_unix(&self.dir.join("nbd.sock"), volume).unwrap()
    }

    pub fn uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    pub fn read(&self, volume: &str, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.nbd(volume).read(offset, &mut buf).unwrap();
        buf
    }

    /// What this store reports of `volume`'s replication (`replication_status`).
    pub fn replication(&self, volume: &str) -> tessera_store_admin::VolumeReplication {
        match self.admin(AdminOp::ReplicationStatus {}).unwrap() {
            AdminReply::Replication(all) => all
                .into_iter()
                .find(|v| v.volume == volume)
                .unwrap_or_else(|| panic!("{} reports nothing about {volume}", self.id)),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// The blake3 and length of `export` (a volume or `volume@snapshot`) as nbdcopy reads
    /// it through this store's own NBD server (a copy is written under `root`).
    pub fn export_hash(&self, root: &Path, export: &str) -> (blake3::Hash, u64) {
        let out = root.join(format!("{}-{export}.img", self.id));
        let _ = std::fs::remove_file(&out);
        run(Command::new("nbdcopy").arg(self.uri(export)).arg(&out));
        let copy = std::fs::read(&out).unwrap();
        (blake3::hash(&copy), copy.len() as u64)
    }
}

/// The `primary` role with `replicas` in sync and `catching_up` to catch up, and the
/// optional fields in `more` (a JSON object, e.g. `{"timeout_ms": 1500}`). Built through
/// serde, as tesserad builds it, so a field added to the role does not break the tests.
pub fn primary_role(
    replicas: &[&Node],
    catching_up: &[&Node],
    more: serde_json::Value,
) -> ReplicationRole {
    let peers = |list: &[&Node]| -> Vec<ReplicaPeer> {
        list.iter()
            .map(|n| ReplicaPeer {
                node: n.id.clone(),
                addr: n.repl.to_string(),
            })
            .collect()
    };
    let mut role = serde_json::json!({
        "type": "primary",
        "replicas": peers(replicas),
        "catching_up": peers(catching_up),
    });
    if let (Some(r), Some(m)) = (role.as_object_mut(), more.as_object()) {
        r.extend(m.clone());
    }
    serde_json::from_value(role).unwrap()
}

/// Stores `node1`, `node2` and `node3`, each with a copy of `volume` (`size` bytes):
/// `node1` its primary in generation 2 with the two others in sync.
pub fn three_copies(root: &Path, ca: &ClusterCa, volume: &str, size: u64) -> Vec<Node> {
    let nodes: Vec<Node> = ["node1", "node2", "node3"]
        .iter()
        .map(|id| Node::start(root, id, ca))
        .collect();
    for n in &nodes {
        n.create(volume, size);
    }
    nodes[1].replica_of(volume, 2);
    nodes[2].replica_of(volume, 2);
    nodes[0].primary_of(volume, 2, &[&nodes[1], &nodes[2]]);
    nodes
}

/// Writes `dir/{ca.crt,node.crt,node.key}` for node `id` of the cluster of `ca`.
pub fn write_node_creds(dir: &Path, ca: &ClusterCa, id: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let c = creds(ca, id);
    std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("node.crt"), c.cert_pem).unwrap();
    std::fs::write(dir.join("node.key"), c.key_pem).unwrap();
}

/// A node certificate for `id` issued by `issuer`.
pub fn creds(issuer: &ClusterCa, id: &str) -> NodeCredentials {
    let (key_pem, csr) = node_key_and_request(id).unwrap();
    NodeCredentials {
        cert_pem: issuer.issue(&csr, id).unwrap(),
        key_pem,
    }
}

pub fn pattern(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

pub fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?} (tests/setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `tessera-store serve` on `dir` with replication at `repl`; its log is appended
/// to `<dir>.log`.
/// The `tessera-store` binary node `id` runs: this build's, or the one named by
/// `TESSERA_TEST_STORE_BIN_<id>` (a store of another release, for `tests/mixed-release`).
pub fn store_bin(id: &str) -> PathBuf {
    std::env::var_os(format!("TESSERA_TEST_STORE_BIN_{id}"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tessera-store")))
}

fn spawn(dir: &Path, tls: &Path, repl: SocketAddr, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    Command::new(store_bin(id.as_deref().unwrap_or_default()))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .arg("--nbd-tls-dir")
        .arg(tls)
        .arg("--repl-quic")
        .arg(repl.to_string())
        .args(args)
        .env("TESSERA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A QUIC client acting as a primary, with the given TLS client configuration, offering
/// every replication protocol version.
pub async fn quic_connect(
    tls: rustls::ClientConfig,
    to: SocketAddr,
    node: &str,
) -> Result<quinn::Connection, String> {
    let all = tessera_replication::wire::alpns_up_to(tessera_replication::wire::VERSION);
    quic_connect_offering(tls, to, node, all).await
}

/// Like [`quic_connect`], offering protocol names `alpns` (an older release offers
/// `tessera-repl/1` only).
pub async fn quic_connect_offering(
    mut tls: rustls::ClientConfig,
    to: SocketAddr,
    node: &str,
    alpns: Vec<Vec<u8>>,
) -> Result<quinn::Connection, String> {
    tls.alpn_protocols = alpns;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let name = tessera_pki::node_dns_name(node).unwrap();
    ep.connect(to, &name)
        .unwrap()
        .await
        .map_err(|e| e.to_string())
}

/// A store "node2" holding volume `v` of `size` bytes as a replica in generation 5, and a
/// stream to it from a fake primary "node1" of the cluster `ca`.
pub async fn replica_and_fake_primary(
    root: &Path,
    ca: &ClusterCa,
    size: u64,
) -> (
    Node,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let replica = replica_node2(root, ca, size).await;
    let tls = tessera_pki::client_config(&creds(ca, "node1"), &ca.cert_pem).unwrap();
    let conn = quic_connect(tls, replica.repl, "node2").await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (replica, conn, send, recv)
}

/// A store "node2" holding volume `v` of `size` bytes as a replica in generation 5
/// (started from async code).
pub async fn replica_node2(root: &Path, ca: &ClusterCa, size: u64) -> Node {
    let (root, ca) = (root.to_path_buf(), ca.clone());
    tokio::task::spawn_blocking(move || {
        let n = Node::start(&root, "node2", &ca);
        n.create("v", size);
        n.replica_of("v", 5);
        n
    })
    .await
    .unwrap()
}

/// Sends `msg` on a stream and waits (at most 20 s) for one answer.
pub async fn ask(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    d: &mut tessera_replication::wire::Decoder,
    msg: &tessera_replication::wire::Message,
) -> tessera_replication::wire::Message {
    send.write_all(&tessera_replication::wire::encode(msg).unwrap())
        .await
        .unwrap();
    next_message(recv, d).await
}

/// The next message on `recv`, waited for at most 20 s.
pub async fn next_message(
    recv: &mut quinn::RecvStream,
    d: &mut tessera_replication::wire::Decoder,
) -> tessera_replication::wire::Message {
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(m) = d.next_message().unwrap() {
            return m;
        }
        let n = tokio::time::timeout_at(deadline, recv.read(&mut buf))
            .await
            .expect("no answer within 20 s")
            .unwrap()
            .expect("the other end ended the stream");
        d.push(&buf[..n]).unwrap();
    }
}
