//! A node's metrics history survives its `tesserad` being killed and started again: the
//! points served before are served after (read through another node), followed by new
//! ones, the first of which has no rates (the counters before it were not kept); the
//! file is private, and the points name the node's interfaces, loopback left out.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use tessera_tests::cluster::{api, wait_for};
use tessera_tests::Lan;

/// Node `id`'s points as node `via` serves them, once it has at least `min`.
fn points(lan: &Lan, via: usize, admin: &str, id: &str, min: usize) -> Vec<Value> {
    wait_for(&format!("{min} metrics points of node {id}"), 60, || {
        let (code, v) = api(
            lan,
            via,
            "GET",
            &format!("nodes/{id}/metrics"),
            Some(admin),
            None,
        );
        let p = v["points"].as_array().cloned().unwrap_or_default();
        (code == 200 && p.len() >= min).then_some(p)
    })
}

/// The history of node `id` (any node but node 2 answers for it) before the restart,
/// once its newest point is in the node's file in `data_dir` (it is written right after
/// it is taken, on another thread).
pub fn before_restart(lan: &Lan, admin: &str, id: &str, data_dir: &Path) -> Vec<Value> {
    let p = points(lan, 2, admin, id, 2);
    let newest = format!("\"t_ms\":{},", p.last().unwrap()["t_ms"]);
    let file = data_dir.join("metrics-history.journal");
    wait_for("the newest point in the history file", 10, || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains(&newest)
            .then_some(())
    });
    p
}

/// After the restart: `before` is all there, in `data_dir`'s private file, then newer
/// points.
pub fn kept_across_the_restart(
    lan: &Lan,
    admin: &str,
    id: &str,
    node_index: usize,
    data_dir: &Path,
    before: &[Value],
) {
    let file = data_dir.join("metrics-history.journal");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    // The first point after the restart has no rates; before it, a point may have been
    // taken between reading `before` and the kill.
    let (after, restarted_at) = wait_for("a point taken after the restart", 60, || {
        let p = points(lan, 2, admin, id, before.len());
        let first = (before.len()..p.len()).find(|i| p[*i]["net_rx_bps"].is_null())?;
        Some((p, first))
    });
    let key = |p: &Value| {
        (
            p["t_ms"].as_u64().unwrap(),
            p["memory_used"].as_u64().unwrap(),
            p["disk_total"].as_u64().unwrap(),
            p["interfaces"].as_array().unwrap().len(),
        )
    };
    let kept: Vec<_> = after.iter().take(before.len()).map(key).collect();
    let had: Vec<_> = before.iter().map(key).collect();
    assert_eq!(kept, had, "the points from before the restart");
    assert!(restarted_at <= before.len() + 1, "{after:?}");
    let first_new = &after[restarted_at];
    let last_before = before.last().unwrap()["t_ms"].as_u64().unwrap();
    assert!(first_new["t_ms"].as_u64().unwrap() > last_before);

    // The interfaces in the points are the node's own (GET /nodes), loopback left out.
    let (_, nodes) = api(lan, node_index, "GET", "nodes", Some(admin), None);
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap();
    let has: Vec<&str> = node["metrics"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    let named: Vec<&str> = first_new["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(!named.is_empty(), "no interface in {first_new}");
    assert!(
        named.iter().all(|n| *n != "lo" && has.contains(n)),
        "{named:?} not among {has:?}"
    );
}
