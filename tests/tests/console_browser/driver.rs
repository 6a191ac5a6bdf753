//! Driving headless Chromium for the console test: chromedriver and a WebDriver session
//! (fantoccini), and what every check of the story does with them: wait for the page
//! (bounded), fill and submit forms, click a row's button found afresh, call the API from
//! the page with its session, screenshots and their contact sheet.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tessera_tests::free_port;

/// chromedriver, stopped with the test.
pub(crate) struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn screenshots_dir() -> PathBuf {
    // target/<profile>/deps/<test> -> target/console-screenshots
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap();
    let d = target.join("console-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub(crate) async fn shot(c: &Client, name: &str) {
    // Every page photographed is also checked for ids used twice: a label or an error
    // message tied to an id then lands on the other form's field.
    let dup = c
        .execute(
            "const seen = new Set(), twice = new Set(); \
             for (const e of document.querySelectorAll('[id]')) { \
               if (seen.has(e.id)) twice.add(e.id); seen.add(e.id); } \
             return [...twice]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(dup, json!([]), "ids used more than once on the {name} page");
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots_dir().join(format!("{name}.png")), png).unwrap();
}

/// Evaluates `js` (a function body returning a value) until it returns something truthy,
/// for at most 20 s; returns that value.
pub(crate) async fn wait_js(c: &Client, js: &str, what: &str) -> Value {
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
            let state = match c.execute(PAGE_STATE, vec![]).await {
                Ok(v) => v.as_str().unwrap_or_default().to_string(),
                Err(e) => format!("(the page's state could not be read: {e})"),
            };
            panic!("timed out waiting for {what}; the page says:\n{page}\n{state}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a timed-out wait reports besides the page's text: each form's fields (passwords
/// by length), whether it is busy submitting or invalid, and the page's last API calls
/// that finished (one still under way is not listed).
const PAGE_STATE: &str = r#"
    const forms = [...document.querySelectorAll('form')].map((f) =>
      `${f.id}${f.dataset.busy ? ' (busy)' : ''}${f.checkValidity() ? '' : ' (invalid)'}: ` +
      [...f.elements].filter((e) => e.name).map((e) =>
        `${e.name}=${e.type === 'password' ? `<${e.value.length} characters>` : e.value}`).join(', '));
    const calls = performance.getEntriesByType('resource')
      .filter((r) => r.name.includes('/api/')).slice(-10)
      .map((r) => `at ${Math.round(r.startTime)} ms, ${Math.round(r.duration)} ms: ` +
        `${r.responseStatus ?? '?'} ${new URL(r.name).pathname}`);
    return [`now ${Math.round(performance.now())} ms`, 'forms:', ...forms,
      'last API calls:', ...calls].join('\n');
"#;

/// Waits for an element matching `css` and returns it.
pub(crate) async fn el(c: &Client, css: &str) -> fantoccini::elements::Element {
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

pub(crate) async fn fill(c: &Client, form: &str, name: &str, value: &str) {
    let css = format!("{form} [name=\"{name}\"]");
    on_element!(c, css, |e| {
        match e.clear().await {
            Ok(()) => e.send_keys(value).await,
            Err(err) => Err(err),
        }
    });
}

pub(crate) async fn select(c: &Client, form: &str, name: &str, value: &str) {
    let css = format!("{form} select[name=\"{name}\"]");
    on_element!(c, css, |e| e.select_by_value(value).await);
}

pub(crate) async fn submit(c: &Client, form: &str) {
    let css = format!("{form} button[type=submit]");
    on_element!(c, css, |e| e.click().await);
}

/// Clicks the row button `css` (found afresh: the lists refresh themselves).
pub(crate) async fn click(c: &Client, css: &str) {
    let js = format!(
        "const b = document.querySelector({}); if (!b || b.disabled) return false; b.click(); return true;",
        json!(css)
    );
    wait_js(c, &js, css).await;
}

pub(crate) async fn go(c: &Client, origin: &str, page: &str) {
    c.goto(&format!("{origin}/ui/#/{page}")).await.unwrap();
    // The page's API calls stay listed for a timed-out wait's report (the default
    // buffer, 250, is full after a minute of the console's polling).
    c.execute("performance.setResourceTimingBufferSize(100000)", vec![])
        .await
        .unwrap();
}

/// Calls the API from the page (the session cookie, the CSRF header): (status, body).
pub(crate) async fn fetch(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u64, Value) {
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
pub(crate) async fn only_own_origin(c: &Client) {
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

pub(crate) async fn log_in(c: &Client, origin: &str, user: &str, password: &str) {
    go(c, origin, "login").await;
    fill(c, "#login-form", "username", user).await;
    fill(c, "#login-form", "password", password).await;
    submit(c, "#login-form").await;
}

pub(crate) async fn change_password(c: &Client, old: &str, new: &str) {
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

pub(crate) fn start_driver() -> (Driver, u16) {
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

pub(crate) async fn browser(port: u16, profile: &Path) -> Client {
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

/// One page of every screenshot, tiled with its name: `contact-sheet.html` next to them,
/// and `contact-sheet.png`, that page as the browser draws it.
pub(crate) async fn contact_sheet(c: &Client) {
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
