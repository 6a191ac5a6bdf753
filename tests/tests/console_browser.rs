//! The web console in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, from Rust with fantoccini) against the local three-node cluster. An
//! administrator logs in, changes the first password, creates a volume and a VM, starts
//! and stops it, watches the task finish, sees them on another node's console, sees an
//! event arrive live, creates and revokes an API token and logs out; an Auditor sees no
//! action buttons and gets 403 when it calls the API anyway. Every console answer carries
//! the Content-Security-Policy, the browser enforces it, and no page loads anything from
//! another origin. A screenshot of each page lands in target/console-screenshots/.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tessera_tests::devcluster::DevCluster;
use tessera_tests::{free_port, require};

#[path = "console_browser/nodes.rs"]
mod nodes;
#[path = "console_browser/two_factor.rs"]
mod two_factor;
#[path = "console_browser/vm_edit.rs"]
mod vm_edit;
#[path = "console_browser/volumes.rs"]
mod volumes;

const GUEST: &str = env!("TESSERA_TEST_GUEST");
const NEW_PASSWORD: &str = "console-test-password-1";
const AUDITOR_PASSWORD: &str = "auditor-first-password";
/// The viewer's password after the administrator resets it in the console.
const AUDITOR_RESET: &str = "auditor-reset-password";
const AUDITOR_NEW: &str = "auditor-own-password-22";

/// chromedriver, stopped with the test.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn screenshots_dir() -> PathBuf {
    // target/<profile>/deps/<test> -> target/console-screenshots
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap();
    let d = target.join("console-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots_dir().join(format!("{name}.png")), png).unwrap();
}

/// Evaluates `js` (a function body returning a value) until it returns something truthy,
/// for at most 20 s; returns that value.
async fn wait_js(c: &Client, js: &str, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c.execute(js, vec![]).await.unwrap();
        let truthy = !matches!(&v, Value::Null | Value::Bool(false))
            && v.as_str() != Some("")
            && v.as_array().is_none_or(|a| !a.is_empty());
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let page = c
                .execute("return document.getElementById('main').innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out waiting for {what}; the page says:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for an element matching `css` and returns it.
async fn el(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
}

/// Runs a WebDriver action on the element `css`, found afresh and tried again when the
/// page's refresh replaced it in between (a stale element) or it is not yet interactable
/// (a page still being laid out right after navigation: seen once in a CI run under
/// load). Bounded: at most 50 tries 100 ms apart, then the error is the test's failure.
macro_rules! on_element {
    ($c:expr, $css:expr, |$e:ident| $body:expr) => {{
        use fantoccini::error::{CmdError, ErrorStatus};
        let mut tries = 0;
        loop {
            let $e = el($c, &$css).await;
            match $body {
                Ok(_) => break,
                Err(CmdError::Standard(w))
                    if (w.error == ErrorStatus::StaleElementReference
                        || w.error == ErrorStatus::ElementNotInteractable)
                        && tries < 50 =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{}: {e}", $css),
            }
        }
    }};
}

async fn fill(c: &Client, form: &str, name: &str, value: &str) {
    let css = format!("{form} [name=\"{name}\"]");
    on_element!(c, css, |e| {
        match e.clear().await {
            Ok(()) => e.send_keys(value).await,
            Err(err) => Err(err),
        }
    });
}

async fn select(c: &Client, form: &str, name: &str, value: &str) {
    let css = format!("{form} select[name=\"{name}\"]");
    on_element!(c, css, |e| e.select_by_value(value).await);
}

async fn submit(c: &Client, form: &str) {
    let css = format!("{form} button[type=submit]");
    on_element!(c, css, |e| e.click().await);
}

/// Clicks the row button `css` (found afresh: the lists refresh themselves).
async fn click(c: &Client, css: &str) {
    let js = format!(
        "const b = document.querySelector({}); if (!b || b.disabled) return false; b.click(); return true;",
        json!(css)
    );
    wait_js(c, &js, css).await;
}

async fn go(c: &Client, origin: &str, page: &str) {
    c.goto(&format!("{origin}/ui/#/{page}")).await.unwrap();
}

/// Calls the API from the page (the session cookie, the CSRF header): (status, body).
async fn fetch(c: &Client, method: &str, path: &str, body: Option<Value>) -> (u64, Value) {
    let js = r#"
        const [method, path, body, done] = arguments;
        fetch('/api/v1/' + path, {method, credentials: 'same-origin',
            headers: {'content-type': 'application/json', 'x-tessera-csrf': '1'},
            body: body === null ? undefined : JSON.stringify(body)})
          .then(async r => done([r.status, await r.text()]))
          .catch(e => done([0, String(e)]));
    "#;
    let v = c
        .execute_async(js, vec![json!(method), json!(path), json!(body)])
        .await
        .unwrap();
    let text = v[1].as_str().unwrap_or_default();
    (
        v[0].as_u64().unwrap(),
        serde_json::from_str(text).unwrap_or(json!(text)),
    )
}

/// Every resource the page loaded came from its own origin.
async fn only_own_origin(c: &Client) {
    let v = c
        .execute(
            "return performance.getEntriesByType('resource').map(e => e.name)\
                .concat([location.href]).filter(u => !u.startsWith(location.origin + '/'))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(v, json!([]), "requests to another origin");
}

async fn log_in(c: &Client, origin: &str, user: &str, password: &str) {
    go(c, origin, "login").await;
    fill(c, "#login-form", "username", user).await;
    fill(c, "#login-form", "password", password).await;
    submit(c, "#login-form").await;
}

async fn change_password(c: &Client, old: &str, new: &str) {
    el(c, "#password-form").await;
    fill(c, "#password-form", "old_password", old).await;
    fill(c, "#password-form", "new_password", new).await;
    fill(c, "#password-form", "again", new).await;
    submit(c, "#password-form").await;
    wait_js(
        c,
        "return document.getElementById('main').dataset.page === 'dashboard' && !!document.getElementById('health')",
        "the dashboard after the password change",
    )
    .await;
}

fn start_driver() -> (Driver, u16) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (driver, port)
}

async fn browser(port: u16, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
                // Nothing but the cluster: no component updates, no metrics, no sync.
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"],
        }),
    );
    // The nodes' certificates come from the cluster CA, which this fresh profile does not
    // trust (the login page tells people how to import it).
    caps.insert("acceptInsecureCerts".into(), json!(true));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap()
}

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
        let outcome = tokio::spawn(async move { story(&c2, &password, &ca).await }).await;
        let _ = c.close().await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    });
    cluster.stop();
}

