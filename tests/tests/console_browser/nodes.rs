//! The Nodes page and the node metrics, in the console test's cluster and browser
//! session: the list shows the three nodes, a node's page draws its last hour (the
//! history forwarded from the node it belongs to) and lists its VMs and volumes; `GET
//! /metrics` is Prometheus text that `promtool` (Prometheus' own checker, not ours)
//! accepts, for an API token only; the history of one node is read through another; the
//! network graph per interface names the node's interfaces in its legend and its selector.

use std::process::{Command, Stdio};

use fantoccini::Client;
use serde_json::{json, Value};

use super::{click, el, fetch, go, shot, wait_js};

/// `curl` of `url` with the cluster CA and, if given, a bearer token: (status, content
/// type, body).
fn curl(ca: &str, url: &str, token: Option<&str>) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "--cacert",
        ca,
        "-w",
        "\n%{http_code} %{content_type}",
        url,
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (code, ct) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.parse().unwrap(), ct.to_string(), body.to_string())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The per-interface network graph of node `node`'s page (shown): its selector offers the
/// node's interfaces (as `GET /nodes` lists them, or as its metrics history names them:
/// the history keeps the past hour, so an interface gone since, such as a bridge another
/// test left on this host, may still be offered; loopback left out), its legend names
/// the one chosen (after uPlot's "Time"), and choosing another draws that one.
async fn interface_graph(c: &Client, nodes: &Value, node: &str, history: impl Fn() -> Value) {
    let mut has: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == node)
        .unwrap()["metrics"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .filter(|n| n != "lo")
        .collect();
    let state = |want: Option<&str>| {
        format!(
            "const s = document.getElementById('chart-ifnet-select'); \
             const box = document.getElementById('chart-ifnet'); \
             const legend = [...box.querySelectorAll('.u-legend .u-series .u-label')] \
                .map(l => l.textContent).slice(1); \
             if (!s || s.options.length === 0 || Number(box.dataset.points || 0) < 2) return false; \
             if ({want:?} && s.value !== {want:?}) return false; \
             return {{ options: [...s.options].map(o => o.value), chosen: s.value, legend }};",
            want = want.unwrap_or("")
        )
    };
    let first = wait_js(c, &state(None), "the per-interface graph drawn").await;
    let options: Vec<String> = serde_json::from_value(first["options"].clone()).unwrap();
    for p in history()["points"].as_array().unwrap() {
        for i in p["interfaces"].as_array().into_iter().flatten() {
            has.push(i["name"].as_str().unwrap().to_string());
        }
    }
    assert!(
        options.iter().all(|o| has.contains(o)),
        "{options:?} are not all among the node's interfaces {has:?}"
    );
    let chosen = first["chosen"].as_str().unwrap();
    assert_eq!(
        first["legend"],
        json!([format!("{chosen} received"), format!("{chosen} sent")]),
        "{first}"
    );
    // Another interface, chosen as a keyboard user would (the select's change event).
    let Some(other) = options.iter().find(|o| *o != chosen) else {
        return;
    };
    c.execute(
        "const s = document.getElementById('chart-ifnet-select'); s.focus(); \
         s.value = arguments[0]; s.dispatchEvent(new Event('change'));",
        vec![json!(other)],
    )
    .await
    .unwrap();
    let second = wait_js(c, &state(Some(other)), "the other interface's graph").await;
    assert_eq!(
        second["legend"],
        json!([format!("{other} received"), format!("{other} sent")]),
        "{second}"
    );
}

