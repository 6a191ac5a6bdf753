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

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tessera_tests::devcluster::DevCluster;
use tessera_tests::{free_port, require};

const GUEST: &str = env!("TESSERA_TEST_GUEST");
const NEW_PASSWORD: &str = "console-test-password-1";
const AUDITOR_PASSWORD: &str = "auditor-first-password";
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
    fill(
        c,
        "#vm-create",
        "cmdline",
        "console=ttyS0 tessera.mode=count",
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
    log_in(c, n3, "viewer", AUDITOR_PASSWORD).await;
    change_password(c, AUDITOR_PASSWORD, AUDITOR_NEW).await;
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
}
