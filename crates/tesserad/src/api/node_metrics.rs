//! A node's metrics: its last hour (`GET /api/v1/nodes/{id}/metrics`, asked of any node:
//! one that is not the node named forwards the request there over node-to-node HTTPS with
//! the caller's own credentials), and `GET /metrics`, this node's and the cluster's
//! numbers as Prometheus text.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use tessera_api::{MetricsQuery, NodeMetrics, Task, Vm, VmState};

use super::extract::{Auditor, Auth, Param, Q};
use super::{node, read, read_all, ApiError, ErrorBody, St};
use crate::health;
use crate::metrics::exposition::{render, Family, Kind};
use crate::metrics::history;
use crate::records::table::{NODES, TASKS, VMS, VOLUMES};

/// The header that marks a forwarded history request (it is never forwarded again).
const FORWARDED: &str = "x-tessera-forwarded";

/// How long the node named may take to answer a forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// A node's metrics over the last hour, one point every 10 s, oldest first (`since`: only
/// newer points), with the network per interface. Any node answers: the request is
/// forwarded to the node named, which keeps its own history (on disk too: it survives a
/// restart of the node's tesserad).
#[utoipa::path(get, path = "/api/v1/nodes/{id}/metrics", tag = "cluster",
    operation_id = "node_metrics",
    params(("id" = String, Path, description = "The node's id or name"), MetricsQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = NodeMetrics), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 502, body = ErrorBody, description = "The node named cannot be reached"),
        (status = 503, body = ErrorBody)))]
pub async fn history(
    State(st): St,
    _: Auth<Auditor>,
    Param(id): Param<String>,
    Q(q): Q<MetricsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let since = match q.since {
        Some(s) => Some(
            u64::try_from(s)
                .map_err(|_| ApiError::bad(format!("since must be 0 or more, not {s}")))?,
        ),
        None => None,
    };
    // The local view, as GET /nodes: a node's graphs stay readable without a leader.
    let n = node(&st)?;
    let registered = n
        .state
        .read(|t| serde_json::json!(t.get(NODES).cloned().unwrap_or_default()));
    let target = crate::replicated::names::resolve(
        &id,
        registered
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, rec)| (k.as_str(), rec["name"].as_str().unwrap_or_default())),
    )
    .map_err(super::node_lookup)?;
    if target == st.me.0 {
        let points = st
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since(since);
        return Ok(Json(NodeMetrics {
            node: target,
            interval_s: history::INTERVAL.as_secs() as u32,
            points,
        })
        .into_response());
    }
    if headers.contains_key(FORWARDED) {
        return Err(ApiError::conflict(format!(
            "node {target} was asked for its own metrics but is not this node"
        )));
    }
    let addr: SocketAddr = read::<Value>(&n, crate::vmrun::NODE_API, &target)?
        .and_then(|v| v["api"].as_str().and_then(|a| a.parse().ok()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("node {target} has published no API address"),
            )
        })?;
    let mut path = format!("/api/v1/nodes/{target}/metrics");
    if let Some(s) = since {
        path.push_str(&format!("?since={s}"));
    }
    let creds: Vec<(&'static str, String)> = [
        ("authorization", header::AUTHORIZATION),
        ("cookie", header::COOKIE),
    ]
    .into_iter()
    .filter_map(|(name, h)| Some((name, headers.get(h)?.to_str().ok()?.to_string())))
    .collect();
    let data_dir = st.data_dir.clone();
    let who = target.clone();
    let answer = tokio::task::spawn_blocking(move || forward(&data_dir, addr, &path, &creds))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match answer {
        Ok(body) => Ok((
            [(header::CONTENT_TYPE, "application/json")],
            axum::body::Bytes::from(body),
        )
            .into_response()),
        Err(Forwarded::Refused(code, msg)) => Err(ApiError::new(
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
            format!("node {who}: {msg}"),
        )),
        Err(Forwarded::Unreachable(e)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {who} ({addr}) cannot be reached for its metrics: {e}"),
        )),
    }
}

/// How a forwarded request failed.
enum Forwarded {
    /// The peer answered with an error: its status and words.
    Refused(u16, String),
    /// No answer.
    Unreachable(String),
}