/// The checks; `n1`/`n2` are two nodes' console origins, the browser is logged in as an
/// administrator on `n2`, `token` is an API token (Operator).
pub async fn check(c: &Client, n1: &str, n2: &str, ca: &str, token: &str) {
    let nodes = fetch(c, "GET", "nodes", None).await.1;
    assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes}");
    let label = |id: &str| -> String {
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap();
        n["name"].as_str().unwrap_or(id).to_string()
    };

    // The list: three nodes, all up; no remove button for a node that is up.
    go(c, n2, "nodes").await;
    wait_js(
        c,
        "const r = document.querySelectorAll('tr[data-node]'); \
         return r.length === 3 && [...r].every(x => x.querySelector('.state-up'))",
        "three nodes up on the Nodes page",
    )
    .await;
    let removable = c
        .execute(
            "return document.querySelectorAll('main button[data-action=remove]').length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(removable, json!(0), "a remove button for a node that is up");
    shot(c, "nodes").await;

    // Maintenance on and off from the list, for a node without VMs (asked twice each).
    let free = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["allocation"]["vms"] == 0)
        .unwrap_or_else(|| panic!("no node without VMs to put in maintenance: {nodes}"));
    let (id, name) = (
        free["id"].as_str().unwrap(),
        label(free["id"].as_str().unwrap()),
    );
    for (button, on, next) in [
        ("maintenance", true, "end maintenance"),
        ("end maintenance", false, "maintenance"),
    ] {
        let sel = format!("tr[data-node=\"{name}\"] button[data-action=\"{button}\"]");
        click(c, &sel).await;
        let armed = format!(
            "const b = document.querySelector({}); return b && b.textContent.startsWith('Confirm')",
            json!(sel)
        );
        wait_js(c, &armed, "the maintenance button armed").await;
        click(c, &sel).await;
        let want = format!(
            "const r = document.querySelector('tr[data-node=\"{name}\"]'); \
             return r && r.querySelector('button[data-action=\"{next}\"]') \
             && r.innerText.includes('maintenance, drained') === {on}"
        );
        wait_js(c, &want, "the list to show the maintenance").await;
        let n = fetch(c, "GET", "nodes", None).await.1;
        let n = n
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap();
        assert_eq!(n["maintenance"].is_object(), on, "{n}");
    }

    // Node 1's id (n1 answers for itself); node 2 forwards node 1's history.
    let (code, _, body) = curl(ca, &format!("{n1}/api/v1/cluster"), Some(token));
    assert_eq!(code, 200, "{body}");
    let node1 = json_of(&body)["answered_by"].as_str().unwrap().to_string();

    // The history through another node: oldest first, one point every 10 s, by id or
    // name, `since` gives only newer points.
    let hist = |who: &str, q: &str| {
        curl(
            ca,
            &format!("{n2}/api/v1/nodes/{who}/metrics{q}"),
            Some(token),
        )
    };
    let (code, ct, body) = hist(&node1, "");
    assert_eq!(code, 200, "{body}");
    assert!(ct.starts_with("application/json"), "{ct}");
    let h = json_of(&body);
    assert_eq!(h["node"], node1.as_str());
    assert_eq!(h["interval_s"], 10);
    let points = h["points"].as_array().unwrap();
    assert!(points.len() >= 2, "a node up for a minute has points: {h}");
    let times: Vec<u64> = points.iter().map(|p| p["t_ms"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    for p in points {
        let cpu = p["cpu_percent"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{p}");
        assert!(p["memory_used"].as_u64().unwrap() <= p["memory_total"].as_u64().unwrap());
        assert!(p["disk_total"].as_u64().unwrap() > 0, "{p}");
    }
    // Every point but the first has its rates, per interface too (loopback left out).
    assert!(points[1]["net_rx_bps"].is_number(), "{}", points[1]);
    let ifaces = points[1]["interfaces"].as_array().unwrap();
    assert!(!ifaces.is_empty(), "{}", points[1]);
    assert!(
        ifaces
            .iter()
            .all(|i| i["name"] != "lo" && i["rx_bps"].is_number() && i["tx_bps"].is_number()),
        "{}",
        points[1]
    );
    let before_last = times[times.len() - 2];
    let (code, _, body) = hist(&label(&node1), &format!("?since={before_last}"));
    assert_eq!(code, 200, "{body}");
    let newer = json_of(&body)["points"].as_array().unwrap().clone();
    assert!(!newer.is_empty());
    assert!(
        newer
            .iter()
            .all(|p| p["t_ms"].as_u64().unwrap() > before_last),
        "{newer:?}"
    );
    assert_eq!(hist("no-such-node", "").0, 404);
    assert_eq!(hist(&node1, "?since=soon").0, 400);
    let (code, _, _) = curl(ca, &format!("{n2}/api/v1/nodes/{node1}/metrics"), None);
    assert_eq!(code, 401);

    // GET /metrics: for a token only; text that promtool accepts (HELP and TYPE for
    // every family, names as Prometheus wants them), with this node's and the cluster's
    // numbers.
    let (code, _, _) = curl(ca, &format!("{n2}/metrics"), None);
    assert_eq!(code, 401, "/metrics without a token");
    let (code, ct, text) = curl(ca, &format!("{n2}/metrics"), Some(token));
    assert_eq!(code, 200, "{text}");
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "tessera_cluster_nodes{state=\"up\"} 3",
        "# TYPE tessera_node_network_receive_bytes_total counter",
        "# TYPE tessera_node_cpu_busy_ratio gauge",
        "tessera_cluster_vms{state=\"stopped\"} ",
        "tessera_cluster_volumes{state=\"ready\"} ",
        "tessera_cluster_tasks{state=\"succeeded\"} ",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let vms_total: f64 = text
        .lines()
        .filter(|l| l.starts_with("tessera_cluster_vms{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    let vms = fetch(c, "GET", "vms", None).await.1;
    assert_eq!(vms_total as usize, vms.as_array().unwrap().len(), "{text}");

    // A node's page on node 2's console: the node that holds volume web-data (node 1's,
    // so its history comes through node 2), and the node the guest ran on.
    let volumes = fetch(c, "GET", "volumes", None).await.1;
    let holder = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web-data")
        .unwrap()["node"]
        .as_str()
        .unwrap()
        .to_string();
    let guest = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "guest")
        .unwrap();
    let ran_on = guest["running_on"]
        .as_str()
        .or(guest["node"].as_str())
        .unwrap_or_else(|| panic!("the guest ran nowhere: {guest}"))
        .to_string();
    let pages = [
        (holder, "tr[data-volume=\"web-data\"]", "#node-volumes"),
        (ran_on, "tr[data-vm=\"guest\"]", "#node-vms"),
    ];
    for (i, (node, row, section)) in pages.into_iter().enumerate() {
        go(c, n2, &format!("nodes/{node}")).await;
        el(c, &format!("{section} {row}")).await;
        // Every graph drawn with the history's points: a canvas with something on it.
        let drawn = wait_js(
            c,
            "const charts = [...document.querySelectorAll('#node-charts .chart')]; \
             if (charts.length !== 6) return false; \
             const counts = charts.map(ch => Number(ch.dataset.points || 0)); \
             if (counts.some(n => n < 2)) return false; \
             const cv = document.querySelector('#chart-cpu canvas'); \
             if (!cv || !cv.width) return false; \
             const px = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data; \
             let ink = 0; for (let k = 3; k < px.length; k += 4) if (px[k]) ink++; \
             return ink > 100 ? counts : false;",
            "the node's six graphs drawn with points",
        )
        .await;
        assert!(drawn.as_array().unwrap().len() == 6, "{drawn}");
        if i == 0 {
            let history = || {
                let url = format!("{n1}/api/v1/nodes/{node}/metrics");
                let (code, _, body) = curl(ca, &url, Some(token));
                assert_eq!(code, 200, "{body}");
                json_of(&body)
            };
            interface_graph(c, &nodes, &node, history).await;
            shot(c, "node-detail").await;
        }
    }
    // The page refreshes itself every 10 s, asking only for the points it lacks, without
    // a reload (the marker survives).
    c.execute(
        "window.noReload = true; performance.clearResourceTimings()",
        vec![],
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(25);
    loop {
        let asked = c
            .execute(
                "return window.noReload === true && performance.getEntriesByType('resource')\
                    .some(e => /\\/metrics\\?since=\\d+$/.test(e.name))",
                vec![],
            )
            .await
            .unwrap();
        if asked == json!(true) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node page did not ask for new points within 25 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
