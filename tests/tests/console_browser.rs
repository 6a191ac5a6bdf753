//! The web console in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, from Rust with fantoccini) against the local three-node cluster. An
//! administrator logs in, changes the first password, creates a volume and a VM, starts
//! and stops it, watches the task finish, sees them on another node's console, sees an
//! event arrive live, creates and revokes an API token and logs out; an Auditor sees no
//! action buttons and gets 403 when it calls the API anyway. Every console answer carries
//! the Content-Security-Policy, the browser enforces it, and no page loads anything from
//! another origin. The VM list pages and filters 57 VMs through the API; at the end node 3
//! is killed and removed from the Nodes page. A screenshot of each page lands in
//! target/console-screenshots/. The story's parts live in console_browser/.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use fantoccini::Client;
use serde_json::json;
use tessera_tests::devcluster::DevCluster;
use tessera_tests::require;

#[path = "console_browser/dead_node.rs"]
mod dead_node;
#[path = "console_browser/driver.rs"]
mod driver;
#[path = "console_browser/nodes.rs"]
mod nodes;
#[path = "console_browser/two_factor.rs"]
mod two_factor;
#[path = "console_browser/vm_console.rs"]
mod vm_console;
#[path = "console_browser/vm_edit.rs"]
mod vm_edit;
#[path = "console_browser/vm_list.rs"]
mod vm_list;
#[path = "console_browser/volumes.rs"]
mod volumes;

pub(crate) use driver::{
    browser, change_password, click, contact_sheet, el, fetch, fill, go, log_in, only_own_origin,
    select, shot, start_driver, submit, wait_js,
};

const GUEST: &str = env!("TESSERA_TEST_GUEST");
const NEW_PASSWORD: &str = "console-test-password-1";
const AUDITOR_PASSWORD: &str = "auditor-first-password";
/// The viewer's password after the administrator resets it in the console.
const AUDITOR_RESET: &str = "auditor-reset-password";
const AUDITOR_NEW: &str = "auditor-own-password-22";

#[test]
fn the_console_works_in_a_real_browser_against_a_three_node_cluster() {
    require("chromium");
    require("chromedriver");
    require("curl");
    require("promtool");
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(&dir.path().join("cluster"));
    let password = cluster.admin_password();
    let ca = cluster.ca_file();
    let (_driver, port) = start_driver();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(port, &dir.path().join("profile")).await;
        // On a failure, still end the browser session so Chromium does not outlive the test.
        let c2 = c.clone();
        let cluster_dir = dir.path().join("cluster");
        let outcome =
            tokio::spawn(async move { story(&c2, &password, &ca, &cluster_dir).await }).await;
        let _ = c.close().await;
        if let Err(e) = outcome {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            match msg {
                Some(m) => panic!("{m}\n{}", log_warnings(&dir.path().join("cluster"))),
                None => std::panic::resume_unwind(p),
            }
        }
    });
    cluster.stop();
}

/// Each node's last warnings and errors, for a failed story's report: the page shows
/// what the browser saw, these what the nodes did meanwhile.
fn log_warnings(cluster: &std::path::Path) -> String {
    tessera_tests::devcluster::log_tails(cluster, "tesserad.log", 12, |l| {
        l.contains("WARN") || l.contains("ERROR")
    })
}