/// GET `path` of the peer at `addr` with the caller's credentials (blocking). The peer's
/// certificate names its address, as for boot image fetches.
fn forward(
    data_dir: &Path,
    addr: SocketAddr,
    path: &str,
    creds: &[(&'static str, String)],
) -> Result<Vec<u8>, Forwarded> {
    let tls = crate::peer_https::client_config(data_dir).map_err(Forwarded::Unreachable)?;
    let agent = ureq::AgentBuilder::new()
        .tls_config(tls)
        .timeout(FORWARD_TIMEOUT)
        .build();
    let mut req = agent
        .get(&format!("https://{addr}{path}"))
        .set(FORWARDED, "1");
    for (h, v) in creds {
        req = req.set(h, v);
    }
    // A history is at most 360 points of ~300 bytes plus ~60 per interface (at most 8);
    // anything far larger is not one.
    const LIMIT: u64 = 4 << 20;
    let read_body = |resp: ureq::Response| {
        use std::io::Read;
        let mut body = Vec::new();
        resp.into_reader()
            .take(LIMIT)
            .read_to_end(&mut body)
            .map(|_| body)
    };
    match req.call() {
        Ok(resp) => read_body(resp).map_err(|e| Forwarded::Unreachable(e.to_string())),
        Err(ureq::Error::Status(code, resp)) => {
            let body = read_body(resp).unwrap_or_default();
            let msg = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            Err(Forwarded::Refused(code, msg))
        }
        Err(e) => Err(Forwarded::Unreachable(e.to_string())),
    }
}

/// Prometheus text (format 0.0.4) of this node's resource use and the cluster's counts
/// as this node sees them (nodes by health, VMs, volumes and tasks by state). Needs
/// credentials (an API token: `Authorization: Bearer`), Auditor or above.
pub async fn prometheus(State(st): St, _: Auth<Auditor>) -> Result<Response, ApiError> {
    let me = st.me.0.clone();
    let sample = st.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut fams = node_families(&me, &sample);
    if let Ok(n) = node(&st) {
        fams.extend(cluster_families(&st, &n)?);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&fams),
    )
        .into_response())
}

/// This node's families from the sampler's latest sample.
fn node_families(me: &str, s: &Value) -> Vec<Family> {
    let l = || vec![("node", me.to_string())];
    let num = |k: &str| s[k].as_f64();
    let mut out = Vec::new();
    let mut one = |name, kind, help, v: Option<f64>| {
        let mut f = Family::new(name, kind, help);
        if let Some(v) = v {
            f.sample(l(), v);
        }
        out.push(f);
    };
    one(
        "tessera_node_cpu_busy_ratio",
        Kind::Gauge,
        "Share of all CPU time that was busy over the last sampling interval (0-1).",
        num("cpu_percent").map(|p| p / 100.0),
    );
    one(
        "tessera_node_cpus",
        Kind::Gauge,
        "Logical CPUs of the node.",
        num("cpus"),
    );
    one(
        "tessera_node_memory_bytes",
        Kind::Gauge,
        "Physical memory of the node.",
        num("memory_total"),
    );
    one(
        "tessera_node_memory_used_bytes",
        Kind::Gauge,
        "Memory in use on the node.",
        num("memory_used"),
    );
    one(
        "tessera_node_uptime_seconds",
        Kind::Gauge,
        "Time since the node's operating system booted.",
        num("uptime_s"),
    );
    for (i, name) in [
        "tessera_node_load1",
        "tessera_node_load5",
        "tessera_node_load15",
    ]
    .into_iter()
    .enumerate()
    {
        one(
            name,
            Kind::Gauge,
            "Run queue load average (1, 5 and 15 minutes).",
            s["load"][i].as_f64(),
        );
    }
    one(
        "tessera_node_disk_read_bytes_total",
        Kind::Counter,
        "Bytes read from the device of the node's largest filesystem.",
        num("disk_read_bytes"),
    );
    one(
        "tessera_node_disk_written_bytes_total",
        Kind::Counter,
        "Bytes written to the device of the node's largest filesystem.",
        num("disk_written_bytes"),
    );
    one(
        "tessera_node_network_receive_bytes_total",
        Kind::Counter,
        "Bytes received on every network interface but loopback.",
        num("net_rx_bytes"),
    );
    one(
        "tessera_node_network_transmit_bytes_total",
        Kind::Counter,
        "Bytes sent on every network interface but loopback.",
        num("net_tx_bytes"),
    );
    let mut size = Family::new(
        "tessera_node_filesystem_size_bytes",
        Kind::Gauge,
        "Size of each mounted filesystem of the node.",
    );
    let mut free = Family::new(
        "tessera_node_filesystem_free_bytes",
        Kind::Gauge,
        "Bytes available to unprivileged users on each mounted filesystem of the node.",
    );
    // A mount point listed twice (a bind mount seen again) is one series, not two.
    let mut seen = std::collections::BTreeSet::new();
    for d in s["disks"].as_array().into_iter().flatten() {
        let mount = d["mount"].as_str().unwrap_or_default().to_string();
        if !seen.insert(mount.clone()) {
            continue;
        }
        if let Some(v) = d["total"].as_f64() {
            size.sample(vec![("node", me.to_string()), ("mount", mount.clone())], v);
        }
        if let Some(v) = d["available"].as_f64() {
            free.sample(vec![("node", me.to_string()), ("mount", mount)], v);
        }
    }
    out.push(size);
    out.push(free);
    out
}

