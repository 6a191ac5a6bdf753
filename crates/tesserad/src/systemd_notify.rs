//! Tells systemd how `tesserad` is doing (the node image's `Type=notify` unit): READY=1
//! once the status socket answers, then WATCHDOG=1 and STATUS= each time it answers again.
//! The socket is served by the daemon's async runtime and the question comes from a
//! thread of its own, so a runtime that stops serving stops the pings and systemd
//! restarts the daemon. Does nothing when not started by systemd (no `NOTIFY_SOCKET`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use sd_notify::NotifyState;

/// How long one status question may take before it counts as no answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the notifier thread for the daemon whose seed is at `seed`.
pub fn start(seed: &Path) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    // A seed that does not load stops the daemon itself, with the error; nothing to tell.
    let Ok(seed) = tessera_cluster::seed::Seed::load(seed) else {
        return;
    };
    let mut usec = 0;
    // Three pings per watchdog period: one late answer does not get the daemon killed.
    let period = if sd_notify::watchdog_enabled(false, &mut usec) {
        Duration::from_micros(usec) / 3
    } else {
        Duration::from_secs(10)
    };
    let socket = seed.data_dir.join("tesserad.sock");
    if let Err(e) = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || run(&socket, period))
    {
        tracing::warn!(error = %e, "cannot start the systemd notifier");
    }
}

fn run(socket: &Path, period: Duration) {
    let mut ready = false;
    loop {
        match ask(socket) {
            Ok(doc) => {
                let status = summary(&doc);
                let mut states = vec![NotifyState::Status(&status), NotifyState::Watchdog];
                if !ready {
                    states.push(NotifyState::Ready);
                }
                if let Err(e) = sd_notify::notify(false, &states) {
                    tracing::warn!(error = %e, "cannot notify systemd");
                }
                ready = true;
            }
            Err(e) if ready => {
                tracing::warn!(error = %e, "status socket did not answer: no watchdog ping");
            }
            // Still starting: the socket is not bound yet.
            Err(_) => {}
        }
        std::thread::sleep(if ready {
            period
        } else {
            Duration::from_millis(200)
        });
    }
}

/// One `{"op":"status"}` question to the status socket.
fn ask(socket: &Path) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(ASK_TIMEOUT))?;
    s.set_write_timeout(Some(ASK_TIMEOUT))?;
    s.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    match v.get("ok") {
        Some(doc) => Ok(doc.clone()),
        None => Err(std::io::Error::other(format!("status socket said {v}"))),
    }
}

/// The one line `systemctl status tesserad` shows.
fn summary(doc: &serde_json::Value) -> String {
    let Some(cluster) = doc["cluster_id"].as_str() else {
        return "discovering peers: not in a cluster yet".to_string();
    };
    let short: String = cluster.chars().take(8).collect();
    match (doc["voters"].as_array(), doc["leader"].as_u64()) {
        (Some(voters), Some(leader)) => format!(
            "cluster {short}: {} voters, leader raft id {leader}",
            voters.len()
        ),
        (Some(voters), None) => format!("cluster {short}: {} voters, no leader", voters.len()),
        _ => format!("cluster {short}: starting the replicated state"),
    }
}
