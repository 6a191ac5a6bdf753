//! The discovery loop: announces this node on the management network (multicast and
//! static peers, authenticated with the join secret) five times a second, listens to the
//! others, feeds what it hears to the formation logic and hands its decisions to
//! [`Bootstrap`]. It runs for the daemon's whole life, since liveness (`health`) and late
//! joiners depend on the announcements.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};
use tessera_cluster::discovery::{self as wire, Announce, DiscoveryError, Key, Receiver};
use tessera_cluster::formation::{Action, Formation, Formed};
use tessera_cluster::kdf::{self, Salt};
use tessera_cluster::seed::Seed;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::bootstrap::{Bootstrap, Joined};
use crate::{now_ms, Heard};

/// How often a node announces itself.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
/// A peer unheard for this long no longer counts.
const LIVENESS_MS: u64 = 1_000;
/// At most one log line (and one rejection sent) per sender in this time.
const REFUSAL_QUIET: Duration = Duration::from_secs(5);
/// At most one key derivation for a salt not seen before is started per this time, one at
/// a time: each costs an argon2id run (tens of ms), and a flood of datagrams with made-up
/// salts must not take more than a fraction of a core.
const DERIVE_EVERY: Duration = Duration::from_millis(250);
/// Discovery keys kept, by salt (this node's and its cluster's are derived again if
/// evicted: the derivation cache in `kdf` keeps them too).
const KEYS_MAX: usize = 64;

/// The discovery keys this node knows, by salt, and the derivation under way (at most
/// one), so no datagram ever waits for or causes more than one argon2id run.
struct Keys {
    secret: String,
    cluster: String,
    known: HashMap<Salt, Key>,
    deriving: Option<Salt>,
    last_start: Option<Instant>,
    done_tx: mpsc::Sender<(Salt, Option<Key>)>,
}

impl Keys {
    /// The key for `salt`, deriving it now (off the async workers) if needed: for this
    /// node's own salt, which it must announce with.
    async fn get_now(&mut self, salt: Salt) -> anyhow::Result<Key> {
        if let Some(k) = self.known.get(&salt) {
            return Ok(k.clone());
        }
        let (secret, cluster) = (self.secret.clone(), self.cluster.clone());
        let keys =
            tokio::task::spawn_blocking(move || kdf::derive(&secret, &cluster, &salt)).await??;
        let k = Key::new(&keys);
        self.insert(salt, k.clone());
        Ok(k)
    }

    fn insert(&mut self, salt: Salt, k: Key) {
        if self.known.len() >= KEYS_MAX {
            if let Some(old) = self.known.keys().next().copied() {
                self.known.remove(&old);
            }
        }
        self.known.insert(salt, k);
    }

    /// The key for a peer's `salt` if known; otherwise starts deriving it in the
    /// background when the rate limit allows (the datagram is dropped: the peer announces
    /// again within 200 ms).
    fn lookup(&mut self, salt: Salt) -> Option<Key> {
        if let Some(k) = self.known.get(&salt) {
            return Some(k.clone());
        }
        let allowed =
            self.deriving.is_none() && self.last_start.is_none_or(|t| t.elapsed() >= DERIVE_EVERY);
        if allowed {
            self.deriving = Some(salt);
            self.last_start = Some(Instant::now());
            let (secret, cluster, tx) = (
                self.secret.clone(),
                self.cluster.clone(),
                self.done_tx.clone(),
            );
            tokio::task::spawn_blocking(move || {
                let k = match kdf::derive(&secret, &cluster, &salt) {
                    Ok(keys) => Some(Key::new(&keys)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot derive a discovery key");
                        None
                    }
                };
                let _ = tx.blocking_send((salt, k));
            });
        }
        None
    }

    fn derived(&mut self, salt: Salt, k: Option<Key>) {
        self.deriving = None;
        if let Some(k) = k {
            self.insert(salt, k);
        }
    }
}

/// A UDP socket for discovery: bound to the group's port, member of the group on the
/// management interface, sending from it.
fn socket(seed: &Seed) -> anyhow::Result<UdpSocket> {
    let group = match seed.management.multicast.ip() {
        IpAddr::V4(g) => g,
        IpAddr::V6(_) => anyhow::bail!("IPv6 multicast discovery is not supported yet"),
    };
    let iface = match seed.management.address.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => anyhow::bail!("an IPv6 management address is not supported yet"),
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    if !seed.management.use_multicast {
        s.bind(&seed.management.address.into()).with_context(|| {
            format!("binding the discovery address {}", seed.management.address)
        })?;
        return Ok(UdpSocket::from_std(s.into())?);
    }
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, seed.management.multicast.port())).into())
        .context("binding the discovery port")?;
    s.join_multicast_v4(&group, &iface)
        .with_context(|| format!("joining {group} on {iface}"))?;
    s.set_multicast_if_v4(&iface)?;
    s.set_multicast_loop_v4(false)?;
    Ok(UdpSocket::from_std(s.into())?)
}

