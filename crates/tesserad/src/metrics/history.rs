//! The last hour of this node's metrics: a ring of [`POINTS`] points, one every
//! [`INTERVAL`], taken from the sampler's latest sample. Memory is bounded (a point is a
//! few dozen bytes; nothing else grows). Rates (disk and network bytes per second) come
//! from the difference of the sampler's counters between two points. Kept in memory
//! only: a restarted node starts a new hour.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tessera_api::MetricsPoint;

use super::Metrics;

/// Time between points.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Points kept: one hour.
pub const POINTS: usize = 360;

/// The history, shared with the API.
pub type History = Arc<Mutex<Ring>>;

/// The counters a rate is computed from, as of one point.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counters {
    t_ms: u64,
    disk_read: Option<u64>,
    disk_written: Option<u64>,
    net_rx: Option<u64>,
    net_tx: Option<u64>,
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
    /// beyond [`POINTS`]. A sample that is not yet there (null) adds nothing.
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
        };
        let before = self.last.filter(|b| b.t_ms < t_ms);
        let r = |f: fn(&Counters) -> Option<u64>| {
            before.and_then(|b| rate(f(&b), f(&now), t_ms - b.t_ms))
        };
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
        });
        while self.points.len() > POINTS {
            self.points.pop_front();
        }
        self.last = Some(now);
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

/// Starts keeping the history of `latest`: a point at once (or as soon as the sampler has
/// one), then every [`INTERVAL`].
pub fn start(latest: Metrics) -> History {
    let out: History = History::default();
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
            ring.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(crate::now_ms(), &sample);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::{Ring, POINTS};

    fn sample(rx: u64, read: u64) -> serde_json::Value {
        json!({
            "cpu_percent": 12.5, "memory_used": 100, "memory_total": 400,
            "disks": [{"total": 10, "available": 4}, {"total": 1000, "available": 250}],
            "disk_read_bytes": read, "disk_written_bytes": 0,
            "net_rx_bytes": rx, "net_tx_bytes": 0,
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
