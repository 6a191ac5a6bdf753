//! The VM list with more VMs than a page holds (issue #13): the console asks the API for
//! one page (`GET /vms?limit=50`), filtered by the server (`q`, `state`), never for every
//! VM; the page and the filter are in the address, so Next, Back and a reload keep them;
//! the dashboard counts VMs by state from `GET /cluster` without loading them. The API's
//! paging and filters answered as documented (`X-Total-Count`, 400 for a bad limit or
//! state), read with the browser's own `fetch`.

use fantoccini::Client;
use serde_json::{json, Value};

use super::{el, fetch, go, shot, wait_js};

/// How many VMs the test adds, named after every VM the story made (`guest`, `web`), so
/// those stay on the first page for the later checks.
const BULK: usize = 55;
/// The console's page size (crates/console/assets/vms.js).
const PAGE: usize = 50;

/// `GET /api/v1/<path>` from the page: (status, body, `X-Total-Count`).
async fn get_page(c: &Client, path: &str) -> (u64, Value, Option<u64>) {
    let js = r#"
        const [path, done] = arguments;
        fetch('/api/v1/' + path, {credentials: 'same-origin'})
          .then(async r => done([r.status, await r.text(), r.headers.get('x-total-count')]))
          .catch(e => done([0, String(e), null]));
    "#;
    let v = c.execute_async(js, vec![json!(path)]).await.unwrap();
    let body = v[1].as_str().unwrap_or_default();
    (
        v[0].as_u64().unwrap(),
        serde_json::from_str(body).unwrap_or(json!(body)),
        v[2].as_str().and_then(|t| t.parse().ok()),
    )
}

