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
//!
//! Where things live: [`run`] wires the parts together; `discovery` is the announce and
//! formation loop; `bootstrap` turns a formation decision into a running member
//! (founding, enrolling, joining, restarting); `status` serves the status socket;
//! `storage` watches the health of the node's `tessera-store`;
//! `replicated` is this node's Raft member and its TLS credentials; `tables` reads and
//! changes the cluster state's tables for the API and the task runner alike, and
//! `housekeeping` is what the leader drops from them. The binary
//! (`main.rs`) only parses arguments, sets up the process and calls [`run`].

#![forbid(unsafe_code)]

mod api;
mod bootstrap;
mod discovery;
mod ha;
mod health;
mod housekeeping;
mod images;
mod metrics;
mod migrate;
mod netrun;
mod peer_https;
mod records;
mod removed;
mod replicated;
mod replication;
mod status;
mod storage;
mod tables;
mod tasks;
mod vmrun;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tessera_cluster::identity::Identity;
use tessera_cluster::seed::Seed;

/// This node's Raft member, once it has one.
type SharedNode = Arc<Mutex<Option<Arc<tessera_state::Node>>>>;
/// When each peer was last heard on the management network.
type Heard = Arc<Mutex<HashMap<String, Instant>>>;

/// Milliseconds since the epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the daemon with the seed configuration at `seed_path` until SIGINT or SIGTERM.
pub async fn run(seed_path: &Path) -> anyhow::Result<()> {
    let seed = Seed::load(seed_path)?;
    // The seed holds the join secret and the data directory everything else: a data
    // directory made by an older version, or by hand with a wider umask, is made private
    // before anything is read from it.
    for private in [seed_path, seed.data_dir.as_path()] {
        tessera_store::daemon::make_private(private)
            .with_context(|| format!("making {} private", private.display()))?;
    }
    let identity = Identity::load_or_create(&seed.data_dir)?;
    let me = identity.node_id.clone();
    // Checked once here so a damaged identity stops the daemon before it announces
    // itself, rather than part-way through forming or joining.
    replicated::raft_id(&me).context("this node's identity")?;
    // A node removed from the cluster serves nothing but the news (see `removed`).
    if let Some(r) = removed::load(&seed.data_dir)? {
        return removed::serve(&seed, me, r).await;
    }
    let formed_path = seed.data_dir.join("formed.json");
    let persisted = bootstrap::load_formed(&formed_path)?;
    tracing::info!(node = %me, cluster = %seed.cluster_name, expected = seed.expected_nodes, address = %seed.management.address, "tesserad starting");
    if let Some(f) = &persisted {
        tracing::info!(cluster_id = %f.cluster_id, members = f.members.len(), "already a member of a formed cluster");
    }
    // What the status socket and the API report; filled in as the node forms and starts
    // Raft.
    let shared: SharedNode = Arc::new(Mutex::new(None));
    let cluster_id: Arc<Mutex<Option<String>>> =
        Arc::new(Mutex::new(persisted.as_ref().map(|f| f.cluster_id.clone())));
    let heard: Heard = Arc::new(Mutex::new(HashMap::new()));
    tasks::watch_health(heard.clone());
    replication::watch_health(heard.clone());
    let metrics = metrics::start();
    let history = metrics::history::start(metrics.clone(), &seed.data_dir);
    let storage = Arc::new(storage::Health::default());
    storage::start(
        seed.storage.admin_socket.clone(),
        me.0.clone(),
        shared.clone(),
        storage.clone(),
    );
    let api_state = Arc::new(api::ApiState {
        me: me.clone(),
        node: shared.clone(),
        cluster_id: cluster_id.clone(),
        heard: heard.clone(),
        metrics: metrics.clone(),
        history,
        storage: storage.clone(),
        data_dir: seed.data_dir.clone(),
    });
    status::serve(
        &seed.data_dir,
        status::Sources {
            me: me.clone(),
            cluster_id: cluster_id.clone(),
            node: shared.clone(),
            heard: heard.clone(),
            metrics: metrics.clone(),
            storage: storage.clone(),
        },
    )?;
    let networks = netrun::Networks::default();
    netrun::start(shared.clone(), me.0.clone(), networks.clone());
    let vm_local = vmrun::Local {
        networks,
        me: me.0.clone(),
        data_dir: seed.data_dir.clone(),
        // tessera-store's default: its NBD socket next to its admin socket.
        nbd_socket: seed.storage.admin_socket.with_file_name("nbd.sock"),
        tls_dir: seed.data_dir.join("tls"),
        api: seed.management.api_address(),
        management: seed.management.address,
        migrations: migrate::Registry::default(),
    };
    vmrun::start(shared.clone(), vm_local.clone());
    migrate::start(
        shared.clone(),
        migrate::Local {
            me: me.0.clone(),
            vmrun: vm_local,
            admin_socket: seed.storage.admin_socket.clone(),
        },
    );
    ha::start(
        shared.clone(),
        me.0.clone(),
        heard.clone(),
        seed.data_dir.clone(),
        api_state.clone(),
    );
    images::start(
        shared.clone(),
        me.0.clone(),
        seed.data_dir.clone(),
        seed.management.api_address(),
        seed.management.address,
    );
    let (joined_tx, joined_rx) = tokio::sync::mpsc::channel(1);
    let boot = bootstrap::Bootstrap::new(
        seed,
        me,
        formed_path,
        bootstrap::Published {
            node: shared,
            cluster_id,
            metrics,
            storage,
            api: api_state,
        },
        joined_tx,
    );
    if let Some(f) = &persisted {
        boot.restart(f).await?;
    }
    discovery::run(&boot, persisted, heard, joined_rx).await
}