/// Whether `src` was let through less than [`REFUSAL_QUIET`] ago; if not, notes it now.
fn recently(seen: &mut HashMap<SocketAddr, Instant>, src: SocketAddr) -> bool {
    if seen.get(&src).is_some_and(|t| t.elapsed() < REFUSAL_QUIET) {
        return true;
    }
    seen.insert(src, Instant::now());
    false
}

/// Announces, listens and acts on formation decisions until SIGINT or SIGTERM.
pub(crate) async fn run(
    boot: &Bootstrap,
    persisted: Option<Formed>,
    heard: Heard,
    mut joined: mpsc::Receiver<Joined>,
) -> anyhow::Result<()> {
    let seed = boot.seed();
    let me = boot.me();
    let sock = socket(seed)?;
    let incarnation = now_ms();
    let mut formation = Formation::new(
        &seed.cluster_name,
        me.clone(),
        seed.expected_nodes,
        LIVENESS_MS,
        now_ms(),
        persisted,
    );
    let (done_tx, mut done_rx) = mpsc::channel(4);
    let mut keys = Keys {
        secret: seed.join_secret.clone(),
        cluster: seed.cluster_name.clone(),
        known: HashMap::new(),
        deriving: None,
        last_start: None,
        done_tx,
    };
    keys.get_now(formation.salt()).await?;
    let mut receiver = Receiver::default();
    let mut seq = 0u64;
    let mut ticker = tokio::time::interval(ANNOUNCE_EVERY);
    let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
    // Rate limits, per sender: our refusals, and their refusals of us.
    let mut refused: HashMap<SocketAddr, Instant> = HashMap::new();
    let mut refused_by: HashMap<SocketAddr, Instant> = HashMap::new();
    let mut joining = false;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut targets = Vec::new();
    if seed.management.use_multicast {
        targets.push(seed.management.multicast);
    }
    targets.extend(seed.static_peers.iter().copied());
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                seq += 1;
                let now = now_ms();
                let a = Announce {
                    cluster: seed.cluster_name.clone(),
                    node_id: me.clone(),
                    addr: seed.management.address,
                    incarnation,
                    seq,
                    sent_ms: now,
                    proposal: formation.proposal(now),
                    formed: formation.formed().cloned(),
                };
                let salt = formation.salt();
                let key = keys.get_now(salt).await?;
                let datagram = wire::encode(&a, &salt, &key);
                for t in &targets {
                    if let Err(e) = sock.send_to(&datagram, t).await {
                        tracing::debug!(target = %t, error = %e, "announcement not sent");
                    }
                }
                match formation.decide(now) {
                    Action::Wait => {}
                    Action::Bootstrap(f) => boot.found(&f, |m| formation.peer_addr(m)).await?,
                    Action::Adopt(f) => boot.adopt(f)?,
                    Action::Join { cluster_id, via, formed } => {
                        if !joining {
                            joining = true;
                            tracing::info!(%cluster_id, ?via, "a cluster exists: asking to join it");
                            boot.join(formed, via);
                        }
                    }
                }
            }
            Some((salt, k)) = done_rx.recv() => keys.derived(salt, k),
            Some((f, node)) = joined.recv() => {
                formation.joined(f.clone());
                boot.joined(&f, node)?;
            }
            r = sock.recv_from(&mut buf) => {
                let (n, src) = match r {
                    Ok(x) => x,
                    Err(e) => { tracing::debug!(error = %e, "discovery receive failed"); continue; }
                };
                let d = &buf[..n];
                let decoded = match wire::peek(d) {
                    Ok(h) if h.cluster != seed.cluster_name => {
                        tracing::debug!(%src, cluster = %h.cluster, "announcement of another cluster ignored");
                        continue;
                    }
                    Ok(h) => match keys.lookup(h.salt) {
                        Some(k) => wire::decode(d, &k),
                        None => continue,
                    },
                    Err(e) => Err(e),
                };
                match decoded {
                    Ok(a) => match receiver.accept(&seed.cluster_name, &a, now_ms()) {
                        Ok(()) => {
                            formation.heard(&a, now_ms());
                            boot.heard_peer(&a.node_id, a.addr);
                            heard.lock().unwrap_or_else(|p| p.into_inner()).insert(a.node_id.0.clone(), Instant::now());
                        }
                        Err(e) => tracing::debug!(%src, error = %e, "announcement ignored"),
                    },
                    Err(DiscoveryError::BadMac) => {
                        if !recently(&mut refused, src) {
                            tracing::warn!(%src, "refused an announcement: authentication failed (the sender has a different join secret)");
                            let _ = sock.send_to(&wire::encode_reject("authentication failed: different join secret"), src).await;
                        }
                    }
                    Err(DiscoveryError::RejectedByPeer(reason)) => {
                        if !recently(&mut refused_by, src) {
                            tracing::error!(%src, %reason, "a peer rejected our announcement: check join_secret in the seed configuration");
                        }
                    }
                    Err(e) => tracing::debug!(%src, error = %e, "datagram ignored"),
                }
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("stopping");
                return Ok(());
            }
            _ = term.recv() => {
                tracing::info!("stopping");
                return Ok(());
            }
        }
    }
}
