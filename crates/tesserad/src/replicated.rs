//! After formation: this node's Raft member of the cluster state, its registration in the
//! `nodes` table, and what the status socket reports about it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tessera_cluster::identity::NodeId;
use tessera_pki::{ClusterCa, NodeCredentials};
use tessera_state::network::Tls;
use tessera_state::{Command, Node};

/// A node id that is not what an identity is made of (32 lowercase hex digits), so it
/// has no Raft id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("node id {0:?} is not 32 lowercase hexadecimal digits")]
pub struct BadNodeId(String);

/// The Raft id of a node: the first 64 bits of its node id. An id that does not parse is
/// an error rather than some fixed Raft id, which two such nodes would share.
pub fn raft_id(id: &NodeId) -> Result<u64, BadNodeId> {
    let hex = id.0.as_bytes();
    let well_formed = hex.len() == 32
        && hex
            .iter()
            .all(|&c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    well_formed
        .then(|| id.0.get(..16))
        .flatten()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| BadNodeId(id.0.clone()))
}

/// Raft traffic uses the port after the management port.
pub fn raft_addr(management: SocketAddr) -> SocketAddr {
    SocketAddr::new(management.ip(), management.port().wrapping_add(1))
}

/// The key enrollment and join requests of cluster `f` (named `cluster_name` in the
/// seed) are signed with: derived from the join secret by argon2id with the cluster's
/// salt (`tessera_cluster::kdf`), off the async workers, once per process. It also seals
/// the CA's key in the replicated state.
pub async fn join_key(
    secret: &str,
    cluster_name: &str,
    f: &tessera_cluster::formation::Formed,
) -> anyhow::Result<[u8; 32]> {
    let (secret, name, salt) = (secret.to_string(), cluster_name.to_string(), f.salt());
    let keys =
        tokio::task::spawn_blocking(move || tessera_cluster::kdf::derive(&secret, &name, &salt))
            .await??;
    Ok(keys.join)
}

/// The join key of versions before the argon2id KDF (a blake3 derivation): only to open
/// a CA record sealed by such a version, which is then sealed again ([`reseal_ca`]).
pub fn legacy_join_key(secret: &str) -> [u8; 32] {
    blake3::derive_key("tessera raft join v1", secret.as_bytes())
}

/// What the CA record in the state needs.
pub enum CaRecordState {
    /// No record (yet).
    Absent,
    /// Sealed under this node's join key: nothing to do.
    Current,
    /// The key in the clear (written before keys were sealed), or sealed under the
    /// legacy join key: to be sealed again under the current key.
    Reseal(ClusterCa),
    /// Opens with neither key (another join secret?): left alone.
    Unopenable(String),
}

/// Classifies a CA record (see [`CaRecordState`]).
pub fn ca_record_state(
    rec: Option<&serde_json::Value>,
    key: &[u8; 32],
    legacy_key: &[u8; 32],
) -> CaRecordState {
    use tessera_state::ca_record::from_record;
    let Some(rec) = rec else {
        return CaRecordState::Absent;
    };
    if rec.get("key_pem").is_some() {
        return match from_record(rec, None) {
            Ok(ca) => CaRecordState::Reseal(ca),
            Err(e) => CaRecordState::Unopenable(e.to_string()),
        };
    }
    if from_record(rec, Some(key)).is_ok() {
        return CaRecordState::Current;
    }
    match from_record(rec, Some(legacy_key)) {
        Ok(ca) => CaRecordState::Reseal(ca),
        Err(e) => CaRecordState::Unopenable(e.to_string()),
    }
}