async fn story(c: &Client, initial: &str, ca: &str) {
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
    vm_page_and_console(c, n1).await;
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
    networks(c, n1).await;
    two_factor::check(c, n1).await;
    volumes::check(c, n1, ca).await;
    vm_edit::check(c, n1, "web").await;

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
    for page in ["vms", "volumes"] {
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
    contact_sheet(c).await;
}

/// The guest's page (it runs, in echo mode): its configuration, disk, no NIC, its start
/// task, and the serial console in xterm.js: the guest's output arrives, and a line typed
/// on the keyboard reaches the guest, which answers it in upper case.
async fn vm_page_and_console(c: &Client, origin: &str) {
    // What the policy refuses on this page, from here on.
    c.execute(
        "window.refused = []; document.addEventListener('securitypolicyviolation', \
         e => window.refused.push(e.effectiveDirective + ' ' + e.blockedURI))",
        vec![],
    )
    .await
    .unwrap();
    // Navigating by the list's link (same page, no reload).
    click(c, "tr[data-vm=\"guest\"] a[href=\"#/vm/guest\"]").await;
    el(c, "#vm-config").await;
    let text = wait_js(
        c,
        "const i = document.getElementById('vm-info'); return i && i.innerText.includes('web-data') && i.innerText",
        "the guest's page with its disk",
    )
    .await;
    let text = text.as_str().unwrap();
    assert!(text.contains("console=ttyS0 tessera.mode=echo"), "{text}");
    assert!(text.contains("No NICs"), "{text}");
    wait_js(
        c,
        "return [...document.querySelectorAll('#vm-info tr[data-state=succeeded]')].some(r => r.innerText.startsWith('start'))",
        "the start task in the VM's history",
    )
    .await;
    // The console: what the guest printed since boot (the scrollback), through xterm.
    // xterm draws only while the terminal is on screen: it is below the VM's facts.
    el(c, "#console-screen").await;
    c.execute(
        "document.getElementById('console-screen').scrollIntoView()",
        vec![],
    )
    .await
    .unwrap();
    wait_js(
        c,
        "const r = document.querySelector('#console-screen .xterm-rows'); return r && r.innerText.includes('echo ready')",
        "the guest's output in the terminal",
    )
    .await;
    wait_js(
        c,
        "return document.getElementById('console-screen').dataset.connected === '1'",
        "the console connected",
    )
    .await;
    // xterm's own rules apply although the policy refused its inline <style>: they were
    // adopted as constructed sheets (a row's font is xterm's monospace one, not the page's).
    let font = c
        .execute(
            "return getComputedStyle(document.querySelector('#console-screen .xterm-rows')).fontFamily",
            vec![],
        )
        .await
        .unwrap();
    assert!(font.as_str().unwrap().contains("monospace"), "{font}");
    // Typing: the keyboard (WebDriver key actions) into xterm's focused input; Enter
    // ends the line.
    c.execute(
        "document.querySelector('#console-screen .xterm-helper-textarea').focus()",
        vec![],
    )
    .await
    .unwrap();
    let mut keys = KeyActions::new("keyboard".into());
    for ch in "hello tessera\u{E007}".chars() {
        keys = keys
            .then(KeyAction::Down { value: ch })
            .then(KeyAction::Up { value: ch });
    }
    c.perform_actions(keys).await.unwrap();
    wait_js(
        c,
        "return document.querySelector('#console-screen .xterm-rows').innerText.includes('echo: HELLO TESSERA')",
        "the guest's answer to the typed line",
    )
    .await;
    shot(c, "vm-detail").await;
    vm_edit::running_vm_keeps_its_size(c).await;
    // The only things refused were xterm's inline <style> elements (their rules were
    // adopted instead): no script, connection or stylesheet from elsewhere.
    let refused = c.execute("return window.refused", vec![]).await.unwrap();
    for r in refused.as_array().unwrap() {
        assert_eq!(r, "style-src-elem inline", "{refused}");
    }
    only_own_origin(c).await;
    // Leaving the page ends the console's connection (no socket left behind).
    go(c, origin, "vms").await;
    el(c, "#vm-list").await;
}

/// Networks: create one, see it listed, delete it (the button asks twice).
async fn networks(c: &Client, origin: &str) {
    go(c, origin, "networks").await;
    fill(c, "#network-create", "name", "lan").await;
    fill(c, "#network-create", "bridge", "br-lan").await;
    submit(c, "#network-create").await;
    let row = wait_js(
        c,
        "const r = document.querySelector('tr[data-network=\"lan\"]'); return r && r.innerText",
        "network lan listed",
    )
    .await;
    assert!(row.as_str().unwrap().contains("br-lan"), "{row}");
    shot(c, "networks").await;
    let del = "tr[data-network=\"lan\"] button[data-action=delete]";
    click(c, del).await;
    wait_js(
        c,
        &format!(
            "const b = document.querySelector({}); return b && b.textContent.startsWith('Confirm')",
            json!(del)
        ),
        "the delete button armed",
    )
    .await;
    click(c, del).await;
    wait_js(
        c,
        "return !document.querySelector('tr[data-network=\"lan\"]')",
        "network lan gone",
    )
    .await;
    assert_eq!(fetch(c, "GET", "networks/lan", None).await.0, 404);
}

/// One page of every screenshot, tiled with its name: `contact-sheet.html` next to them,
/// and `contact-sheet.png`, that page as the browser draws it.
async fn contact_sheet(c: &Client) {
    let dir = screenshots_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".png") && n != "contact-sheet.png")
        .collect();
    names.sort();
    let tiles: String = names
        .iter()
        .map(|n| {
            format!(
                "<figure><img src=\"{n}\" alt=\"{n}\"><figcaption>{}</figcaption></figure>\n",
                n.trim_end_matches(".png")
            )
        })
        .collect();
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>Tessera console screenshots</title>\n\
         <style>body{{font:13px sans-serif;margin:8px;display:grid;\
         grid-template-columns:repeat(4,300px);gap:8px}}figure{{margin:0}}\
         img{{width:300px;border:1px solid #999}}</style>\n{tiles}"
    );
    let html = dir.join("contact-sheet.html");
    std::fs::write(&html, page).unwrap();
    c.set_window_size(1280, 1400).await.unwrap();
    c.goto(&format!("file://{}", html.display())).await.unwrap();
    wait_js(
        c,
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0)",
        "the contact sheet's images",
    )
    .await;
    shot(c, "contact-sheet").await;
    println!("contact sheet: {}", dir.join("contact-sheet.png").display());
}
