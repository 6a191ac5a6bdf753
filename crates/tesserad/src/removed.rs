//! A node removed from the cluster knows it: it notices its removal (a member answers its
//! RPCs with it, refuses its enrollment or join for it, or its own replicated membership
//! no longer holds it), writes that down in `<data_dir>/removed.json`, and from then on,
//! across restarts, serves nothing but a 503 on its API saying so and telling the operator
//! to wipe it. It runs no Raft member, no discovery, no tasks and no retry loops: one log
//! line at start and one per [`REMIND_EVERY`].
//!
//! A running node that notices it replaces itself (`exec` of its own binary with the same
//! arguments), so every loop of the member it was is gone at once and the new process
//! starts in the removed mode.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tessera_cluster::identity::NodeId;
use tessera_cluster::seed::Seed;
use tessera_state::network::admission::REMOVED_WORDS;
use tessera_state::Node;

use crate::{api, metrics, now_ms, replicated, status, storage};

/// The file that says this node was removed.
const FILE: &str = "removed.json";

/// How often the removed node says again, in its log, why it serves nothing.
const REMIND_EVERY: Duration = Duration::from_secs(300);

/// How often a running member looks for signs of its removal.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// What this node knows of its removal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Removed {
    /// How it learned it (a member's words, or what its membership showed).
    pub cause: String,
    /// When it learned it (ms since the epoch).
    pub noticed_ms: u64,
}

/// Whether an error (an enrollment or join refusal) says this node was removed.
pub(crate) fn says_removed(error: &str) -> bool {
    error.contains(REMOVED_WORDS)
}

/// Reads `<data_dir>/removed.json`, if this node was found removed before.
pub(crate) fn load(data_dir: &Path) -> anyhow::Result<Option<Removed>> {
    let path = data_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{} is damaged", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `<data_dir>/removed.json` whole (temporary file, sync, rename, directory sync).
fn save(data_dir: &Path, r: &Removed) -> anyhow::Result<()> {
    let path = data_dir.join(FILE);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", data_dir.display()))
}

/// What the API answers and the log says: why, and what the operator must do.
pub(crate) fn message(r: &Removed, data_dir: &Path) -> String {
    format!(
        "this node was removed from the cluster ({}); it serves nothing until it is wiped: \
         stop tesserad, delete its data directory {} (and its store's data), and start it \
         again to join as a new node",
        r.cause,
        data_dir.display()
    )
}

/// Records the removal and replaces this process with a fresh one of the same binary and
/// arguments, which starts in the removed mode. Returns only if that failed (the caller
/// then exits: a service manager starting it again gets the removed mode too).
pub(crate) fn record_and_restart(data_dir: &Path, cause: String) -> anyhow::Error {
    let r = Removed {
        cause,
        noticed_ms: now_ms(),
    };
    tracing::error!("{}", message(&r, data_dir));
    if let Err(e) = save(data_dir, &r) {
        return e.context("recording that this node was removed");
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "tesserad".into());
    // `/proc/self/exe` is this binary even if its file was replaced meanwhile. Every
    // descriptor Rust opens is close-on-exec: the listeners and the database go with the
    // old process; standard error (the log) stays.
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec();
    anyhow::Error::new(e).context("restarting tesserad in the removed mode")
}

/// Records the removal and restarts (see [`record_and_restart`]); exits if that fails.
pub(crate) fn stop_as_removed(data_dir: &Path, cause: String) -> ! {
    let e = record_and_restart(data_dir, cause);
    tracing::error!("{e:#}");
    std::process::exit(1)
}

/// Watches running member `node` (Raft id `id`) for signs of its removal: a member said so
/// (its transport kept the words), or the membership it replicates no longer holds it
/// (seen twice in a row, not a passing state).
pub(crate) fn watch(node: Arc<Node>, id: u64, data_dir: PathBuf) {
    tokio::spawn(async move {
        let mut left_out = 0u32;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if let Some(words) = node.transport.removed() {
                stop_as_removed(&data_dir, format!("a member said: {words}"));
            }
            let m = node.raft.metrics().borrow().membership_config.clone();
            let membership = m.membership();
            let without_me =
                membership.nodes().next().is_some() && membership.get_node(&id).is_none();
            left_out = if without_me { left_out + 1 } else { 0 };
            if left_out >= 2 {
                stop_as_removed(
                    &data_dir,
                    "the cluster's membership no longer includes it".to_string(),
                );
            }
        }
    });
}

/// Runs the removed mode until SIGINT or SIGTERM: the API answers every request 503 with
/// [`message`], the status socket answers (so a service manager sees the daemon alive),
/// nothing else runs.
pub(crate) async fn serve(seed: &Seed, me: NodeId, r: Removed) -> anyhow::Result<()> {
    let msg = message(&r, &seed.data_dir);
    tracing::error!("{msg}");
    status::serve(
        &seed.data_dir,
        status::Sources {
            me,
            cluster_id: Arc::new(Mutex::new(None)),
            node: Arc::new(Mutex::new(None)),
            heard: Arc::default(),
            metrics: metrics::start(),
            storage: Arc::new(storage::Health::default()),
        },
    )?;
    let api_addr = seed.management.api_address();
    match replicated::api_tls(&seed.data_dir) {
        Ok(tls) => {
            let msg = msg.clone();
            tokio::spawn(async move {
                if let Err(e) = api::serve_removed(api_addr, Arc::new(tls), msg).await {
                    tracing::error!(%api_addr, "REST API failed: {e:#}");
                }
            });
        }
        Err(e) => tracing::error!("REST API not started: {e:#}"),
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut remind =
        tokio::time::interval_at(tokio::time::Instant::now() + REMIND_EVERY, REMIND_EVERY);
    loop {
        tokio::select! {
            _ = remind.tick() => tracing::error!("{msg}"),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("stopping");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_is_kept_and_read_back_and_its_message_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let r = Removed {
            cause: "a member said so".into(),
            noticed_ms: 7,
        };
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(r.clone()));
        let m = message(&r, dir.path());
        assert!(
            m.contains("removed from the cluster") && m.contains("wiped") && m.contains("delete"),
            "{m}"
        );
        assert!(m.contains(&dir.path().display().to_string()), "{m}");
        assert!(says_removed(
            &tessera_state::network::admission::removed_message(5)
        ));
        assert!(!says_removed("connection refused"));
    }
}