/// Seals the CA record again if a former version left it with the key in the clear or
/// under the legacy join key, so no `state.redb` keeps the CA key readable after an
/// upgrade (the old Raft log entries go with the next snapshot's log purge). Runs in the
/// background, retrying until the record is current; the write requires the record to be
/// unchanged, so members doing this at once write it once.
pub fn reseal_ca(node: Arc<Node>, key: [u8; 32], legacy_key: [u8; 32], cluster: String) {
    tokio::spawn(async move {
        for _ in 0..200 {
            let rec = node.state.read(|t| {
                t.get(tessera_state::ca_record::TABLE)
                    .and_then(|p| p.get(tessera_state::ca_record::KEY))
                    .cloned()
            });
            let (n, r) = (node.clone(), rec.clone());
            let c = cluster.clone();
            // Off the async workers: opening and sealing derive keys with argon2id.
            let work = tokio::task::spawn_blocking(move || {
                match ca_record_state(r.as_ref(), &key, &legacy_key) {
                    CaRecordState::Reseal(ca) => n.ca_record(&ca, &c).map(Some),
                    CaRecordState::Unopenable(e) => {
                        tracing::error!(error = %e, "the cluster CA's record opens with neither the join key nor the old one");
                        Ok(None)
                    }
                    CaRecordState::Absent | CaRecordState::Current => Ok(None),
                }
            })
            .await;
            let new = match work {
                Ok(Ok(Some(v))) => v,
                Ok(Ok(None)) if rec.is_some() => return,
                Ok(Ok(None)) => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot seal the cluster CA's key again");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "sealing the cluster CA's key again failed");
                    return;
                }
            };
            let Some(old) = rec else { continue };
            let cmd = Command::Txn {
                require: vec![tessera_state::Require::equals(
                    tessera_state::ca_record::TABLE,
                    tessera_state::ca_record::KEY,
                    old,
                )],
                ops: vec![Command::Put {
                    table: tessera_state::ca_record::TABLE.into(),
                    key: tessera_state::ca_record::KEY.into(),
                    value: new,
                }],
            };
            match node.write(cmd).await {
                Ok(a) if a.conflict.is_none() => {
                    tracing::info!("the cluster CA's key in the replicated state was in the clear or under an old key: sealed it again");
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "CA record not sealed again yet"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// This node's TLS credentials: `<data_dir>/tls/{node.key,node.crt,ca.crt}`.
fn tls_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("tls")
}

/// Loads this node's certificate, key and the cluster CA certificate, if it has them.
pub fn load_tls(data_dir: &Path) -> anyhow::Result<Option<Tls>> {
    let d = tls_dir(data_dir);
    let read = |f: &str| std::fs::read_to_string(d.join(f));
    match (read("node.key"), read("node.crt"), read("ca.crt")) {
        (Ok(key_pem), Ok(cert_pem), Ok(ca)) => {
            let creds = NodeCredentials { key_pem, cert_pem };
            Ok(Some(Tls::new(&creds, &ca).with_context(|| {
                format!("the TLS credentials in {} are unusable", d.display())
            })?))
        }
        _ => Ok(None),
    }
}

/// The HTTPS configuration of this node's API, from its stored credentials.
pub fn api_tls(data_dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let d = tls_dir(data_dir);
    let read = |f: &str| {
        std::fs::read_to_string(d.join(f)).with_context(|| format!("reading {}/{f}", d.display()))
    };
    let creds = NodeCredentials {
        key_pem: read("node.key")?,
        cert_pem: read("node.crt")?,
    };
    Ok(tessera_pki::api_server_config(&creds)?)
}

/// Stores credentials, each file written whole.
fn save_tls(data_dir: &Path, creds: &NodeCredentials, ca_pem: &str) -> anyhow::Result<Tls> {
    let d = tls_dir(data_dir);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    // Certificates are public; the key is not. All are written 0600: nothing else needs
    // to read them.
    write_private(&d.join("node.key"), &creds.key_pem)?;
    write_private(&d.join("node.crt"), &creds.cert_pem)?;
    write_private(&d.join("ca.crt"), ca_pem)?;
    Ok(Tls::new(creds, ca_pem)?)
}

/// The founding node's part: mints the cluster CA and certifies itself with it.
pub fn mint(
    data_dir: &Path,
    cluster_id: &str,
    me: &NodeId,
    ips: &[std::net::IpAddr],
) -> anyhow::Result<(ClusterCa, Tls)> {
    let ca = ClusterCa::mint(cluster_id)?;
    let name = tessera_state::network::cert_name(raft_id(me)?);
    let (key_pem, csr) = tessera_pki::node_key_and_request(&name)?;
    let creds = NodeCredentials {
        cert_pem: ca.issue_with_ips(&csr, &name, ips)?,
        key_pem,
    };
    let tls = save_tls(data_dir, &creds, &ca.cert_pem)?;
    // Kept until the CA is in the replicated state, so a crash right after formation
    // does not lose it (see `minted_ca`).
    write_private(&tls_dir(data_dir).join("ca.key"), &ca.key_pem)?;
    Ok((ca, tls))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The CA this node minted, if it did (the founding node, after a restart).
pub fn minted_ca(data_dir: &Path) -> Option<ClusterCa> {
    let d = tls_dir(data_dir);
    Some(ClusterCa {
        cert_pem: std::fs::read_to_string(d.join("ca.crt")).ok()?,
        key_pem: std::fs::read_to_string(d.join("ca.key")).ok()?,
    })
}

/// Gets a certificate from a member of the cluster (any of `peers`, management
/// addresses, as they become known), retrying until one issues it.
pub async fn enroll(
    me: &NodeId,
    data_dir: &Path,
    key: [u8; 32],
    peers: &Peers,
    ips: &[std::net::IpAddr],
) -> anyhow::Result<Tls> {
    let my_raft_id = raft_id(me)?;
    let mut last = String::from("no member heard yet");
    for attempt in 0u32.. {
        let candidates: Vec<SocketAddr> = peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect();
        for a in candidates {
            let addr = raft_addr(a).to_string();
            match tessera_state::network::enroll(&addr, &key, my_raft_id, ips).await {
                Ok((creds, ca_pem)) => {
                    tracing::info!(%addr, "received this node's cluster certificate");
                    return save_tls(data_dir, &creds, &ca_pem);
                }
                // Asking again cannot help: the caller stops as a removed node.
                Err(e) if crate::removed::says_removed(&e.to_string()) => {
                    anyhow::bail!("enrollment refused: {e}")
                }
                Err(e) => last = e.to_string(),
            }
        }
        if attempt % 20 == 19 {
            tracing::warn!(error = %last, "still waiting for a member to issue this node's certificate");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    anyhow::bail!("could not enroll: {last}")
}

/// Management addresses of the peers heard, by node id.
pub type Peers = Arc<std::sync::Mutex<BTreeMap<String, SocketAddr>>>;

/// Starts this node's Raft member (mutual TLS with `tls`); the bootstrapping node also
/// founds the cluster with `founders` (Raft id -> Raft address).
pub async fn start(
    me: &NodeId,
    management: SocketAddr,
    data_dir: &Path,
    key: [u8; 32],
    tls: Tls,
    founders: Option<BTreeMap<u64, SocketAddr>>,
) -> anyhow::Result<Arc<Node>> {
    let node = Node::start(
        raft_id(me)?,
        raft_addr(management),
        &data_dir.join("state"),
        Some(key),
        Some(tls),
    )
    .await?;
    if let Some(members) = founders {
        node.initialize(members).await?;
        tracing::info!("Raft cluster initialized");
    }
    Ok(Arc::new(node))
}

/// Records the cluster CA in the replicated state (so every member can enroll nodes),
/// retrying until a leader takes it, then removes the key's file in `data_dir`, which
/// only bridged a crash before that record.
pub fn publish_ca(node: Arc<Node>, ca: ClusterCa, data_dir: std::path::PathBuf, cluster: String) {
    tokio::spawn(async move {
        // The key is sealed with the join secret (argon2id: off the async workers).
        let (n, c) = (node.clone(), ca.clone());
        let value = match tokio::task::spawn_blocking(move || n.ca_record(&c, &cluster)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot seal the cluster CA's key; it stays in tls/ca.key");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "sealing the cluster CA's key failed");
                return;
            }
        };
        let cmd = Command::Txn {
            require: vec![tessera_state::Require::absent("pki", "ca")],
            ops: vec![Command::Put {
                table: "pki".into(),
                key: "ca".into(),
                value,
            }],
        };
        loop {
            match node.write(cmd.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "CA not recorded yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        forget_minted_ca(&node, &ca, &data_dir);
    });
}

/// Removes `<data_dir>/tls/ca.key` once the replicated state holds that same CA (a write
/// that returned is applied, so committed). A different CA on record keeps the file, so
/// no key is lost to a surprise.
fn forget_minted_ca(node: &Node, ca: &ClusterCa, data_dir: &Path) {
    let recorded = node.state.read(|t| {
        t.get("pki")
            .and_then(|p| p.get("ca"))
            .and_then(|r| r["cert_pem"].as_str().map(|c| c == ca.cert_pem))
    });
    let path = tls_dir(data_dir).join("ca.key");
    if recorded != Some(true) {
        tracing::warn!(path = %path.display(), "the replicated state holds another CA than the one this node minted; keeping its key file");
        return;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            // The removal is durable before anyone relies on the file being gone.
            if let Err(e) = std::fs::File::open(tls_dir(data_dir)).and_then(|d| d.sync_all()) {
                tracing::warn!(error = %e, "syncing the TLS directory after removing the CA key");
            }
            tracing::info!(path = %path.display(), "the cluster CA is in the replicated state: removed its key file");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "could not remove the CA key file")
        }
    }
}

/// The name this node goes by: its seed's `node_name`, else the machine's host name, else
/// (no host name to be had) its id.
pub fn node_name(seed_name: Option<&str>, me: &NodeId) -> String {
    seed_name
        .map(String::from)
        .or_else(sysinfo::System::host_name)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| me.0.clone())
}

/// Records this node in the replicated `nodes` table (name, address, NBD address, latest
/// metrics), retrying until a leader takes it, then refreshes the metrics every 10 s.
pub fn register(
    node: Arc<Node>,
    me: NodeId,
    name: String,
    management: SocketAddr,
    nbd: Option<SocketAddr>,
    metrics: crate::metrics::Metrics,
    storage: Arc<crate::storage::Health>,
) -> Result<(), BadNodeId> {
    let my_raft_id = raft_id(&me)?;
    tokio::spawn(async move {
        let mut registered = false;
        loop {
            let m = metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let cmd = Command::Put {
                table: "nodes".into(),
                key: me.0.clone(),
                value: json!({
                    "name": name,
                    "address": management.to_string(),
                    "raft_id": my_raft_id,
                    "nbd": nbd.map(|a| a.to_string()),
                    "metrics": m,
                    "storage": storage.latest(),
                }),
            };
            match node.write(cmd).await {
                Ok(a) => {
                    if !registered {
                        tracing::info!(index = a.index, "registered in the cluster state");
                        registered = true;
                    }
                    // A change of the store's health is published at once.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        _ = storage.changed.notified() => {}
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registration not accepted yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    });
    Ok(())
}

/// The status document of this node (its Raft id null if its node id does not parse).
pub fn status(me: &NodeId, cluster_id: Option<&str>, node: Option<&Node>) -> serde_json::Value {
    let mut v = json!({
        "node_id": me.0,
        "raft_id": raft_id(me).ok(),
        "cluster_id": cluster_id,
    });
    if let Some(n) = node {
        let m = n.raft.metrics().borrow().clone();
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        v["leader"] = json!(m.current_leader);
        v["term"] = json!(m.current_term);
        v["voters"] = json!(voters);
        v["nodes"] = n
            .state
            .read(|t| json!(t.get("nodes").cloned().unwrap_or_default()));
    }
    v
}

/// Asks the members at `via` (management addresses, with their node ids) to add this
/// node, until one does.
pub async fn join(
    node: &Node,
    me: &NodeId,
    management: SocketAddr,
    via: &[(NodeId, SocketAddr)],
    key: [u8; 32],
) -> anyhow::Result<()> {
    let my_addr = raft_addr(management).to_string();
    let my_raft_id = raft_id(me)?;
    let via = via
        .iter()
        .map(|(id, a)| Ok((raft_id(id)?, raft_addr(*a).to_string())))
        .collect::<Result<Vec<_>, BadNodeId>>()?;
    let mut last = String::from("no member address heard");
    for attempt in 0..20 {
        for (id, addr) in &via {
            match node
                .transport
                .request_join(*id, addr, &key, my_raft_id, &my_addr)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if crate::removed::says_removed(&e.to_string()) => {
                    anyhow::bail!("join refused: {e}")
                }
                Err(e) => last = e.to_string(),
            }
        }
        tracing::debug!(attempt, error = %last, "join not accepted yet");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("could not join the cluster: {last}")
}

/// What a failed write through the replicated state means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFailure {
    /// Not applied: a retry as is cannot do it twice.
    NotApplied,
    /// Perhaps applied: the write reached the leader, or a connection that was on its way
    /// to it, and the answer was lost (the leader stopped, the connection broke, the time
    /// ran out). The leader may have committed it.
    Unknown,
    /// Committed by the leader; this node had not caught up in time to answer with it.
    Committed,
}

impl WriteFailure {
    /// The answer's words: what happened and what to do, without Raft's internals (node
    /// structs, addresses, log ids), which only the daemon's log gets.
    pub fn message(self) -> &'static str {
        match self {
            WriteFailure::NotApplied => {
                "the cluster could not take the change now (no leader reachable, or the \
                 leader changed); nothing was changed; try again"
            }
            WriteFailure::Unknown => {
                "outcome unknown: the cluster's leader stopped answering while the change was \
                 under way, so it may or may not have been made; read the resource (or retry \
                 with the same Idempotency-Key) before doing it again"
            }
            WriteFailure::Committed => {
                "the change was made, but this node has not caught up with it yet; read it \
                 again in a moment"
            }
        }
    }
}

/// Classifies a failed [`Node::write`]. Only refusals before anything left this node are
/// [`WriteFailure::NotApplied`]: a write forwarded to the leader can have been committed
/// by it whatever the error that came back (even "connection refused": the transport
/// retries a broken kept connection on a new one, and the leader may have died after
/// committing what the first one carried).
pub fn write_failure(e: &tessera_state::StateError) -> WriteFailure {
    use tessera_state::{StateError, TransportError};
    match e {
        StateError::NoLeader(_) => WriteFailure::NotApplied,
        StateError::Forward(TransportError::Encode(_) | TransportError::Pki(_)) => {
            WriteFailure::NotApplied
        }
        StateError::Forward(_) => WriteFailure::Unknown,
        // On the leader itself: it may have appended the entry before failing.
        StateError::Write(_) => WriteFailure::Unknown,
        StateError::Lagging => WriteFailure::Committed,
        _ => WriteFailure::Unknown,
    }
}

/// The words for a failed read barrier ([`Node::sync`]), without Raft's internals.
pub fn sync_failure(e: &tessera_state::StateError) -> &'static str {
    match e {
        tessera_state::StateError::Lagging => {
            "this node is behind the cluster's leader; try again in a moment"
        }
        _ => "the cluster state cannot be confirmed now (no leader reachable); try again",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_and_old_ca_records_are_to_be_sealed_again_and_current_ones_left() {
        let ca = ClusterCa::mint("c1").unwrap();
        let key = [1u8; 32];
        let legacy = legacy_join_key("correct horse battery staple");
        assert!(matches!(
            ca_record_state(None, &key, &legacy),
            CaRecordState::Absent
        ));
        // Written before keys were sealed: the key in the clear.
        let clear = json!({ "cert_pem": ca.cert_pem, "key_pem": ca.key_pem });
        assert!(
            matches!(ca_record_state(Some(&clear), &key, &legacy), CaRecordState::Reseal(c) if c.key_pem == ca.key_pem)
        );
        // Sealed by the version before the argon2id join key.
        let old = tessera_state::ca_record::to_record(&ca, &legacy, "c1").unwrap();
        assert!(
            matches!(ca_record_state(Some(&old), &key, &legacy), CaRecordState::Reseal(c) if c.key_pem == ca.key_pem)
        );
        // What a re-seal writes opens with the current key and needs nothing more.
        let new = tessera_state::ca_record::to_record(&ca, &key, "c1").unwrap();
        assert!(!new.to_string().contains("PRIVATE KEY"));
        assert!(matches!(
            ca_record_state(Some(&new), &key, &legacy),
            CaRecordState::Current
        ));
        // Another secret's record is left alone.
        let other = tessera_state::ca_record::to_record(&ca, &[9; 32], "c1").unwrap();
        assert!(matches!(
            ca_record_state(Some(&other), &key, &legacy),
            CaRecordState::Unopenable(_)
        ));
    }

    #[test]
    fn the_seed_names_the_node_before_the_host_does() {
        let me = NodeId("0123456789abcdef00112233445566ff".into());
        assert_eq!(node_name(Some("node2"), &me), "node2");
        assert!(!node_name(None, &me).is_empty());
    }

    #[test]
    fn a_node_id_gives_the_raft_id_of_its_first_64_bits() {
        let id = NodeId("0123456789abcdef00112233445566ff".into());
        assert_eq!(raft_id(&id), Ok(0x0123_4567_89ab_cdef));
    }

    #[test]
    fn a_node_id_that_does_not_parse_has_no_raft_id() {
        for bad in [
            "",
            "0123456789abcdef",                    // too short
            "0123456789abcdef00112233445566ff00",  // too long
            "0123456789abcdeg00112233445566ff",    // not hex
            "+123456789abcdef00112233445566ff",    // a sign from_str_radix would take
            "0123456789ABCDEF00112233445566FF",    // not as identities write it
            "0123456789abcdef0011223344556\u{e9}", // not ASCII
        ] {
            let id = NodeId(bad.into());
            assert_eq!(raft_id(&id), Err(BadNodeId(bad.into())), "{bad:?}");
        }
    }

    #[test]
    fn write_failures_are_told_apart_and_say_nothing_of_raft() {
        use tessera_state::{StateError, TransportError};
        let io = |kind| TransportError::Io {
            addr: "10.0.0.1:8007".into(),
            source: std::io::Error::from(kind),
        };
        let cases = [
            (
                StateError::Forward(io(std::io::ErrorKind::ConnectionRefused)),
                WriteFailure::Unknown,
            ),
            (
                StateError::Forward(io(std::io::ErrorKind::ConnectionReset)),
                WriteFailure::Unknown,
            ),
            (
                StateError::Forward(TransportError::Timeout {
                    addr: "10.0.0.1:8007".into(),
                }),
                WriteFailure::Unknown,
            ),
            (
                StateError::Forward(TransportError::Refused {
                    addr: "10.0.0.1:8007".into(),
                    message: "has to forward request to: Some(2), Some(BasicNode { addr: \"x\" })"
                        .into(),
                }),
                WriteFailure::Unknown,
            ),
            (
                StateError::NoLeader(tessera_state::LeaderError::NoLeader),
                WriteFailure::NotApplied,
            ),
            (StateError::Lagging, WriteFailure::Committed),
        ];
        for (e, want) in cases {
            let got = write_failure(&e);
            assert_eq!(got, want, "{e}");
            let m = got.message();
            for internal in ["BasicNode", "raft", "Raft", "8007", "Some("] {
                assert!(!m.contains(internal), "{m}");
            }
            assert!(!sync_failure(&e).contains("raft"));
        }
        assert!(WriteFailure::Unknown
            .message()
            .starts_with("outcome unknown"));
    }
}
