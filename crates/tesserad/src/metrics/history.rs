//! The last hour of this node's metrics: a ring of [`POINTS`] points, one every
//! [`INTERVAL`], taken from the sampler's latest sample. Memory is bounded (a point is a
//! few dozen bytes; nothing else grows). Rates (disk and network bytes per second) come
//! from the difference of the sampler's counters between two points, per interface too
//! (see [`MAX_INTERFACES`]). Every point is also kept on disk (`journal`), so a restarted
//! node serves the hour before its restart; the first point after a start has no rates
//! (the counters before it were not kept), which shows the gap in the graphs.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tessera_api::{InterfaceRates, MetricsPoint};

use super::{journal, Metrics};

/// Time between points.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Points kept: one hour.
pub const POINTS: usize = 360;
/// How far back a point is kept, whatever their number (a node that was down for a while
/// has fewer points in its last hour).
pub const SPAN_MS: u64 = 3_600_000;
/// Interfaces kept per point: those that moved the most bytes. A node with many bridges
/// or VLAN interfaces keeps its busy ones and a point stays small. Loopback (the node
/// talking to itself) and VM taps (they come and go with VMs; the sampler's interface
/// list has none) are never among them.
pub const MAX_INTERFACES: usize = 8;

/// The history, shared with the API.
pub type History = Arc<Mutex<Ring>>;

/// An interface's received and sent byte counters (`None` where unreadable).
type RxTx = (Option<u64>, Option<u64>);

/// The counters a rate is computed from, as of one point.
#[derive(Clone, Debug, Default, PartialEq)]
struct Counters {
    t_ms: u64,
    disk_read: Option<u64>,
    disk_written: Option<u64>,
    net_rx: Option<u64>,
    net_tx: Option<u64>,
    /// Received and sent bytes by interface name.
    interfaces: BTreeMap<String, RxTx>,
}

/// The points, oldest first, at most [`POINTS`].
#[derive(Debug, Default)]
pub struct Ring {
    points: VecDeque<MetricsPoint>,
    last: Option<Counters>,
}

/// Per second from `before` to `now` over `dt_ms`; `None` without both values, without
/// time passing, or when the counter went backwards (an interface gone, a reset).
fn rate(before: Option<u64>, now: Option<u64>, dt_ms: u64) -> Option<f64> {
    let (b, n) = (before?, now?);
    if dt_ms == 0 || n < b {
        return None;
    }
    Some((n - b) as f64 * 1000.0 / dt_ms as f64)
}

