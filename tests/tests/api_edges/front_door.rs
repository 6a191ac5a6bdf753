//! The API's front door under abuse: password guessing backs off per address, idle
//! connections do not keep a real request out, a slow-loris client is cut off.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{call, login_from};

/// 50 quick wrong guesses from one address are mostly refused with 429 before any
/// password check; the right password from that address waits too, from another address
/// it gets in.
pub fn failed_logins_back_off_per_address(ca: &str, node: u8, password: &str) {
    let start = std::time::Instant::now();
    let (mut unauthorized, mut throttled) = (0, 0);
    for i in 0..50 {
        let a = login_from(ca, node, "127.0.0.3", &format!("wrong guess number {i}"));
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
    // The guessing address waits even with the right password. The window is the
    // server's: a few seconds after the last counted failure, which a loaded machine can
    // outlast while it runs the 50 guesses. So first make sure a window is open for at
    // least another second: a wrong guess is either counted (401: a new, longer window
    // opens at once) or refused with the time left; with under 2 s left, wait it out
    // (the server said how long) and guess again.
    for _ in 0..3 {
        let a = login_from(ca, node, "127.0.0.3", "one wrong guess more");
        match a.code {
            401 => break,
            429 => {
                let left: u64 = a.header("retry-after").unwrap().parse().unwrap();
                if left >= 2 {
                    break;
                }
                std::thread::sleep(Duration::from_secs(left + 1));
            }
            c => panic!("one more guess: {c} {}", a.body),
        }
    }
    assert_eq!(login_from(ca, node, "127.0.0.3", password).code, 429);
    // ... another address does not.
    let a = login_from(ca, node, "127.0.0.2", password);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(a.json()["token"].is_string());
}

/// 300 TCP connections that never start TLS, then a real request: served at once (a new
/// handshake evicts the oldest silent one).
pub fn idle_connections_do_not_keep_a_request_out(ca: &str, token: &str) {
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
pub fn a_slow_loris_is_cut_off(ca: &str) {
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
