//! This node's resource metrics (CPU, memory, load, disks, disk and network I/O, its
//! network interfaces), sampled every 2 s with sysinfo; `history` keeps the last hour of
//! them (on disk too: `journal`), `exposition` writes them (and the cluster's counts) as
//! Prometheus text.

pub mod exposition;
pub mod history;
pub mod interfaces;
pub mod journal;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sysinfo::{Disks, Networks, System};

/// The latest sample, shared with the status socket.
pub type Metrics = Arc<Mutex<Value>>;

/// Starts sampling; returns the shared latest sample.
pub fn start() -> Metrics {
    let out: Metrics = Arc::new(Mutex::new(Value::Null));
    let shared = out.clone();
    tokio::spawn(async move {
        let mut sys = System::new();
        let mut networks = Networks::new_with_refreshed_list();
        loop {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            networks.refresh(true);
            let disks = Disks::new_with_refreshed_list();
            let load = System::load_average();
            // Loopback traffic is the node talking to itself: not what a network graph
            // is for.
            let (rx, tx) = networks
                .iter()
                .filter(|(name, _)| name.as_str() != "lo")
                .fold((0u64, 0u64), |(rx, tx), (_, n)| {
                    (
                        rx.saturating_add(n.total_received()),
                        tx.saturating_add(n.total_transmitted()),
                    )
                });
            // I/O of the largest filesystem's device (the one the dashboard counts).
            let io = disks
                .list()
                .iter()
                .max_by_key(|d| d.total_space())
                .map(|d| d.usage());
            let sample = json!({
                "host": System::host_name(),
                "uptime_s": System::uptime(),
                "cpu_percent": sys.global_cpu_usage(),
                "cpus": sys.cpus().len(),
                "memory_total": sys.total_memory(),
                "memory_used": sys.used_memory(),
                "load": [load.one, load.five, load.fifteen],
                "disks": disks.list().iter().map(|d| json!({
                    "mount": d.mount_point().display().to_string(),
                    "total": d.total_space(),
                    "available": d.available_space(),
                })).collect::<Vec<_>>(),
                "disk_read_bytes": io.map(|u| u.total_read_bytes),
                "disk_written_bytes": io.map(|u| u.total_written_bytes),
                "net_rx_bytes": rx,
                "net_tx_bytes": tx,
                "interfaces": interfaces::list(Path::new("/sys/class/net"), &networks),
            });
            *shared.lock().unwrap_or_else(|p| p.into_inner()) = sample;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    out
}
