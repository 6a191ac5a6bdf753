//! Self-fencing on this node: `tessera-ha`'s [`Guard`] fed every 100 ms from when the
//! management network last heard each registered peer. A node without contact to a
//! majority (itself counted) for `SELF_FENCE_AFTER` (2 s) kills every local VMM and, while
//! cut off, its reconciler starts none ([`fenced`]); the majority declares it down only at
//! 3 s, so its HA VMs are restarted elsewhere after the old copies are gone; back in
//! contact, it starts VMs again only once its copy of the cluster state caught up with the
//! leader's (it would otherwise restart what was moved away meanwhile). If a VMM still
//! lives at `WATCHDOG_AFTER` (2.5 s) the kill is repeated and, where `/dev/watchdog` exists,
//! the watchdog is opened and never fed, so the kernel resets the node after the device's
//! own timeout. Without a watchdog device only the repeated kill remains (logged).
//!
//! A freshly started daemon arms the guard once it reached a majority, or after
//! `STARTUP_GRACE` (10 s), counting its start as its last contact: a VMM it re-adopts is
//! not killed before the peers had a chance to be heard.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tessera_ha::timing::SELF_FENCE_AFTER;
use tessera_ha::{majority_contact, Guard, GuardAction, Millis};
use tessera_state::Command;

use crate::records::table::NODES;
use crate::tables::event;
use crate::vmrun::supervisor::{self, Exits, RunDir};

/// How often the guard looks.
const EVERY: Duration = Duration::from_millis(100);
/// How long a starting daemon waits for its first majority contact before the guard may
/// fence (a restart of tesserad under running VMMs must not kill them).
const STARTUP_GRACE: Millis = 10_000;
/// How often a self-fence event that could not be written is tried again, and for how
/// long.
const RECORD_RETRY: Duration = Duration::from_secs(1);
const RECORD_FOR: Duration = Duration::from_secs(300);
/// The kernel watchdog device.
const WATCHDOG: &str = "/dev/watchdog";

/// Whether this node is cut off from the majority (its reconciler must not start VMs).
static FENCED: AtomicBool = AtomicBool::new(false);
/// Losses of the majority so far, under the lock that also sets and lifts [`FENCED`]: a
/// lift that waited for the cluster state through a later loss must not take effect.
static LOSSES: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
/// How long one wait for the cluster state may take before it is asked again.
const SYNC_LIMIT: Duration = Duration::from_secs(2);

/// Whether this node is self-fenced: no contact to a majority for `SELF_FENCE_AFTER`.
pub fn fenced() -> bool {
    FENCED.load(Ordering::Relaxed)
}

/// The pids of the VMMs running on this node, by VM.
fn local_vmms(data_dir: &Path, exits: &Exits) -> Vec<(String, u32)> {
    supervisor::run_dirs(data_dir)
        .into_iter()
        .filter_map(|name| {
            supervisor::find_running(&RunDir::new(data_dir, &name), exits).map(|i| (name, i.pid))
        })
        .collect()
}

/// Writes the `ha.self_fence` event, on a task of its own so the guard never waits on
/// Raft: right after the contact is back this node may not know the leader yet ("no
/// leader elected"), so a refused write is tried again every second for a while.
fn record_self_fence(node: std::sync::Arc<tessera_state::Node>, me: String, msg: String) {
    tokio::spawn(async move {
        let since = Instant::now();
        loop {
            let cmd = Command::Txn {
                require: vec![],
                ops: vec![event("ha.self_fence", &me, "tesserad", &msg)],
            };
            match node.write(cmd).await {
                Ok(_) => return,
                Err(e) if since.elapsed() >= RECORD_FOR => {
                    tracing::warn!(error = %e, "self-fence event not recorded; giving up");
                    return;
                }
                Err(e) => {
                    tracing::info!(error = %e, "self-fence event not recorded yet; trying again")
                }
            }
            tokio::time::sleep(RECORD_RETRY).await;
        }
    });
}

