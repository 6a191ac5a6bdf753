//! This node's share of the cluster's networks: every network record becomes a bridge (and,
//! tagged, a VLAN interface) here through `tessera_hostnet::reconcile`, on start, when the
//! records change and every few seconds (so drift and a failed pass are repaired); a
//! network that cannot be set up here is reported in `network_status/<node id>`, which
//! `GET /networks` shows per node, and the others go on.
//!
//! Several `tesserad`s sharing one network namespace (the dev cluster's three nodes on one
//! machine) reconcile the same records to the same names and the same marks: what one made
//! the others find settled. A pass that races another (both create the bridge, one gets
//! "exists"; one sees it before the other marked it) fails for that pass only and is
//! retried shortly, and no pass deletes what it did not mark.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_api::{Network, NetworkOnNode};
use tessera_hostnet::NetworkDef;
use tessera_state::Command;

use crate::now_ms;
use crate::records::table::NETWORKS;
use crate::tables::get;

/// `network_status/<node id>`: that node's networks, `{network: NetworkOnNode}`.
pub const NETWORK_STATUS: &str = "network_status";

/// How often a settled node checks its networks again.
const RECHECK: Duration = Duration::from_secs(10);
/// How soon a pass that failed is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// The networks as this node last set them up (by network name), for the VM reconciler:
/// a tap joins the bridge named here.
#[derive(Clone, Debug, Default)]
pub struct Networks(Arc<Mutex<BTreeMap<String, NetworkOnNode>>>);

impl Networks {
    /// The bridge of `network` on this node, or why there is none.
    pub fn bridge(&self, network: &str) -> Result<String, String> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(network) {
            None => Err(format!("network {network} is not set up on this node yet")),
            Some(s) => match (&s.bridge, &s.error) {
                (Some(b), None) => Ok(b.clone()),
                (_, Some(e)) => Err(format!("network {network} is not set up on this node: {e}")),
                (None, None) => Err(format!("network {network} has no bridge on this node")),
            },
        }
    }
}

/// What `hostnet` is asked to set up for the records.
fn defs(records: &[Network]) -> Vec<NetworkDef> {
    records
        .iter()
        .map(|n| NetworkDef {
            name: n.name.clone(),
            vlan: n.vlan,
            uplink: n.uplink.clone(),
        })
        .collect()
}

/// The per-network status of a report.
fn statuses(report: &tessera_hostnet::Report, since_ms: u64) -> BTreeMap<String, NetworkOnNode> {
    report
        .networks
        .iter()
        .map(|r| {
            let error = r.result.as_ref().err().map(|e| e.to_string());
            let s = NetworkOnNode {
                bridge: r.bridge.clone(),
                vlan_interface: r.vlan_interface.clone(),
                state: if error.is_none() { "ok" } else { "error" }.into(),
                error,
                since_ms,
            };
            (r.network.clone(), s)
        })
        .collect()
}

/// Whether two status maps say the same, apart from when.
fn same(a: &BTreeMap<String, NetworkOnNode>, b: &BTreeMap<String, NetworkOnNode>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, va), (kb, vb))| {
            ka == kb
                && NetworkOnNode {
                    since_ms: 0,
                    ..va.clone()
                } == NetworkOnNode {
                    since_ms: 0,
                    ..vb.clone()
                }
        })
}

/// Starts the loop once `shared` has a Raft member; `nets` is filled after each pass.
pub fn start(shared: crate::SharedNode, me: String, nets: Networks) {
    tokio::spawn(async move {
        let node = loop {
            if let Some(n) = shared.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = node.sync().await;
        let mut rx = node.state.subscribe();
        let mut last: Option<(Vec<NetworkDef>, Instant, bool)> = None;
        loop {
            let records: Vec<Network> = node.state.read(|t| {
                t.get(NETWORKS)
                    .map(|t| {
                        t.values()
                            .filter_map(|v| serde_json::from_value(v.clone()).ok())
                            .collect()
                    })
                    .unwrap_or_default()
            });
            let want = defs(&records);
            let due = match &last {
                None => true,
                Some((d, at, ok)) => {
                    *d != want || at.elapsed() >= if *ok { RECHECK } else { RETRY }
                }
            };
            if due {
                let ok = pass(&node, &me, &want, &nets).await;
                last = Some((want, Instant::now(), ok));
            }
            if tokio::time::timeout(Duration::from_millis(500), rx.changed())
                .await
                .is_ok_and(|res| res.is_err())
            {
                return;
            }
        }
    });
}

/// One reconciliation; publishes the outcome when it changed. Whether all went well.
async fn pass(node: &tessera_state::Node, me: &str, want: &[NetworkDef], nets: &Networks) -> bool {
    let report = match tessera_hostnet::reconcile(want).await {
        Ok(r) => r,
        Err(e) => {
            // No netlink at all (no CAP_NET_ADMIN?): every network fails here alike.
            tracing::warn!(error = %e, "networks not reconciled");
            let msg = e.to_string();
            let map = want
                .iter()
                .map(|d| {
                    let s = NetworkOnNode {
                        bridge: None,
                        vlan_interface: None,
                        state: "error".into(),
                        error: Some(msg.clone()),
                        since_ms: now_ms(),
                    };
                    (d.name.clone(), s)
                })
                .collect();
            publish(node, me, nets, map).await;
            return false;
        }
    };
    let ok = report.networks.iter().all(|n| n.result.is_ok())
        && report.removed.iter().all(|(_, r)| r.is_ok());
    publish(node, me, nets, statuses(&report, now_ms())).await;
    ok
}

async fn publish(
    node: &tessera_state::Node,
    me: &str,
    nets: &Networks,
    map: BTreeMap<String, NetworkOnNode>,
) {
    *nets.0.lock().unwrap_or_else(|p| p.into_inner()) = map.clone();
    let old: Option<BTreeMap<String, NetworkOnNode>> = get(node, NETWORK_STATUS, me);
    if old.as_ref().is_some_and(|o| same(o, &map)) {
        return;
    }
    let res = node
        .write(Command::Put {
            table: NETWORK_STATUS.into(),
            key: me.into(),
            value: serde_json::json!(map),
        })
        .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "network status not recorded yet");
    }
}

/// `network`'s status on every node that reported it, for `GET /networks`.
pub fn on_nodes(node: &tessera_state::Node, network: &str) -> BTreeMap<String, NetworkOnNode> {
    node.state.read(|t| {
        t.get(NETWORK_STATUS)
            .map(|t| {
                t.iter()
                    .filter_map(|(id, v)| {
                        let s: NetworkOnNode = serde_json::from_value(v[network].clone()).ok()?;
                        Some((id.clone(), s))
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}
