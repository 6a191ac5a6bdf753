//! This node's resource metrics (CPU, memory, load, disks), sampled every 2 s with sysinfo.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sysinfo::{Disks, System};

/// The latest sample, shared with the status socket.
pub type Metrics = Arc<Mutex<Value>>;

/// Starts sampling; returns the shared latest sample.
pub fn start() -> Metrics {
    let out: Metrics = Arc::new(Mutex::new(Value::Null));
    let shared = out.clone();
    tokio::spawn(async move {
        let mut sys = System::new();
        loop {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            let disks = Disks::new_with_refreshed_list();
            let load = System::load_average();
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
            });
            *shared.lock().unwrap_or_else(|p| p.into_inner()) = sample;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    out
}