impl Ring {
    /// Adds the point for `sample` (the sampler's JSON) taken at `t_ms`; drops the oldest
    /// beyond [`POINTS`] or the hour. A sample that is not yet there (null) adds nothing.
    pub fn push(&mut self, t_ms: u64, sample: &Value) {
        if !sample.is_object() {
            return;
        }
        let u = |k: &str| sample[k].as_u64();
        let now = Counters {
            t_ms,
            disk_read: u("disk_read_bytes"),
            disk_written: u("disk_written_bytes"),
            net_rx: u("net_rx_bytes"),
            net_tx: u("net_tx_bytes"),
            interfaces: busiest_interfaces(sample),
        };
        let before = self.last.take().filter(|b| b.t_ms < t_ms);
        let r = |f: fn(&Counters) -> Option<u64>| {
            before
                .as_ref()
                .and_then(|b| rate(f(b), f(&now), t_ms - b.t_ms))
        };
        let interfaces = now
            .interfaces
            .iter()
            .map(|(name, &(rx, tx))| {
                let was = before
                    .as_ref()
                    .and_then(|b| Some((b.t_ms, *b.interfaces.get(name)?)));
                let r = |f: fn(RxTx) -> Option<u64>| {
                    was.and_then(|(bt, c)| rate(f(c), f((rx, tx)), t_ms - bt))
                };
                InterfaceRates {
                    name: name.clone(),
                    rx_bps: r(|c| c.0),
                    tx_bps: r(|c| c.1),
                }
            })
            .collect();
        // The largest filesystem, as the dashboard and the node list count it.
        let disk = sample["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .max_by_key(|d| d["total"].as_u64().unwrap_or(0));
        let disk_total = disk.and_then(|d| d["total"].as_u64()).unwrap_or(0);
        let disk_free = disk.and_then(|d| d["available"].as_u64()).unwrap_or(0);
        self.points.push_back(MetricsPoint {
            t_ms,
            cpu_percent: sample["cpu_percent"].as_f64().unwrap_or(0.0),
            memory_used: u("memory_used").unwrap_or(0),
            memory_total: u("memory_total").unwrap_or(0),
            disk_used: disk_total.saturating_sub(disk_free),
            disk_total,
            disk_read_bps: r(|c| c.disk_read),
            disk_write_bps: r(|c| c.disk_written),
            net_rx_bps: r(|c| c.net_rx),
            net_tx_bps: r(|c| c.net_tx),
            interfaces,
        });
        self.trim(t_ms);
        self.last = Some(now);
    }

    /// Drops points beyond [`POINTS`] or older than [`SPAN_MS`] before `now_ms`.
    fn trim(&mut self, now_ms: u64) {
        while self.points.len() > POINTS {
            self.points.pop_front();
        }
        if let Some(from) = now_ms.checked_sub(SPAN_MS) {
            while self.points.front().is_some_and(|p| p.t_ms <= from) {
                self.points.pop_front();
            }
        }
    }

    /// A ring holding `points` kept from before a restart, as of `now_ms`: those in time
    /// order within the last [`SPAN_MS`] (none from the future: a clock set back would
    /// put the next points before them).
    pub fn restored(points: Vec<MetricsPoint>, now_ms: u64) -> Ring {
        let mut r = Ring::default();
        for p in points {
            if p.t_ms <= now_ms && r.points.back().is_none_or(|b| b.t_ms < p.t_ms) {
                r.points.push_back(p);
            }
        }
        r.trim(now_ms);
        r
    }

    /// Every point, oldest first (what the journal rewrites).
    pub fn all(&self) -> Vec<MetricsPoint> {
        self.points.iter().cloned().collect()
    }

    /// The points taken after `since_ms` (all with `None`), oldest first.
    pub fn since(&self, since_ms: Option<u64>) -> Vec<MetricsPoint> {
        let from = since_ms.unwrap_or(0);
        // Points are in time order: skip the old ones from the front.
        let start = self.points.partition_point(|p| p.t_ms <= from);
        self.points.range(start..).cloned().collect()
    }

    /// The newest point.
    #[cfg(test)]
    pub fn latest(&self) -> Option<&MetricsPoint> {
        self.points.back()
    }
}

/// The sampler's interfaces with their counters, at most [`MAX_INTERFACES`]: those that
/// moved the most bytes, loopback left out.
fn busiest_interfaces(sample: &Value) -> BTreeMap<String, RxTx> {
    let mut all: Vec<(String, Option<u64>, Option<u64>)> = sample["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let name = i["name"].as_str()?;
            (name != "lo").then(|| {
                (
                    name.to_string(),
                    i["rx_bytes"].as_u64(),
                    i["tx_bytes"].as_u64(),
                )
            })
        })
        .collect();
    // Busiest first; equal ones by name, so the choice does not flicker between points.
    all.sort_by(|a, b| {
        let moved = |x: &(String, Option<u64>, Option<u64>)| {
            x.1.unwrap_or(0).saturating_add(x.2.unwrap_or(0))
        };
        moved(b).cmp(&moved(a)).then_with(|| a.0.cmp(&b.0))
    });
    all.into_iter()
        .take(MAX_INTERFACES)
        .map(|(n, rx, tx)| (n, (rx, tx)))
        .collect()
}

