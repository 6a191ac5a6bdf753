//! `tesserad`: the node's management daemon.
//!
//! It reads the seed configuration, keeps the node's identity, announces itself on the
//! management network (UDP multicast and static peers, authenticated with the join
//! secret), forms the cluster with the other expected nodes (persisting the outcome in
//! `<data_dir>/formed.json`), gets its cluster certificate (the founding node mints the
//! CA; the others enroll), then runs its member of the Raft-replicated cluster state over
//! mutual TLS and registers itself there. A node arriving after formation enrolls and
//! asks a member to add it (a join request signed with a key derived from the join
//! secret). Every member serves the REST API over HTTPS (`api`) and runs the tasks
//! assigned to it against its local `tessera-store` (`tasks`). A local status socket
//! (`<data_dir>/tesserad.sock`, root only) reports what it knows.

mod api;
mod health;
mod metrics;
mod records;
mod replicated;
mod tasks;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};
use tessera_cluster::discovery::{self, Announce, DiscoveryError, Key, Receiver};
use tessera_cluster::formation::{Action, Formation, Formed};
use tessera_cluster::identity::Identity;
use tessera_cluster::seed::Seed;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener};

#[derive(Parser)]
#[command(name = "tesserad", version, about = "Tessera's management daemon")]
struct Cli {
    /// The seed configuration.
    #[arg(long, default_value = "/etc/tessera/seed.toml")]
    seed: PathBuf,
}

/// How often a node announces itself.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
/// A peer unheard for this long no longer counts.
const LIVENESS_MS: u64 = 1_000;

fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Password hashing allocates ~19 MiB per hash. glibc would serve such blocks from a
    // heap it never gives back once its dynamic mmap threshold has grown; a fixed
    // threshold keeps large blocks in mmap, returned to the system when freed, so an idle
    // daemon stays small.
    // SAFETY: mallopt only changes allocator tunables; it is called before any other
    // thread exists, with a documented parameter and a positive value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Milliseconds since the epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn load_formed(path: &Path) -> anyhow::Result<Option<Formed>> {
    match std::fs::read(path) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{} is damaged", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_formed(path: &Path, f: &Formed) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(f)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// A UDP socket for discovery: bound to the group's port, member of the group on the
/// management interface, sending from it.
fn discovery_socket(seed: &Seed) -> anyhow::Result<UdpSocket> {
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

type SharedNode = Arc<Mutex<Option<Arc<tessera_state::Node>>>>;
/// When each peer was last heard on the management network.
type Heard = Arc<Mutex<HashMap<String, Instant>>>;

/// Serves `{"op":"status"}` on `<data_dir>/tesserad.sock` (mode 0600).
fn serve_status(
    dir: &Path,
    me: tessera_cluster::identity::NodeId,
    cluster_id: Arc<Mutex<Option<String>>>,
    node: SharedNode,
    heard: Heard,
    metrics: metrics::Metrics,
) -> anyhow::Result<()> {
    let path = dir.join("tesserad.sock");
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (me, cluster_id, node, heard, metrics) = (
                me.clone(),
                cluster_id.clone(),
                node.clone(),
                heard.clone(),
                metrics.clone(),
            );
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r.take(64 * 1024));
                let mut line = String::new();
                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let reply = match serde_json::from_str::<serde_json::Value>(&line) {
                        Ok(v) if v["op"] == "status" => {
                            let cid = cluster_id.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            let n = node.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            let mut st = replicated::status(&me, cid.as_deref(), n.as_deref());
                            let heard = heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            st["health"] = health::report(&me.0, &st["nodes"], &heard);
                            st["metrics"] =
                                metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            serde_json::json!({ "ok": st })
                        }
                        Ok(v) => serde_json::json!({ "error": format!("unknown op {}", v["op"]) }),
                        Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
                    };
                    let mut out = reply.to_string().into_bytes();
                    out.push(b'\n');
                    if w.write_all(&out).await.is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    Ok(())
}

