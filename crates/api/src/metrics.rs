//! A node's metrics history: the last hour of its resource use, one point every 10 s.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// One sample of a node's resource use. Rates are per second over the interval before the
/// point; `null` where there is no earlier point to compare with (the first point after a
/// start) or a counter went backwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricsPoint {
    /// When it was taken, milliseconds since the epoch.
    pub t_ms: u64,
    /// CPU busy, 0-100 (all cores together).
    pub cpu_percent: f64,
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Physical memory, bytes.
    pub memory_total: u64,
    /// Used bytes of the node's largest filesystem.
    pub disk_used: u64,
    /// Size of that filesystem, bytes.
    pub disk_total: u64,
    /// Bytes read per second from that filesystem's device.
    pub disk_read_bps: Option<f64>,
    /// Bytes written per second to that filesystem's device.
    pub disk_write_bps: Option<f64>,
    /// Bytes received per second, every interface but loopback.
    pub net_rx_bps: Option<f64>,
    /// Bytes sent per second, every interface but loopback.
    pub net_tx_bps: Option<f64>,
    /// Per network interface, sorted by name: every interface of the node but loopback
    /// and VM taps (`tsn-*`), at most the 8 that have moved the most bytes. Absent in
    /// points kept by a version without it (read as empty).
    #[serde(default)]
    pub interfaces: Vec<InterfaceRates>,
}

/// One network interface's traffic in a [`MetricsPoint`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InterfaceRates {
    /// The interface's name (`eth0`, `br-lan`).
    pub name: String,
    /// Bytes received per second; `null` where the interface has no earlier point (new,
    /// or the first point after a start) or its counter went backwards.
    pub rx_bps: Option<f64>,
    /// Bytes sent per second; `null` as for `rx_bps`.
    pub tx_bps: Option<f64>,
}

/// A node's metrics history, oldest point first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeMetrics {
    /// The node's id.
    pub node: String,
    /// Seconds between points.
    pub interval_s: u32,
    /// At most one hour of points, oldest first.
    pub points: Vec<MetricsPoint>,
}

/// Which points of a history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Only points taken after this time (milliseconds since the epoch): a page that
    /// already holds the history asks for what is new. Signed with a minimum of 0 so the
    /// schema's bounds are the server's: an unsigned field took values past int64's
    /// maximum that the document (int64) calls invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 0)]
    pub since: Option<i64>,
}
