//! The REST API's edges on the README's local three-node cluster (one start for every
//! check): failed logins back off per address (429 with Retry-After) while the right
//! password from another address still gets in; hundreds of idle connections do not keep
//! a real request out; a slow-loris client is cut off at the header deadline.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::devcluster::DevCluster;
use tessera_tests::{output, require};

/// One HTTP answer: status, headers (lower-case names), body.
struct Answer {
    code: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.code, self.body))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// A request to node `node` (1-3) with curl, optionally from source address `from`.
fn call(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    extra: &[&str],
) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("h");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "30", "--cacert", ca, "-X", method, "-D"])
        .arg(&hdr)
        .args(["-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("https://127.0.0.{node}:8006/api/v1/{path}"))
        .args(extra);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data"])
            .arg(b.to_string());
    }
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    let out = output(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        code: code.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
        body: body.to_string(),
    }
}

fn login_from(ca: &str, from: &str, password: &str) -> Answer {
    call(
        ca,
        1,
        "POST",
        "login",
        None,
        Some(&json!({"username": "admin", "password": password})),
        &["--interface", from],
    )
}

/// 50 quick wrong guesses from one address are mostly refused with 429 before any
/// password check; the right password from that address waits too, from another address
/// it gets in.
fn failed_logins_back_off_per_address(ca: &str, password: &str) {
    let start = std::time::Instant::now();
    let (mut unauthorized, mut throttled) = (0, 0);
    for i in 0..50 {
        let a = login_from(ca, "127.0.0.3", &format!("wrong guess number {i}"));
        match a.code {
            401 => unauthorized += 1,
            429 => {
                throttled += 1;
                let wait: u64 = a
                    .header("retry-after")
                    .unwrap_or_else(|| panic!("429 without Retry-After: {}", a.headers))
                    .parse()
                    .unwrap();
                assert!((1..=900).contains(&wait), "Retry-After: {wait}");
                assert!(a.json()["error"].as_str().unwrap().contains("too many"));
            }
            c => panic!("guess {i}: {c} {}", a.body),
        }
    }
    assert!(
        throttled >= 40 && unauthorized <= 10,
        "50 wrong guesses: {unauthorized} x 401, {throttled} x 429 in {:?}",
        start.elapsed()
    );
    // The guessing address waits even with the right password...
    assert_eq!(login_from(ca, "127.0.0.3", password).code, 429);
    // ... another address does not.
    let a = login_from(ca, "127.0.0.2", password);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(a.json()["token"].is_string());
}

/// 300 TCP connections that never start TLS, then a real request: served at once (a new
/// handshake evicts the oldest silent one).
fn idle_connections_do_not_keep_a_request_out(ca: &str, token: &str) {
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect("127.0.0.1:8006").unwrap())
        .collect();
    let start = Instant::now();
    let a = call(ca, 1, "GET", "cluster", Some(token), None, &[]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a request behind 300 idle connections took {:?}",
        start.elapsed()
    );
    drop(idle);
}

/// A client that sends its header a line a second is cut off at the 10 s header deadline
/// and never answered 200.
fn a_slow_loris_is_cut_off(ca: &str) {
    let mut c = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            "127.0.0.1:8006",
            "-CAfile",
            ca,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let start = Instant::now();
    let _ = stdin.write_all(b"GET /api/v1/cluster HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let ended = loop {
        if let Some(status) = c.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(30) {
            break None;
        }
        // One more header line a second: never the blank line that ends the header.
        let _ = stdin.write_all(b"X-Slow: 1\r\n");
        let _ = stdin.flush();
        std::thread::sleep(Duration::from_secs(1));
    };
    let took = start.elapsed();
    if ended.is_none() {
        let _ = c.kill();
    }
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        ended.is_some(),
        "a slow-loris connection was still open after {took:?}"
    );
    assert!(
        took >= Duration::from_secs(8),
        "cut off after {took:?}, before the header deadline: {text}"
    );
    assert!(!text.contains(" 200 "), "{text}");
}

#[test]
fn the_api_holds_its_edges() {
    require("curl");
    let d = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(d.path());
    let (password, ca) = (cluster.admin_password(), cluster.ca_file());

    require("openssl");
    let a = login_from(&ca, "127.0.0.1", &password);
    assert_eq!(a.code, 200, "{}", a.body);
    let first = a.json()["token"].as_str().unwrap().to_string();
    let token = {
        let new = "api edges admin password";
        let a = call(
            &ca,
            1,
            "POST",
            "password",
            Some(&first),
            Some(&json!({"old_password": password, "new_password": new})),
            &[],
        );
        assert_eq!(a.code, 200, "{}", a.body);
        let a = login_from(&ca, "127.0.0.1", new);
        assert_eq!(a.code, 200, "{}", a.body);
        a.json()["token"].as_str().unwrap().to_string()
    };
    let password = "api edges admin password".to_string();

    idle_connections_do_not_keep_a_request_out(&ca, &token);
    a_slow_loris_is_cut_off(&ca);
    failed_logins_back_off_per_address(&ca, &password);

    cluster.stop();
}