/// The names in the VM list's rows, in order.
async fn rows(c: &Client) -> Vec<String> {
    let v = c
        .execute(
            "return [...document.querySelectorAll('#vm-list tr[data-vm]')].map(r => r.dataset.vm)",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// Waits until the list shows `count` rows and its counter says `says`.
async fn wait_list(c: &Client, count: usize, says: &str) {
    wait_js(
        c,
        &format!(
            "const n = document.getElementById('vm-count'); \
             return document.querySelectorAll('#vm-list tr[data-vm]').length === {count} \
               && n && n.textContent === {}",
            json!(says)
        ),
        &format!("{count} VM rows and {says:?}"),
    )
    .await;
}

/// The VM list requests the page made since the last clear: each must ask for one page
/// (`limit=`) or for the templates; none for every VM.
async fn list_requests(c: &Client) -> Vec<String> {
    let v = c
        .execute(
            "return performance.getEntriesByType('resource').map(e => e.name)\
                .filter(u => /\\/api\\/v1\\/vms(\\?|$)/.test(u))",
            vec![],
        )
        .await
        .unwrap();
    let urls: Vec<String> = serde_json::from_value(v).unwrap();
    for u in &urls {
        assert!(
            u.contains("limit=") || u.contains("template=true"),
            "the console asked for every VM: {u}"
        );
    }
    urls
}

/// `origin` is node 1's console, logged in as an administrator; the story's VMs exist.
pub async fn check(c: &Client, origin: &str) {
    go(c, origin, "vms").await;
    el(c, "#vm-list").await;
    // More VMs than a page: made from the page with its session, eight at a time.
    let made = c
        .execute_async(
            r#"const [count, done] = arguments;
            const one = (i) => fetch('/api/v1/vms', {method: 'POST', credentials: 'same-origin',
                headers: {'content-type': 'application/json', 'x-tessera-csrf': '1'},
                body: JSON.stringify({name: 'zz-bulk-' + String(i).padStart(2, '0'), vcpus: 1, memory_mib: 16})})
              .then(r => r.status);
            (async () => {
              const out = [];
              for (let i = 0; i < count; i += 8) {
                const batch = [];
                for (let k = i; k < Math.min(i + 8, count); k++) batch.push(one(k));
                out.push(...await Promise.all(batch));
              }
              return out;
            })().then(done, (e) => done(String(e)));"#,
            vec![json!(BULK)],
        )
        .await
        .unwrap();
    assert_eq!(made, json!(vec![201; BULK]), "creating the VMs");
    let (code, all, total) = get_page(c, "vms").await;
    assert_eq!(code, 200, "{all}");
    let total = total.expect("GET /vms without paging has X-Total-Count");
    assert_eq!(
        all.as_array().unwrap().len() as u64,
        total,
        "every VM without limit"
    );
    let total = total as usize;
    assert!(total > PAGE, "{total} VMs: not more than a page");

    // The first page: guest and web first (sorted by name), 50 rows, the count of all.
    c.execute("performance.clearResourceTimings()", vec![])
        .await
        .unwrap();
    go(c, origin, "vms").await;
    c.refresh().await.unwrap();
    wait_list(c, PAGE, &format!("VMs 1–{PAGE} of {total}")).await;
    assert_eq!(rows(c).await[..2], ["guest", "web"]);
    assert!(list_requests(c)
        .await
        .iter()
        .any(|u| u.ends_with(&format!("vms?limit={PAGE}"))));
    shot(c, "vms-paged").await;

    // Next: the rest, and the page is in the address.
    c.execute("performance.clearResourceTimings()", vec![])
        .await
        .unwrap();
    el(c, "#vm-pager a[data-page=next]")
        .await
        .click()
        .await
        .unwrap();
    wait_list(
        c,
        total - PAGE,
        &format!("VMs {}–{total} of {total}", PAGE + 1),
    )
    .await;
    assert_eq!(
        c.current_url().await.unwrap().fragment(),
        Some(format!("/vms?offset={PAGE}").as_str())
    );
    el(c, "#vm-pager a[data-page=prev]").await;
    assert!(list_requests(c)
        .await
        .iter()
        .any(|u| u.contains(&format!("offset={PAGE}"))));

    // The filter: typed, asked of the server from the first page (zz-bulk-10..19).
    c.execute("performance.clearResourceTimings()", vec![])
        .await
        .unwrap();
    el(c, "#vm-filter").await.send_keys("bulk-1").await.unwrap();
    wait_list(c, 10, "VMs 1–10 of 10").await;
    assert!(rows(c).await.iter().all(|n| n.starts_with("zz-bulk-1")));
    assert!(
        list_requests(c)
            .await
            .iter()
            .any(|u| u.contains("q=bulk-1")),
        "the filter was not asked of the server"
    );
    assert_eq!(
        c.current_url().await.unwrap().fragment(),
        Some("/vms?q=bulk-1")
    );
    // A state nothing is in: the list says so.
    el(c, "#vm-state")
        .await
        .select_by_value("running")
        .await
        .unwrap();
    wait_js(
        c,
        "return document.getElementById('vm-list').innerText.includes('No VM matches.')",
        "no running VM among bulk-1*",
    )
    .await;
    // Text and state together, and a reload keeps both (they are in the address). The
    // text is in web's disk's name (and not in guest's web-data), in other letters' case.
    let f = el(c, "#vm-filter").await;
    f.clear().await.unwrap();
    f.send_keys("WEB-DISK").await.unwrap();
    el(c, "#vm-state")
        .await
        .select_by_value("stopped")
        .await
        .unwrap();
    wait_list(c, 1, "VMs 1–1 of 1").await;
    assert_eq!(rows(c).await, ["web"]);
    c.refresh().await.unwrap();
    wait_list(c, 1, "VMs 1–1 of 1").await;
    let kept = c
        .execute(
            "return [document.getElementById('vm-filter').value, document.getElementById('vm-state').value]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept, json!(["WEB-DISK", "stopped"]));
    shot(c, "vms-filtered").await;

    // The API's paging and filters, as documented.
    let (code, page, n) = get_page(c, "vms?q=ZZ-BULK-0&limit=3").await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(n, Some(10), "zz-bulk-00..09 match");
    let names: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["zz-bulk-00", "zz-bulk-01", "zz-bulk-02"]);
    let (code, page, n) = get_page(c, &format!("vms?offset={total}&limit=5")).await;
    assert_eq!((code, page, n), (200, json!([]), Some(total as u64)));
    let (_, page, n) = get_page(c, "vms?template=true").await;
    assert_eq!((page, n), (json!([]), Some(0)));
    let (_, page, _) = get_page(c, "vms?state=stopped&node=no-such-node").await;
    assert_eq!(page, json!([]));
    for bad in [
        "vms?limit=0",
        "vms?limit=10001",
        "vms?state=sleeping",
        "vms?offset=-1",
    ] {
        let (code, body, _) = get_page(c, bad).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    let (code, body) = fetch(c, "GET", "vms?colour=red", None).await;
    assert_eq!(code, 400, "an unknown filter: {body}");

    // The dashboard: VMs by state from GET /cluster, no VM list loaded.
    c.execute("performance.clearResourceTimings()", vec![])
        .await
        .unwrap();
    go(c, origin, "").await;
    let counts = fetch(c, "GET", "cluster", None).await.1["vms"].clone();
    assert_eq!(counts["total"], json!(total), "{counts}");
    wait_js(
        c,
        &format!(
            "const v = document.getElementById('vm-states'); return v && v.innerText.includes('VMs ({total})')"
        ),
        "the dashboard's VM count",
    )
    .await;
    assert!(
        list_requests(c).await.is_empty(),
        "the dashboard loaded VMs"
    );
}