/// Counts of `items` by state, every state in `all` present (0 when none is in it).
fn by_state(name: &'static str, help: &'static str, all: &[&str], states: Vec<String>) -> Family {
    let mut f = Family::new(name, Kind::Gauge, help);
    let mut names: Vec<String> = all.iter().map(|s| s.to_string()).collect();
    for s in &states {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    for s in names {
        let c = states.iter().filter(|x| **x == s).count();
        f.sample(vec![("state", s)], c as f64);
    }
    f
}

/// The serialized name of a state enum value.
fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The cluster's families, from this node's copy of the cluster state (no read barrier:
/// a scrape must answer while there is no leader, as GET /nodes does).
fn cluster_families(
    st: &super::ApiState,
    n: &tessera_state::Node,
) -> Result<Vec<Family>, ApiError> {
    let registered = n
        .state
        .read(|t| serde_json::json!(t.get(NODES).cloned().unwrap_or_default()));
    let heard = st.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let health = health::report(&st.me.0, &registered, &heard);
    let node_states: Vec<String> = registered
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, _)| {
            if *id == st.me.0 {
                "up".to_string()
            } else {
                health[id]["state"].as_str().unwrap_or("down").to_string()
            }
        })
        .collect();
    let vms = read_all::<Vm>(n, VMS)?
        .into_iter()
        .map(|(_, vm)| super::vms::with_status(n, vm).map(|v| word(&v.actual_state)))
        .collect::<Result<Vec<_>, _>>()?;
    let volumes = read_all::<crate::records::Volume>(n, VOLUMES)?
        .into_iter()
        .map(|(_, v)| word(&v.state))
        .collect();
    let tasks = read_all::<Task>(n, TASKS)?
        .into_iter()
        .map(|(_, t)| word(&t.state))
        .collect();
    let vm_states: Vec<String> = [
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Crashed,
    ]
    .iter()
    .map(word)
    .collect();
    let vm_states: Vec<&str> = vm_states.iter().map(String::as_str).collect();
    let leader = n.raft.metrics().borrow().current_leader == Some(n.id);
    let mut is_leader = Family::new(
        "tessera_cluster_leader",
        Kind::Gauge,
        "1 if this node is the cluster state's Raft leader, else 0.",
    );
    is_leader.sample(
        vec![("node", st.me.0.clone())],
        if leader { 1.0 } else { 0.0 },
    );
    Ok(vec![
        by_state(
            "tessera_cluster_nodes",
            "Registered nodes by health as this node sees them.",
            &["up", "suspect", "down"],
            node_states,
        ),
        by_state("tessera_cluster_vms", "VMs by state.", &vm_states, vms),
        by_state(
            "tessera_cluster_volumes",
            "Volumes by state.",
            &["creating", "ready", "deleting"],
            volumes,
        ),
        by_state(
            "tessera_cluster_tasks",
            "Tasks kept by the cluster, by state.",
            &["queued", "running", "succeeded", "failed"],
            tasks,
        ),
        is_leader,
    ])
}