/// Someone typing in the Users page's reset form while the page draws itself again (an
/// event arrived) keeps the focus and what they typed: the form is kept, and put back
/// focused, or the next keys would go nowhere (what made this story's reset fail now and
/// then: the password half typed).
async fn typing_survives_a_refresh(c: &Client) {
    let pw = el(c, "#password-reset [name=\"password\"]").await;
    pw.send_keys("half-typed").await.unwrap();
    c.execute(
        "document.querySelector('main h1').dataset.before = '1'",
        vec![],
    )
    .await
    .unwrap();
    // A change that changes nothing still is an event, and the page draws itself again.
    let (status, _) = fetch(c, "PATCH", "users/viewer", Some(json!({"role": "auditor"}))).await;
    assert_eq!(status, 200);
    wait_js(
        c,
        "const h = document.querySelector('main h1'); return h && !h.dataset.before",
        "the Users page drawn again",
    )
    .await;
    let focus = c
        .execute(
            "const a = document.activeElement; return [a.name, a.closest('form')?.id, a.value]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(focus, json!(["password", "password-reset", "half-typed"]));
}

async fn story(c: &Client, initial: &str, ca: &str, cluster_dir: &std::path::Path) {
    let n1 = "https://127.0.0.1:8006";
    let n2 = "https://127.0.0.2:8006";
    let n3 = "https://127.0.0.3:8006";

    // The address the devcluster prints leads to the login page.
    c.goto(&format!("{n1}/")).await.unwrap();
    el(c, "#login-form").await;
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .starts_with(&format!("{n1}/ui/")));
    let csp = c
        .execute(
            "const x = new XMLHttpRequest(); x.open('GET', '/ui/', false); x.send(); \
             return x.getResponseHeader('content-security-policy')",
            vec![],
        )
        .await
        .unwrap();
    let csp = csp.as_str().unwrap_or_default().to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    // The browser enforces it: an inline script does not run.
    let inline = c
        .execute(
            "const s = document.createElement('script'); s.textContent = 'window.inlineRan = 1'; \
             document.body.append(s); return window.inlineRan === 1",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        inline,
        json!(false),
        "an inline script ran despite the policy"
    );
    // Without a session the API gives nothing.
    assert_eq!(fetch(c, "GET", "vms", None).await.0, 401);
    shot(c, "login").await;

    // Log in; the first login must change the password.
    log_in(c, n1, "admin", "not-the-password").await;
    wait_js(
        c,
        "const a = document.querySelector('#login-form .form-error'); return a && !a.hidden && a.textContent",
        "the API's refusal of a wrong password",
    )
    .await;
    log_in(c, n1, "admin", initial).await;
    el(c, "#password-form").await;
    shot(c, "password").await;
    // Who am I: the session's user, realm, role and expiry, even before the change.
    let (code, me) = fetch(c, "GET", "session", None).await;
    assert_eq!(code, 200, "{me}");
    assert_eq!(me["user"], "admin", "{me}");
    assert_eq!(me["realm"], "local", "{me}");
    assert_eq!(me["role"], "administrator", "{me}");
    assert_eq!(me["kind"], "session", "{me}");
    assert_eq!(me["must_change_password"], true, "{me}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let left_ms = me["expires_ms"].as_u64().unwrap().saturating_sub(now_ms);
    assert!(
        (7 * 3600 * 1000..=8 * 3600 * 1000 + 60_000).contains(&left_ms),
        "{me}"
    );
    // A bad new password: the API's words next to the field.
    fill(c, "#password-form", "old_password", initial).await;
    fill(c, "#password-form", "new_password", "short").await;
    fill(c, "#password-form", "again", "short").await;
    submit(c, "#password-form").await;
    let msg = wait_js(
        c,
        "return document.querySelector('#password-form [name=new_password]')\
            .parentElement.querySelector('.field-error').textContent",
        "the field error",
    )
    .await;
    assert!(msg.as_str().unwrap().starts_with("new_password:"), "{msg}");
    change_password(c, initial, NEW_PASSWORD).await;
    only_own_origin(c).await;
    shot(c, "dashboard").await;
    assert_eq!(
        fetch(c, "GET", "session", None).await.1["must_change_password"],
        false
    );
    // The header names the user and role from GET /session.
    wait_js(
        c,
        "return document.getElementById('who').textContent === 'admin (administrator)'",
        "the header's admin (administrator)",
    )
    .await;

    // A volume, watched to the end on the page and on the Tasks page.
    go(c, n1, "volumes").await;
    fill(c, "#volume-create", "name", "web-data").await;
    fill(c, "#volume-create", "size_bytes", "64").await;
    select(
        c,
        "#volume-create",
        "size_bytes_unit",
        &(1u64 << 20).to_string(),
    )
    .await;
    submit(c, "#volume-create").await;
    wait_js(
        c,
        "const r = document.querySelector('tr[data-volume=\"web-data\"]'); return r && r.innerText.includes('ready')",
        "volume web-data ready",
    )
    .await;
    shot(c, "volumes").await;
    go(c, n1, "tasks").await;
    wait_js(
        c,
        "return [...document.querySelectorAll('tr[data-state=succeeded]')].some(r => r.innerText.includes('create volume web-data'))",
        "the create task shown succeeded",
    )
    .await;
    shot(c, "tasks").await;

    // A VM with a new disk through the wizard, then one on the existing volume that the
    // test guest boots.
    go(c, n1, "vms").await;
    fill(c, "#vm-create", "name", "web").await;
    fill(c, "#vm-create", "memory_mib", "64").await;
    fill(c, "#vm-create", "size_bytes", "16").await;
    select(
        c,
        "#vm-create",
        "size_bytes_unit",
        &(1u64 << 20).to_string(),
    )
    .await;
    submit(c, "#vm-create").await;
    el(c, "tr[data-vm=\"web\"]").await;
    go(c, n1, "vms").await;
    fill(c, "#vm-create", "name", "guest").await;
    fill(c, "#vm-create", "memory_mib", "64").await;
    select(c, "#vm-create", "disk_mode", "existing").await;
    select(c, "#vm-create", "disks", "web-data").await;
    fill(c, "#vm-create", "kernel", GUEST).await;
    // The echo mode answers each typed line in upper case (the console check below).
    fill(
        c,
        "#vm-create",
        "cmdline",
        "console=ttyS0 tessera.mode=echo",
    )
    .await;
    submit(c, "#vm-create").await;
    el(c, "tr[data-vm=\"guest\"]").await;
    // A name the API refuses: its words next to the name field.
    fill(c, "#vm-create", "name", "Bad Name").await;
    select(c, "#vm-create", "disk_mode", "none").await;
    submit(c, "#vm-create").await;
    let msg = wait_js(
        c,
        "return document.querySelector('#vm-create [name=name]').parentElement.querySelector('.field-error').textContent",
        "the name error",
    )
    .await;
    assert!(msg.as_str().unwrap().starts_with("name:"), "{msg}");
    // Start and stop the guest.
    click(c, "tr[data-vm=\"guest\"] button[data-action=start]").await;
    wait_js(
        c,
        "const r = document.querySelector('tr[data-vm=\"guest\"]'); return r && r.querySelector('.state-running') && r.querySelector('button[data-action=stop]')",
        "the guest running",
    )
    .await;
    shot(c, "vms").await;
    vm_console::vm_page_and_console(c, n1).await;
    go(c, n1, "vms").await;
    click(c, "tr[data-vm=\"guest\"] button[data-action=stop]").await;
    wait_js(
        c,
        "const r = document.querySelector('tr[data-vm=\"guest\"]'); return r && r.querySelector('.state-stopped')",
        "the guest stopped",
    )
    .await;

    // Users and tokens: an auditor, a token whose secret is shown once.
    go(c, n1, "access").await;
    fill(c, "#user-create", "username", "viewer").await;
    fill(c, "#user-create", "password", AUDITOR_PASSWORD).await;
    select(c, "#user-create", "role", "auditor").await;
    submit(c, "#user-create").await;
    el(c, "tr[data-user=\"viewer\"]").await;
    typing_survives_a_refresh(c).await;
    // The administrator resets the viewer's password; the viewer logs in with it below.
    select(c, "#password-reset", "username", "viewer").await;
    fill(c, "#password-reset", "password", AUDITOR_RESET).await;
    submit(c, "#password-reset").await;
    wait_js(
        c,
        "const m = document.querySelector('#messages .notice'); return m && m.textContent.includes(\"viewer's password was reset\")",
        "the reset's notice",
    )
    .await;
    select(c, "#token-create", "role", "operator").await;
    submit(c, "#token-create").await;
    let secret = wait_js(
        c,
        "const s = document.getElementById('new-token-secret'); return s && s.textContent",
        "the new token's secret",
    )
    .await;
    let secret = secret.as_str().unwrap().to_string();
    shot(c, "access").await;
    vm_console::networks(c, n1).await;
    two_factor::check(c, n1).await;
    volumes::check(c, n1, ca).await;
    vm_edit::check(c, n1, "web").await;
    vm_list::check(c, n1).await;

    // Another node's console: its own login (cookies are per origin), the same data.
    log_in(c, n2, "admin", NEW_PASSWORD).await;
    wait_js(
        c,
        "return document.getElementById('main').dataset.page === 'dashboard'",
        "node 2's dashboard",
    )
    .await;
    go(c, n2, "vms").await;
    el(c, "tr[data-vm=\"web\"]").await;
    el(c, "tr[data-vm=\"guest\"]").await;
    go(c, n2, "volumes").await;
    el(c, "tr[data-volume=\"web-data\"]").await;
    el(c, "tr[data-volume=\"web-disk\"]").await;
    only_own_origin(c).await;
    nodes::check(c, n1, n2, ca, &secret).await;

    // An event arrives live: the token makes a volume through node 3 while node 2's
    // Events page stays open (no reload: the marker survives).
    go(c, n2, "events").await;
    el(c, "#event-list").await;
    c.execute("window.noReload = true", vec![]).await.unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--cacert",
            ca,
            "-X",
            "POST",
            &format!("{n3}/api/v1/volumes"),
        ])
        .args(["-H", &format!("authorization: Bearer {secret}")])
        .args(["-H", "content-type: application/json"])
        .args(["-d", r#"{"name":"from-token","size_bytes":1048576}"#])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "202");
    wait_js(
        c,
        "return window.noReload && document.getElementById('event-list').innerText.includes('from-token')",
        "the event of from-token, live",
    )
    .await;
    shot(c, "events").await;

    // Revoke the token (the button asks twice); it stops working.
    go(c, n2, "access").await;
    let id = fetch(c, "GET", "tokens", None).await.1[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let revoke = format!("tr[data-token=\"{id}\"] button[data-action=revoke]");
    click(c, &revoke).await;
    wait_js(
        c,
        &format!(
            "const b = document.querySelector({}); return b && b.textContent.startsWith('Confirm')",
            json!(revoke)
        ),
        "the revoke button armed",
    )
    .await;
    click(c, &revoke).await;
    wait_js(
        c,
        &format!("return !document.querySelector('tr[data-token=\"{id}\"]')"),
        "the token gone from the list",
    )
    .await;
    let out = std::process::Command::new("curl")
        .args(["-s", "--cacert", ca, &format!("{n3}/api/v1/vms")])
        .args(["-H", &format!("authorization: Bearer {secret}")])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");

    // The auditor on node 3: forced password change, then no action anywhere.
    // The first password no longer works: the reset replaced it.
    log_in(c, n3, "viewer", AUDITOR_PASSWORD).await;
    wait_js(
        c,
        "const a = document.querySelector('#login-form .form-error'); return a && !a.hidden && a.textContent",
        "the refusal of the viewer's old password",
    )
    .await;
    log_in(c, n3, "viewer", AUDITOR_RESET).await;
    change_password(c, AUDITOR_RESET, AUDITOR_NEW).await;
    wait_js(
        c,
        "return document.getElementById('who').textContent === 'viewer (auditor)'",
        "the header's viewer (auditor)",
    )
    .await;
    for page in ["vms", "volumes", "nodes"] {
        go(c, n3, page).await;
        wait_js(
            c,
            &format!("return document.getElementById('main').dataset.page === '{page}'"),
            page,
        )
        .await;
        let buttons = c
            .execute(
                "return [...document.querySelectorAll('main button, main form')].map(e => e.outerHTML.slice(0, 80))",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(buttons, json!([]), "the auditor sees actions on {page}");
        if page == "vms" {
            el(c, "tr[data-vm=\"guest\"]").await;
            shot(c, "auditor-vms").await;
        }
    }
    // The VM's page: the facts, no action, no console (it needs Operator).
    go(c, n3, "vm/guest").await;
    el(c, "#vm-config").await;
    el(c, "#console-off, #vm-console .muted").await;
    let buttons = c
        .execute(
            "return [...document.querySelectorAll('main button, main form')].map(e => e.outerHTML.slice(0, 80))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        buttons,
        json!([]),
        "the auditor sees actions on the VM's page"
    );
    let hidden = c
        .execute(
            "return document.getElementById('nav-access').hidden",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hidden, json!(true));
    let (code, body) = fetch(
        c,
        "POST",
        "volumes",
        Some(json!({"name": "auditor-try", "size_bytes": 1048576})),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(fetch(c, "POST", "vms/guest/start", None).await.0, 403);

    // Phone width: the dashboard still fits (no horizontal scrolling of the page).
    go(c, n3, "").await;
    el(c, "#health").await;
    c.set_window_size(390, 844).await.unwrap();
    let fits = wait_js(
        c,
        "return document.documentElement.scrollWidth <= window.innerWidth + 1 ? 'fits' : ''",
        "the dashboard fitting a phone's width",
    )
    .await;
    assert_eq!(fits, json!("fits"));
    shot(c, "dashboard-phone").await;
    c.set_window_size(1280, 800).await.unwrap();

    // Log out: back to the login page, and the session no longer works.
    el(c, "#logout").await.click().await.unwrap();
    el(c, "#login-form").await;
    assert_eq!(fetch(c, "GET", "cluster", None).await.0, 401);
    assert_eq!(fetch(c, "GET", "session", None).await.0, 401);
    // Last, as it leaves the cluster with two nodes: node 3 dies and is removed.
    dead_node::check(c, n1, cluster_dir).await;
    contact_sheet(c).await;
}