/// Lifts the fence once this node's copy of the cluster state has caught up with the
/// leader's (`Node::sync`): until then it still shows what was true before the cut (the
/// VM placed here, running wanted), and the reconciler, seeing no VMM, would start a VM
/// the majority restarted elsewhere meanwhile (the partition test saw node1 start it
/// again right after the heal). Asked again every [`SYNC_LIMIT`] until it answers; a
/// later loss of the majority cancels it.
fn lift_when_caught_up(node: std::sync::Arc<tessera_state::Node>) {
    let losses = *LOSSES.lock().unwrap_or_else(|p| p.into_inner());
    tokio::spawn(async move {
        let since = Instant::now();
        loop {
            if *LOSSES.lock().unwrap_or_else(|p| p.into_inner()) != losses {
                return;
            }
            if let Ok(Ok(())) = tokio::time::timeout(SYNC_LIMIT, node.sync()).await {
                let now = LOSSES.lock().unwrap_or_else(|p| p.into_inner());
                if *now == losses {
                    FENCED.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        waited_ms = since.elapsed().as_millis() as u64,
                        "contact to a majority is back and the cluster state caught up: this node runs VMs again"
                    );
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Starts the guard loop.
pub fn start(shared: crate::SharedNode, me: String, heard: crate::Heard, data_dir: PathBuf) {
    tokio::spawn(async move {
        let node = loop {
            if let Some(n) = shared.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let clock = Instant::now();
        let ms = |t: Instant| t.saturating_duration_since(clock).as_millis() as Millis;
        let exits = Exits::default();
        let mut guard = Guard::new();
        // What was stopped while cut off, recorded once the majority is back.
        let mut stopped: Vec<String> = Vec::new();
        let mut lost_at: Option<Millis> = None;
        let mut watchdog: Option<std::fs::File> = None;
        let mut armed = false;
        loop {
            tokio::time::sleep(EVERY).await;
            let registered: Vec<String> = node.state.read(|t| {
                t.get(NODES)
                    .map(|n| n.keys().cloned().collect())
                    .unwrap_or_default()
            });
            if registered.is_empty() {
                continue;
            }
            let now = ms(Instant::now());
            let peers: Vec<Option<Millis>> = {
                let h = heard.lock().unwrap_or_else(|p| p.into_inner());
                registered
                    .iter()
                    .filter(|id| **id != me)
                    .map(|id| h.get(id).map(|t| ms(*t)))
                    .collect()
            };
            let size = registered.len().max(peers.len() + 1);
            let contact = majority_contact(now, &peers, size);
            if contact.is_some_and(|c| now.saturating_sub(c) < SELF_FENCE_AFTER) {
                armed = true;
            }
            // Starting up (the management network may not run yet): not before the
            // majority was reached once, or the grace is over.
            if !armed && now < STARTUP_GRACE {
                continue;
            }
            // Its own start counts as contact: nothing was heard yet, not nothing for long.
            let contact = contact.unwrap_or(0);
            let vmms = local_vmms(&data_dir, &exits);
            for action in guard.observe(now, Some(contact), vmms.len()) {
                match action {
                    GuardAction::QuorumLost => {
                        {
                            let mut losses = LOSSES.lock().unwrap_or_else(|p| p.into_inner());
                            *losses += 1;
                            FENCED.store(true, Ordering::Relaxed);
                        }
                        lost_at = Some(contact);
                        tracing::error!(
                            silent_ms = now.saturating_sub(contact),
                            "no contact to a majority of the cluster: this node starts no VM"
                        );
                    }
                    GuardAction::StopAllLocalVms => {
                        for (name, pid) in &vmms {
                            tracing::error!(vm = %name, pid, "self-fence: killing the VMM (no contact to a majority)");
                            supervisor::kill(*pid);
                            stopped.push(name.clone());
                        }
                    }
                    GuardAction::WatchdogReset => {
                        for (name, pid) in &vmms {
                            tracing::error!(vm = %name, pid, "self-fence: the VMM survived its kill; killing again");
                            supervisor::kill(*pid);
                        }
                        if Path::new(WATCHDOG).exists() && watchdog.is_none() {
                            // Opening arms it; never feeding it makes the kernel reset the node.
                            match std::fs::OpenOptions::new().write(true).open(WATCHDOG) {
                                Ok(f) => {
                                    tracing::error!(
                                        "self-fence: {WATCHDOG} armed and not fed: the node resets"
                                    );
                                    watchdog = Some(f);
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "self-fence: {WATCHDOG} cannot be opened")
                                }
                            }
                        } else if watchdog.is_none() {
                            tracing::error!(
                                "self-fence: no {WATCHDOG} on this node: no hardware reset"
                            );
                        }
                    }
                    GuardAction::QuorumRegained => {
                        lift_when_caught_up(node.clone());
                        if !stopped.is_empty() {
                            let silent = now.saturating_sub(lost_at.unwrap_or(now));
                            let msg = format!(
                                "{me} had no contact to a majority of the cluster (for about {} ms) \
                                 and stopped its VMs: {}",
                                silent,
                                stopped.join(", ")
                            );
                            record_self_fence(node.clone(), me.clone(), msg);
                            stopped.clear();
                        }
                        lost_at = None;
                    }
                }
            }
        }
    });
}
