//! From a formation decision to a running member of the cluster state: the founding node
//! mints the CA and initializes Raft; the other founders and later nodes enroll for a
//! certificate (and later nodes ask to be added); a restarted member starts from what it
//! stored. Once a member, the node serves the API, registers itself and runs its tasks.
//!
//! The outcome of formation is kept in `<data_dir>/formed.json`, written before the node
//! acts on it, so a restart resumes instead of forming again.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tessera_cluster::formation::Formed;
use tessera_cluster::identity::NodeId;
use tessera_cluster::seed::Seed;
use tessera_state::Node;
use tokio::sync::mpsc;

use crate::{api, metrics, removed, replicated, storage, tasks, SharedNode};

/// A formation outcome and the member started for it, reported by a background start.
pub(crate) type Joined = (Formed, Arc<Node>);

/// Reads `formed.json`, if this node has formed or joined a cluster before.
pub(crate) fn load_formed(path: &Path) -> anyhow::Result<Option<Formed>> {
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

/// Writes `formed.json` whole (temporary file, sync, rename).
fn save_formed(path: &Path, f: &Formed) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(f)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Where a running member is made known: the status socket and the API read these.
pub(crate) struct Published {
    pub node: SharedNode,
    pub cluster_id: Arc<Mutex<Option<String>>>,
    pub metrics: metrics::Metrics,
    pub storage: Arc<storage::Health>,
    pub api: Arc<api::ApiState>,
}

/// Turns formation decisions into this node's running member.
pub(crate) struct Bootstrap {
    seed: Seed,
    me: NodeId,
    formed_path: PathBuf,
    /// The addresses the API's certificate must be valid for.
    api_ips: Vec<IpAddr>,
    /// Peers heard on the management network: where to enroll and join.
    peers: replicated::Peers,
    published: Published,
    joined: mpsc::Sender<Joined>,
}

impl Bootstrap {
    pub(crate) fn new(
        seed: Seed,
        me: NodeId,
        formed_path: PathBuf,
        published: Published,
        joined: mpsc::Sender<Joined>,
    ) -> Self {
        let mut api_ips = vec![seed.management.api_address().ip()];
        if !api_ips.contains(&seed.management.address.ip()) {
            api_ips.push(seed.management.address.ip());
        }
        if let Some(why) = tessera_cluster::seed::weak_secret(&seed.join_secret) {
            tracing::warn!("WEAK JOIN SECRET: {why}");
        }
        Self {
            seed,
            me,
            formed_path,
            api_ips,
            peers: Arc::default(),
            published,
            joined,
        }
    }

    pub(crate) fn seed(&self) -> &Seed {
        &self.seed
    }

    pub(crate) fn me(&self) -> &NodeId {
        &self.me
    }

    /// The key enrollment and join requests of cluster `f` are signed with (derived from
    /// the join secret with the cluster's salt; cached after the first time).
    async fn join_key(&self, f: &Formed) -> anyhow::Result<[u8; 32]> {
        replicated::join_key(&self.seed.join_secret, &self.seed.cluster_name, f).await
    }

    /// Records a peer heard on the management network.
    pub(crate) fn heard_peer(&self, id: &NodeId, addr: SocketAddr) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.0.clone(), addr);
    }

    /// A member restarting: starts from its stored credentials, or enrolls again if it
    /// lost them.
    pub(crate) async fn restart(&self, f: &Formed) -> anyhow::Result<()> {
        let s = &self.seed;
        match replicated::load_tls(&s.data_dir)? {
            Some(tls) => {
                let key = self.join_key(f).await?;
                let node =
                    replicated::start(&self.me, s.management.address, &s.data_dir, key, tls, None)
                        .await?;
                replicated::reseal_ca(
                    node.clone(),
                    key,
                    replicated::legacy_join_key(&s.join_secret),
                    f.cluster_id.clone(),
                );
                if let Some(ca) = replicated::minted_ca(&s.data_dir) {
                    node.set_ca(ca.clone());
                    replicated::publish_ca(
                        node.clone(),
                        ca,
                        s.data_dir.clone(),
                        f.cluster_id.clone(),
                    );
                }
                self.member(node)?;
            }
            None => {
                tracing::warn!(
                    "a member without its cluster certificate: asking the others for one"
                );
                self.spawn_start(f.clone(), None);
            }
        }
        Ok(())
    }

    /// This node founds the cluster: mints the CA, initializes Raft with the founders
    /// (their addresses from `addr_of`) and creates the first administrator.
    pub(crate) async fn found(
        &self,
        f: &Formed,
        addr_of: impl Fn(&NodeId) -> Option<SocketAddr>,
    ) -> anyhow::Result<()> {
        let s = &self.seed;
        save_formed(&self.formed_path, f)?;
        tracing::info!(cluster_id = %f.cluster_id, members = ?f.members, "cluster formed: this node bootstraps it");
        let mut founders = BTreeMap::new();
        for m in &f.members {
            let addr = if *m == self.me {
                Some(s.management.address)
            } else {
                addr_of(m)
            };
            let addr = addr.with_context(|| format!("no address heard for founding member {m}"))?;
            founders.insert(replicated::raft_id(m)?, replicated::raft_addr(addr));
        }
        let (ca, tls) = replicated::mint(&s.data_dir, &f.cluster_id, &self.me, &self.api_ips)?;
        let node = replicated::start(
            &self.me,
            s.management.address,
            &s.data_dir,
            self.join_key(f).await?,
            tls,
            Some(founders),
        )
        .await?;
        node.set_ca(ca.clone());
        replicated::publish_ca(node.clone(), ca, s.data_dir.clone(), f.cluster_id.clone());
        tokio::spawn(api::create_first_admin(
            node.clone(),
            s.data_dir.join("initial-admin-password"),
        ));
        self.member(node)?;
        self.set_cluster_id(&f.cluster_id);
        Ok(())
    }

    /// Another node founds the cluster and this one is a founding member: it enrolls
    /// and starts in the background.
    pub(crate) fn adopt(&self, f: Formed) -> anyhow::Result<()> {
        save_formed(&self.formed_path, &f)?;
        tracing::info!(cluster_id = %f.cluster_id, members = ?f.members, "cluster formed: this node is a founding member");
        self.spawn_start(f, None);
        Ok(())
    }

    /// A cluster exists without this node: enroll, start and ask the members at `via`
    /// (management addresses) to add it, in the background.
    pub(crate) fn join(&self, formed: Formed, via: Vec<SocketAddr>) {
        self.spawn_start(formed, Some(via));
    }

    /// A background start finished: the node is a member.
    pub(crate) fn joined(&self, f: &Formed, node: Arc<Node>) -> anyhow::Result<()> {
        save_formed(&self.formed_path, f)?;
        tracing::info!(cluster_id = %f.cluster_id, "this node's member of the cluster state is running");
        self.member(node)?;
        self.set_cluster_id(&f.cluster_id);
        Ok(())
    }

    fn set_cluster_id(&self, id: &str) {
        *self
            .published
            .cluster_id
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(id.to_owned());
    }

    /// Enrolls if needed, starts the member, joins through `via` if given, and reports
    /// the running member on the `joined` channel.
    fn spawn_start(&self, formed: Formed, via: Option<Vec<SocketAddr>>) {
        let (me, mgmt, dir, tx, peers, ips) = (
            self.me.clone(),
            self.seed.management.address,
            self.seed.data_dir.clone(),
            self.joined.clone(),
            self.peers.clone(),
            self.api_ips.clone(),
        );
        let (secret, name) = (
            self.seed.join_secret.clone(),
            self.seed.cluster_name.clone(),
        );
        tokio::spawn(async move {
            let res = async {
                let join_key = replicated::join_key(&secret, &name, &formed).await?;
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
                        .map(|(id, a)| (NodeId(id), a))
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
                Err(e) => {
                    let e = format!("{e:#}");
                    if removed::says_removed(&e) {
                        removed::stop_as_removed(&dir, format!("a member said: {e}"));
                    }
                    tracing::error!("{e}");
                }
            }
        });
    }

    /// Once this node is a member: publish it in the cluster state, run its tasks, serve
    /// the API (HTTPS, with the node's cluster certificate).
    fn member(&self, node: Arc<Node>) -> anyhow::Result<()> {
        let s = &self.seed;
        let api_addr = s.management.api_address();
        match replicated::api_tls(&s.data_dir) {
            Ok(tls) => {
                let st = self.published.api.clone();
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
            self.me.clone(),
            replicated::node_name(s.node_name.as_deref(), &self.me),
            s.management.address,
            s.storage.nbd,
            self.published.metrics.clone(),
            self.published.storage.clone(),
        )?;
        tasks::start(
            node.clone(),
            self.me.0.clone(),
            s.storage.admin_socket.clone(),
        );
        removed::watch(
            node.clone(),
            replicated::raft_id(&self.me)?,
            s.data_dir.clone(),
        );
        *self
            .published
            .node
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(node);
        Ok(())
    }
}