/// Starts keeping the history of `latest`, restored from and kept in `data_dir`'s
/// journal: a point at once (or as soon as the sampler has one), then every
/// [`INTERVAL`]. The journal is written on its own thread: a slow or full disk delays
/// or loses the file's copy, never the history served.
pub fn start(latest: Metrics, data_dir: &Path) -> History {
    let path = data_dir.join(journal::FILE);
    let kept = journal::load(&path);
    let out: History = Arc::new(Mutex::new(Ring::restored(kept, crate::now_ms())));
    let writer = journal::Writer::start(path, out.clone());
    let ring = out.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The sampler's first sample arrives within moments of the start.
        while latest.lock().unwrap_or_else(|p| p.into_inner()).is_null() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            tick.tick().await;
            let sample = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut r = ring.lock().unwrap_or_else(|p| p.into_inner());
            r.push(crate::now_ms(), &sample);
            if let Some(p) = r.points.back() {
                writer.record(p.clone());
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::{Ring, MAX_INTERFACES, POINTS, SPAN_MS};

    fn sample(rx: u64, read: u64) -> serde_json::Value {
        json!({
            "cpu_percent": 12.5, "memory_used": 100, "memory_total": 400,
            "disks": [{"total": 10, "available": 4}, {"total": 1000, "available": 250}],
            "disk_read_bytes": read, "disk_written_bytes": 0,
            "net_rx_bytes": rx, "net_tx_bytes": 0,
            "interfaces": [
                {"name": "eth0", "rx_bytes": rx, "tx_bytes": 2 * rx},
                {"name": "lo", "rx_bytes": 1u64 << 40, "tx_bytes": 1u64 << 40},
            ],
        })
    }

    #[test]
    fn rates_come_from_the_counters_between_points() {
        let mut r = Ring::default();
        r.push(10_000, &sample(1_000, 0));
        r.push(20_000, &sample(11_000, 5_000));
        let p = r.since(None);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].net_rx_bps, None, "no earlier point");
        assert_eq!(p[1].net_rx_bps, Some(1_000.0));
        assert_eq!(p[1].disk_read_bps, Some(500.0));
        assert_eq!((p[1].disk_used, p[1].disk_total), (750, 1000));
        // A counter that went backwards (an interface gone) is no rate, not a huge one.
        r.push(30_000, &sample(5, 5_000));
        assert_eq!(r.latest().unwrap().net_rx_bps, None);
        assert_eq!(r.latest().unwrap().disk_read_bps, Some(0.0));
    }

    #[test]
    fn each_interface_has_its_rates_loopback_none() {
        let mut r = Ring::default();
        r.push(10_000, &sample(1_000, 0));
        r.push(20_000, &sample(11_000, 0));
        let p = r.since(None);
        let names = |i: usize| {
            p[i].interfaces
                .iter()
                .map(|x| x.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(0), ["eth0"], "loopback is not a network graph");
        assert_eq!(p[0].interfaces[0].rx_bps, None, "no earlier point");
        assert_eq!(p[1].interfaces[0].rx_bps, Some(1_000.0));
        assert_eq!(p[1].interfaces[0].tx_bps, Some(2_000.0));
        // An interface that appears has no rate in its first point; the busiest are kept.
        let mut many = sample(21_000, 0);
        let list = many["interfaces"].as_array_mut().unwrap();
        for i in 0..MAX_INTERFACES + 3 {
            list.push(json!({"name": format!("br{i:02}"), "rx_bytes": i, "tx_bytes": 0}));
        }
        r.push(30_000, &many);
        let last = r.latest().unwrap();
        assert_eq!(last.interfaces.len(), MAX_INTERFACES);
        let eth0 = last.interfaces.iter().find(|i| i.name == "eth0").unwrap();
        assert_eq!(eth0.rx_bps, Some(1_000.0), "the busiest stays");
        assert!(last
            .interfaces
            .iter()
            .all(|i| i.name == "eth0" || i.rx_bps.is_none()));
        assert!(!last
            .interfaces
            .iter()
            .any(|i| i.name == "br00" || i.name == "br03"));
        let names: Vec<&str> = last.interfaces.iter().map(|i| i.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "sorted by name");
    }

    #[test]
    fn a_restored_ring_keeps_the_last_hour_in_order_and_starts_without_rates() {
        let mut before = Ring::default();
        for i in 0..20u64 {
            before.push(i * 10_000, &sample(i * 1000, 0));
        }
        let kept = before.all();
        let now = 19 * 10_000 + 5 * 60_000;
        let mut r = Ring::restored(kept.clone(), now);
        assert_eq!(r.all(), kept);
        r.push(now, &sample(1_000_000, 0));
        assert_eq!(
            r.latest().unwrap().net_rx_bps,
            None,
            "the counters were not kept"
        );
        assert_eq!(r.all().len(), 21);
        // Old points, points out of order and points from the future are dropped.
        let mut odd = kept.clone();
        odd.swap(3, 4);
        let later = SPAN_MS + 50_000;
        let r = Ring::restored(odd, later);
        let times: Vec<u64> = r.all().iter().map(|p| p.t_ms).collect();
        assert_eq!(times, (6..20u64).map(|i| i * 10_000).collect::<Vec<_>>());
        let early: Vec<u64> = Ring::restored(kept, 95_000)
            .all()
            .iter()
            .map(|p| p.t_ms)
            .collect();
        assert_eq!(
            early,
            (0..10u64).map(|i| i * 10_000).collect::<Vec<_>>(),
            "none ahead"
        );
    }

    #[test]
    fn the_ring_keeps_one_hour_and_answers_what_is_new() {
        let mut r = Ring::default();
        r.push(1, &serde_json::Value::Null);
        assert!(r.since(None).is_empty(), "no sample yet, no point");
        for i in 0..(POINTS as u64 + 50) {
            r.push(i * 10_000, &sample(i, i));
        }
        let all = r.since(None);
        assert_eq!(all.len(), POINTS);
        assert_eq!(all[0].t_ms, 50 * 10_000);
        let newest = all.last().unwrap().t_ms;
        assert_eq!(r.since(Some(newest)).len(), 0);
        let tail = r.since(Some(newest - 25_000));
        assert_eq!(
            tail.iter().map(|p| p.t_ms).collect::<Vec<_>>(),
            vec![newest - 20_000, newest - 10_000, newest]
        );
    }
}
