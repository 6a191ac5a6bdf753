//! Removing a dead node from the Nodes page (issue #13), at the end of the console story:
//! node 3's processes are killed (SIGKILL, as a power cut would), the page marks it down
//! and offers Remove (asking twice); the API refuses the plain removal because node 3
//! holds the only copy of a volume, the page shows why and offers Force remove (asking
//! twice too), which removes it. The node leaves the list, the two others keep quorum with
//! a leader, the dashboard says so, and the cluster goes on working (a new volume gets
//! ready).

use std::path::Path;
use std::time::{Duration, Instant};

use fantoccini::Client;
use serde_json::{json, Value};
use tessera_tests::devcluster::pids_where;

use super::{click, el, fetch, go, log_in, shot, wait_js, NEW_PASSWORD};

/// Polls the API (through the page) until `f` accepts the answer of `GET /api/v1/<path>`;
/// bounded.
async fn poll(c: &Client, path: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = fetch(c, "GET", path, None).await;
        if code == 200 && f(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {code} {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the button `css` says it is armed (the confirm-twice buttons).
async fn armed(c: &Client, css: &str) {
    wait_js(
        c,
        &format!(
            "const b = document.querySelector({}); return b && b.textContent.startsWith('Confirm')",
            json!(css)
        ),
        &format!("{css} armed"),
    )
    .await;
}

/// `n1` is node 1's console (the browser is logged out); `cluster_dir` the dev cluster's
/// directory, whose `node3/` the node's processes name on their command lines.
pub async fn check(c: &Client, n1: &str, cluster_dir: &Path) {
    log_in(c, n1, "admin", NEW_PASSWORD).await;
    wait_js(
        c,
        "return document.getElementById('main').dataset.page === 'dashboard'",
        "node 1's dashboard",
    )
    .await;
    let nodes = fetch(c, "GET", "nodes", None).await.1;
    let id3 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node3")
        .unwrap_or_else(|| panic!("no node3: {nodes}"))["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The only copy of a volume on node 3: its removal will need force.
    let (code, task) = fetch(
        c,
        "POST",
        "volumes",
        Some(json!({"name": "only-on-3", "size_bytes": 1048576, "node": id3, "replicas": 1})),
    )
    .await;
    assert_eq!(code, 202, "{task}");
    poll(c, "volumes/only-on-3", "only-on-3 ready", |v| {
        v["state"] == "ready"
    })
    .await;

    // Node 3 dies.
    let mark = format!("{}/", cluster_dir.join("node3").display());
    let pids = pids_where(|cmd| {
        ["tesserad", "tessera-store", "tessera-vmm"]
            .iter()
            .any(|p| cmd.contains(p))
            && cmd.contains(&mark)
    });
    assert!(pids.len() >= 2, "node 3's tesserad and store: {pids:?}");
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    // The Nodes page marks it down and offers Remove (node 1 and 2: nothing but
    // Maintenance, which a node that is down does not offer).
    go(c, n1, "nodes").await;
    let row = "tr[data-node=\"node3\"]";
    let remove = format!("{row} button[data-action=remove]");
    wait_js(
        c,
        &format!(
            "const r = document.querySelector({}); return r && r.querySelector('.state-down') \
             && r.querySelector('button[data-action=remove]')",
            json!(row)
        ),
        "node3 down with a Remove button",
    )
    .await;
    let others = c
        .execute(
            "return document.querySelectorAll('tr[data-node]:not([data-node=node3]) button:not([data-action=maintenance])').length \
             + document.querySelectorAll('tr[data-node=node3] button[data-action=maintenance]').length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(others, json!(0), "a button for a node that is up");
    // Asked twice; the API refuses (the only copy of only-on-3 is there) and the page says
    // why, with the API's words, and offers force.
    click(c, &remove).await;
    armed(c, &remove).await;
    click(c, &remove).await;
    let force = format!("{row} button[data-action=\"force remove\"]");
    let said = wait_js(
        c,
        &format!(
            "const m = document.querySelector('#messages .alert'); \
             return document.querySelector({}) && m && m.textContent",
            json!(force)
        ),
        "the refusal and the Force remove button",
    )
    .await;
    let said = said.as_str().unwrap();
    assert!(
        said.contains("holds volumes") && said.contains("only-on-3"),
        "{said}"
    );
    assert_eq!(
        fetch(c, "GET", "nodes", None)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        3,
        "a refused removal removed the node"
    );
    shot(c, "node-remove-refused").await;
    click(c, &force).await;
    armed(c, &force).await;
    click(c, &force).await;
    wait_js(
        c,
        &format!(
            "const m = document.querySelector('#messages .notice'); \
             return !document.querySelector({}) && m && m.textContent.includes('node3 removed from the cluster')",
            json!(row)
        ),
        "node3 gone from the list",
    )
    .await;
    shot(c, "node-removed").await;

    // The cluster without it: two nodes up, both voters, a leader; an event says who.
    let nodes = poll(c, "nodes", "two nodes up", |v| {
        v.as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|n| n["state"] == "up"))
    })
    .await;
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["id"] != id3.as_str()));
    let cluster = poll(c, "cluster", "two voters and a leader", |v| {
        v["voters"].as_array().is_some_and(|a| a.len() == 2) && v["leader_node"].is_string()
    })
    .await;
    assert_ne!(cluster["leader_node"], id3.as_str(), "{cluster}");
    let events = fetch(c, "GET", "events?limit=200", None).await.1;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "node.remove"
                && e["target"] == id3.as_str()
                && e["user"] == "admin"),
        "{events}"
    );
    go(c, n1, "").await;
    wait_js(
        c,
        "const h = document.getElementById('health'); \
         return h && h.innerText.includes('Quorum') && h.innerText.includes('Voters up: 2 of 2')",
        "the dashboard's quorum of two",
    )
    .await;
    shot(c, "dashboard-after-removal").await;
    // It still works: a new volume (the default copies on the nodes left) gets ready.
    let (code, task) = fetch(
        c,
        "POST",
        "volumes",
        Some(json!({"name": "after-removal", "size_bytes": 1048576})),
    )
    .await;
    assert_eq!(code, 202, "{task}");
    let v = poll(c, "volumes/after-removal", "after-removal ready", |v| {
        v["state"] == "ready"
    })
    .await;
    assert_ne!(v["node"], id3.as_str(), "{v}");
    el(c, "#health").await;
}