/// Once this node is a member: publish it in the cluster state, run its tasks, serve
/// the API (HTTPS, with the node's cluster certificate).
fn member(
    seed: &Seed,
    me: &tessera_cluster::identity::NodeId,
    shared: &SharedNode,
    metrics: &metrics::Metrics,
    api_state: &Arc<api::ApiState>,
    node: Arc<tessera_state::Node>,
) {
    let api_addr = seed.management.api_address();
    match replicated::api_tls(&seed.data_dir) {
        Ok(tls) => {
            let st = api_state.clone();
            tokio::spawn(async move {
                if let Err(e) = api::serve(api_addr, st, Arc::new(tls)).await {
                    tracing::error!(%api_addr, "REST API failed: {e:#}");
                }
            });
        }
        Err(e) => tracing::error!("REST API not started: {e:#}"),
    }
    replicated::register(
        node.clone(),
        me.clone(),
        seed.management.address,
        seed.storage.nbd,
        metrics.clone(),
    );
    tasks::start(
        node.clone(),
        me.0.clone(),
        seed.storage.admin_socket.clone(),
    );
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(node);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let seed = Seed::load(&cli.seed)?;
    let identity = Identity::load_or_create(&seed.data_dir)?;
    let formed_path = seed.data_dir.join("formed.json");
    let persisted = load_formed(&formed_path)?;
    let me = identity.node_id.clone();
    tracing::info!(node = %me, cluster = %seed.cluster_name, expected = seed.expected_nodes, address = %seed.management.address, "tesserad starting");
    if let Some(f) = &persisted {
        tracing::info!(cluster_id = %f.cluster_id, members = f.members.len(), "already a member of a formed cluster");
    }
    // What the status socket reports; filled in as the node forms and starts Raft.
    let shared: Arc<Mutex<Option<Arc<tessera_state::Node>>>> = Arc::new(Mutex::new(None));
    let cluster_id: Arc<Mutex<Option<String>>> =
        Arc::new(Mutex::new(persisted.as_ref().map(|f| f.cluster_id.clone())));
    let heard: Heard = Arc::new(Mutex::new(HashMap::new()));
    let metrics = metrics::start();
    let api_state = Arc::new(api::ApiState {
        me: me.clone(),
        node: shared.clone(),
        cluster_id: cluster_id.clone(),
        heard: heard.clone(),
        metrics: metrics.clone(),
        lists: Mutex::default(),
    });
    // The API's certificate must be valid for the addresses clients use.
    let mut api_ips = vec![seed.management.api_address().ip()];
    if !api_ips.contains(&seed.management.address.ip()) {
        api_ips.push(seed.management.address.ip());
    }
    let join_key = replicated::join_key(&seed.join_secret);
    let (joined_tx, mut joined_rx) =
        tokio::sync::mpsc::channel::<(Formed, Arc<tessera_state::Node>)>(1);
    let peers: replicated::Peers = Arc::default();
    let spawn_start = |formed: Formed, via: Option<Vec<SocketAddr>>| {
        let (me, mgmt, dir, tx, peers, ips) = (
            me.clone(),
            seed.management.address,
            seed.data_dir.clone(),
            joined_tx.clone(),
            peers.clone(),
            api_ips.clone(),
        );
        tokio::spawn(async move {
            let res = async {
                let tls = match replicated::load_tls(&dir)? {
                    Some(t) => t,
                    None => replicated::enroll(&me, &dir, join_key, &peers, &ips).await?,
                };
                let node = replicated::start(&me, mgmt, &dir, join_key, tls, None).await?;
                if let Some(via) = via {
                    let known = peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let via: Vec<_> = known
                        .into_iter()
                        .filter(|(_, a)| via.contains(a))
                        .map(|(id, a)| (tessera_cluster::identity::NodeId(id), a))
                        .collect();
                    replicated::join(&node, &me, mgmt, &via, join_key).await?;
                    tracing::info!("joined the cluster");
                }
                anyhow::Ok(node)
            }
            .await;
            match res {
                Ok(node) => {
                    let _ = tx.send((formed, node)).await;
                }
                Err(e) => tracing::error!("{e:#}"),
            }
        });
    };
    serve_status(
        &seed.data_dir,
        me.clone(),
        cluster_id.clone(),
        shared.clone(),
        heard.clone(),
        metrics.clone(),
    )?;
    if let Some(f) = &persisted {
        match replicated::load_tls(&seed.data_dir)? {
            Some(tls) => {
                let node = replicated::start(
                    &me,
                    seed.management.address,
                    &seed.data_dir,
                    join_key,
                    tls,
                    None,
                )
                .await?;
                if let Some(ca) = replicated::minted_ca(&seed.data_dir) {
                    node.set_ca(ca.clone());
                    replicated::publish_ca(node.clone(), ca);
                }
                member(&seed, &me, &shared, &metrics, &api_state, node);
            }
            None => {
                tracing::warn!(
                    "a member without its cluster certificate: asking the others for one"
                );
                spawn_start(f.clone(), None);
            }
        }
    }
    let key = Key::from_secret(&seed.join_secret);
    let sock = discovery_socket(&seed)?;
    let incarnation = now_ms();
    let mut formation = Formation::new(
        &seed.cluster_name,
        me.clone(),
        seed.expected_nodes,
        LIVENESS_MS,
        now_ms(),
        persisted,
    );
    let mut receiver = Receiver::default();
    let mut seq = 0u64;
    let mut ticker = tokio::time::interval(ANNOUNCE_EVERY);
    let mut buf = vec![0u8; discovery::MAX_DATAGRAM + 1];
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
                let wire = discovery::encode(&a, &key);
                for t in &targets {
                    if let Err(e) = sock.send_to(&wire, t).await {
                        tracing::debug!(target = %t, error = %e, "announcement not sent");
                    }
                }
                match formation.decide(now) {
                    Action::Wait => {}
                    Action::Bootstrap(f) => {
                        save_formed(&formed_path, &f)?;
                        tracing::info!(cluster_id = %f.cluster_id, members = ?f.members, "cluster formed: this node bootstraps it");
                        let mut founders = BTreeMap::new();
                        for m in &f.members {
                            let addr = if *m == me { Some(seed.management.address) } else { formation.peer_addr(m) };
                            let addr = addr.with_context(|| format!("no address heard for founding member {m}"))?;
                            founders.insert(replicated::raft_id(m), replicated::raft_addr(addr));
                        }
                        let (ca, tls) = replicated::mint(&seed.data_dir, &f.cluster_id, &me, &api_ips)?;
                        let node = replicated::start(&me, seed.management.address, &seed.data_dir, join_key, tls, Some(founders)).await?;
                        node.set_ca(ca.clone());
                        replicated::publish_ca(node.clone(), ca);
                        tokio::spawn(api::create_first_admin(node.clone(), seed.data_dir.join("initial-admin-password")));
                        member(&seed, &me, &shared, &metrics, &api_state, node);
                        *cluster_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.cluster_id.clone());
                    }
                    Action::Adopt(f) => {
                        save_formed(&formed_path, &f)?;
                        tracing::info!(cluster_id = %f.cluster_id, members = ?f.members, "cluster formed: this node is a founding member");
                        spawn_start(f, None);
                    }
                    Action::Join { cluster_id, via, formed } => {
                        if !joining {
                            joining = true;
                            tracing::info!(%cluster_id, ?via, "a cluster exists: asking to join it");
                            spawn_start(formed, Some(via));
                        }
                    }
                }
            }
            Some((f, node)) = joined_rx.recv() => {
                save_formed(&formed_path, &f)?;
                tracing::info!(cluster_id = %f.cluster_id, "this node's member of the cluster state is running");
                formation.joined(f.clone());
                member(&seed, &me, &shared, &metrics, &api_state, node);
                *cluster_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.cluster_id.clone());
            }
            r = sock.recv_from(&mut buf) => {
                let (n, src) = match r {
                    Ok(x) => x,
                    Err(e) => { tracing::debug!(error = %e, "discovery receive failed"); continue; }
                };
                match discovery::decode(&buf[..n], &key) {
                    Ok(a) => match receiver.accept(&seed.cluster_name, &a, now_ms()) {
                        Ok(()) => {
                            formation.heard(&a, now_ms());
                            peers.lock().unwrap_or_else(|p| p.into_inner()).insert(a.node_id.0.clone(), a.addr);
                            heard.lock().unwrap_or_else(|p| p.into_inner()).insert(a.node_id.0.clone(), Instant::now());
                        }
                        Err(e) => tracing::debug!(%src, error = %e, "announcement ignored"),
                    },
                    Err(DiscoveryError::BadMac) => {
                        // Rate-limit both the log line and the rejection per sender.
                        let recent = refused.get(&src).is_some_and(|t| t.elapsed() < Duration::from_secs(5));
                        if !recent {
                            refused.insert(src, Instant::now());
                            tracing::warn!(%src, "refused an announcement: authentication failed (the sender has a different join secret)");
                            let _ = sock.send_to(&discovery::encode_reject("authentication failed: different join secret"), src).await;
                        }
                    }
                    Err(DiscoveryError::RejectedByPeer(reason)) => {
                        let recent = refused_by.get(&src).is_some_and(|t| t.elapsed() < Duration::from_secs(5));
                        if !recent {
                            refused_by.insert(src, Instant::now());
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
