//! This node's network interfaces as `GET /nodes` shows them (`metrics.interfaces`): name,
//! MAC, MTU, link state, speed and byte counters from `/sys/class/net` (what the kernel
//! reports; a virtual interface has no speed), addresses from sysinfo (getifaddrs). The
//! counters are what the history's per-interface rates come from. Taps of VMs
//! (`tsn-*`) are left out: they come and go with VMs and say nothing about the node.

use std::path::Path;

use serde_json::{json, Value};
use sysinfo::Networks;

/// One file of `/sys/class/net/<name>/`, trimmed, if readable.
fn attr(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The interfaces under `sys` (normally `/sys/class/net`), sorted by name, with their
/// addresses from `nets`.
pub fn list(sys: &Path, nets: &Networks) -> Vec<Value> {
    let Ok(rd) = std::fs::read_dir(sys) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with(tessera_hostnet::names::TAP_PREFIX))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let dir = sys.join(&name);
            // `speed` is -1 or unreadable (EINVAL) when the link is down or virtual.
            let speed = attr(&dir, "speed")
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|s| *s > 0);
            let addresses: Vec<String> = nets
                .list()
                .get(&name)
                .map(|n| {
                    n.ip_networks()
                        .iter()
                        .map(|a| format!("{}/{}", a.addr, a.prefix))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "name": name,
                "mac": attr(&dir, "address"),
                "mtu": attr(&dir, "mtu").and_then(|m| m.parse::<u64>().ok()),
                "state": attr(&dir, "operstate"),
                "speed_mbps": speed,
                "addresses": addresses,
                "rx_bytes": attr(&dir, "statistics/rx_bytes").and_then(|b| b.parse::<u64>().ok()),
                "tx_bytes": attr(&dir, "statistics/tx_bytes").and_then(|b| b.parse::<u64>().ok()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_come_from_sys_with_their_state_and_speed() {
        let d = tempfile::tempdir().unwrap();
        for (name, state, speed) in [
            ("eth0", "up", "1000"),
            ("br0", "down", "-1"),
            ("tsn-web-0", "up", "10"),
        ] {
            let dir = d.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("operstate"), format!("{state}\n")).unwrap();
            std::fs::write(dir.join("speed"), speed).unwrap();
            std::fs::write(dir.join("address"), "52:54:00:00:00:01\n").unwrap();
            std::fs::write(dir.join("mtu"), "1500\n").unwrap();
        }
        std::fs::create_dir(d.path().join("eth0/statistics")).unwrap();
        std::fs::write(d.path().join("eth0/statistics/rx_bytes"), "123456\n").unwrap();
        std::fs::write(d.path().join("eth0/statistics/tx_bytes"), "not a number\n").unwrap();
        let l = list(d.path(), &Networks::new());
        assert_eq!(l.len(), 2, "taps are left out: {l:?}");
        assert_eq!(l[0]["name"], "br0");
        assert_eq!(l[0]["speed_mbps"], Value::Null);
        assert_eq!(l[0]["state"], "down");
        assert_eq!(l[1]["name"], "eth0");
        assert_eq!(l[1]["speed_mbps"], 1000);
        assert_eq!(l[1]["mtu"], 1500);
        assert_eq!(l[1]["mac"], "52:54:00:00:00:01");
        assert_eq!(l[1]["rx_bytes"], 123456);
        assert_eq!(
            l[1]["tx_bytes"],
            Value::Null,
            "an unreadable counter is no counter"
        );
        assert_eq!(l[0]["rx_bytes"], Value::Null);
    }
}
