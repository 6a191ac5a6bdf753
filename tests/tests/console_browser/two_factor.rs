//! Two-factor login in the console, in the console test's cluster and browser session:
//! the Two-factor page enrolls an authenticator (the otpauth URI and the setup key shown,
//! the first code, computed here from that key as an app would, confirms it, the eight
//! recovery codes shown once); after logging out, the login page asks for the code once
//! the password is right, and a recovery code gets in. The authenticator is removed at the
//! end, so the rest of the story logs in with the password alone.

use fantoccini::Client;
use serde_json::json;

use super::{el, fetch, fill, go, log_in, shot, submit, wait_js, NEW_PASSWORD};

/// RFC 6238's code (HMAC-SHA1, 30 s, 6 digits) of `secret` now.
fn code_now(secret: &[u8]) -> String {
    let step = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let h = ring::hmac::sign(&key, &step.to_be_bytes());
    let h = h.as_ref();
    let o = usize::from(h[19] & 0x0f);
    let v = u32::from_be_bytes([h[o] & 0x7f, h[o + 1], h[o + 2], h[o + 3]]);
    format!("{:06}", v % 1_000_000)
}

/// Run with the administrator logged in on `origin`.
pub async fn check(c: &Client, origin: &str) {
    go(c, origin, "two-factor").await;
    el(c, "#totp-enroll").await;
    submit(c, "#totp-enroll").await;
    let key = el(c, "#totp-secret").await.text().await.unwrap();
    let uri = el(c, "#totp-uri").await.text().await.unwrap();
    assert!(
        uri.starts_with("otpauth://totp/Tessera:admin?secret=") && uri.contains(key.trim()),
        "{uri} / {key}"
    );
    let secret = data_encoding::BASE32_NOPAD
        .decode(key.trim().as_bytes())
        .unwrap();
    fill(c, "#totp-confirm", "code", &code_now(&secret)).await;
    submit(c, "#totp-confirm").await;
    el(c, "#totp-recovery").await;
    let codes = c
        .execute(
            "return [...document.querySelectorAll('#totp-recovery li')].map(e => e.textContent.trim())",
            vec![],
        )
        .await
        .unwrap();
    let codes: Vec<String> = serde_json::from_value(codes).unwrap();
    assert_eq!(codes.len(), 8, "{codes:?}");
    shot(c, "two-factor").await;

    // Log out and in again: the right password alone makes the page ask for the code.
    el(c, "#logout").await.click().await.unwrap();
    el(c, "#login-form").await;
    log_in(c, origin, "admin", NEW_PASSWORD).await;
    wait_js(
        c,
        "const t = document.querySelector('#login-form [name=totp]'); \
         return t && t.offsetParent !== null",
        "the login page asking for the second factor",
    )
    .await;
    assert_eq!(fetch(c, "GET", "session", None).await.0, 401);
    shot(c, "login-second-factor").await;
    fill(c, "#login-form", "totp", &codes[0]).await;
    submit(c, "#login-form").await;
    // The dashboard (the page was the Two-factor page before logging out).
    wait_js(
        c,
        "return document.getElementById('main').dataset.page === 'dashboard'",
        "logged in with a recovery code",
    )
    .await;
    let (code, v) = fetch(c, "GET", "session", None).await;
    assert_eq!((code, &v["user"]), (200, &json!("admin")), "{v}");

    // Back to the password alone for the rest of the test.
    let (code, v) = fetch(c, "DELETE", "totp", None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v, json!({ "deleted": "admin" }));
}
