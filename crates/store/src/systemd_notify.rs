//! Tells systemd how `tessera-store serve` is doing (the node image's `Type=notify` unit):
//! READY=1 once the store serves, then WATCHDOG=1 and STATUS= each time its admin socket
//! answers a `status` request. The question comes from a thread of its own, so a store
//! whose async runtime stops serving stops the pings and systemd restarts it. Does
//! nothing when not started by systemd (no `NOTIFY_SOCKET`).

use std::path::Path;
use std::time::Duration;

use sd_notify::NotifyState;
use tessera_store::admin_client::AdminClient;
use tessera_store_admin::{AdminOp, AdminReply};

/// How long one status request may take before it counts as no answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Called once the store serves: READY=1 now, then the watchdog thread.
pub fn start(admin_socket: &Path) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    let mut usec = 0;
    // Three pings per watchdog period: one late answer does not get the store killed.
    let period = if sd_notify::watchdog_enabled(false, &mut usec) {
        Duration::from_micros(usec) / 3
    } else {
        Duration::from_secs(10)
    };
    let socket = admin_socket.to_path_buf();
    if let Err(e) = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || run(&socket, period))
    {
        tracing::warn!(error = %e, "cannot start the systemd notifier");
    }
}

fn run(socket: &Path, period: Duration) {
    loop {
        match ask(socket) {
            Ok(status) => {
                let states = [NotifyState::Status(&status), NotifyState::Watchdog];
                if let Err(e) = sd_notify::notify(false, &states) {
                    tracing::warn!(error = %e, "cannot notify systemd");
                }
            }
            Err(e) => tracing::warn!(error = %e, "admin socket did not answer: no watchdog ping"),
        }
        std::thread::sleep(period);
    }
}

/// The store's status as the one line `systemctl status tessera-store` shows. A degraded
/// store still answers, so it still pings: it keeps serving reads, and a restart is what
/// clears it, which is the operator's (or tesserad's) decision, not the watchdog's.
fn ask(socket: &Path) -> Result<String, String> {
    let mut client = AdminClient::connect(socket).map_err(|e| e.to_string())?;
    client
        .set_timeout(Some(ASK_TIMEOUT))
        .map_err(|e| e.to_string())?;
    match client.call(AdminOp::Status {}).map_err(|e| e.to_string())? {
        AdminReply::Status(s) => Ok(match s.degraded {
            Some(why) => format!("DEGRADED ({why}): flushes fail until a restart"),
            None => format!("serving {} volumes, {} snapshots", s.volumes, s.snapshots),
        }),
        other => Err(format!("unexpected reply {other:?}")),
    }
}
