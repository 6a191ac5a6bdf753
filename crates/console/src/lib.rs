//! The web console: its pages, scripts and styles embedded in the binary, served by an
//! axum [`Router`] that `tesserad` mounts on its API listener (`/` and `/ui/...`).
//!
//! The console is a single page of static assets; every piece of cluster data it shows
//! comes from the REST API under `/api/v1`, which checks the session cookie (or bearer
//! token) on every call. So no asset carries data, and the assets are the same for
//! everyone: serving them without a session gives away nothing the login page does not.
//! Nothing is read from disk or fetched from the internet at run time, and every answer
//! carries a Content-Security-Policy that allows only this origin and no inline script.
#![forbid(unsafe_code)]

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The policy on every console answer: this origin only, no inline script or style, no
/// framing (clickjacking), no plugins, forms post only here.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The embedded assets: path under `/ui/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../assets/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/api.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/dom.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/style.css"),
    ),
    (
        "nodes.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/nodes.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/charts.js"),
    ),
    (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/vendor/uPlot.min.css"),
    ),
    (
        "vendor/uPlot-LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/vendor/uPlot-LICENSE"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../assets/favicon.svg"),
    ),
    (
        "vm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vm.js"),
    ),
    (
        "terminal.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/terminal.js"),
    ),
    (
        "forms.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/forms.js"),
    ),
    (
        "activity.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/activity.js"),
    ),
    (
        "resize.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/resize.js"),
    ),
    (
        "vm_edit.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vm_edit.js"),
    ),
    (
        "vms.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vms.js"),
    ),
    (
        "networks.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/networks.js"),
    ),
    (
        "twofactor.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/twofactor.js"),
    ),
    (
        "vendor/xterm.mjs",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vendor/xterm.mjs"),
    ),
    (
        "vendor/xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/vendor/xterm.css"),
    ),
    (
        "vendor/xterm-LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/vendor/xterm-LICENSE"),
    ),
];

/// The embedded asset at `path` (relative to `/ui/`), with its content type.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, ct, b)| (*ct, *b))
}

/// Every embedded asset's path (relative to `/ui/`).
pub fn asset_paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|(p, _, _)| *p)
}

/// The console's routes: `/` sends the browser to `/ui/`, `/ui/` is the page, `/ui/<file>`
/// its assets. Mount it next to the API (`Router::merge`); it uses no state.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { secured(Redirect::to("/ui/")) }))
        .route("/ui", get(|| async { secured(Redirect::to("/ui/")) }))
        .route("/ui/", get(|| async { serve("index.html") }))
        .route(
            "/ui/{*path}",
            get(|Path(p): Path<String>| async move { serve(&p) }),
        )
}

fn serve(path: &str) -> Response {
    match asset(path) {
        Some((ct, body)) => secured(([(header::CONTENT_TYPE, ct)], body)),
        None => secured((
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such console page",
        )),
    }
}

/// Adds the security headers every console answer carries.
fn secured(r: impl IntoResponse) -> Response {
    let mut r = r.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The assets change with the binary; revalidating is cheap on a LAN and avoids a
    // browser mixing an old script with a new API after an upgrade.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    async fn get(path: &str) -> axum::response::Response {
        super::router::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn every_answer_carries_the_policy() {
        let mut paths: Vec<String> = vec!["/".into(), "/ui".into(), "/ui/".into()];
        paths.extend(super::asset_paths().map(|p| format!("/ui/{p}")));
        paths.push("/ui/missing.js".into());
        for p in paths {
            let r = get(&p).await;
            assert_eq!(
                r.headers()["content-security-policy"],
                super::CSP,
                "{p}: {:?}",
                r.headers()
            );
            assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{p}");
        }
        assert_eq!(get("/ui/missing.js").await.status(), StatusCode::NOT_FOUND);
        assert_eq!(get("/").await.headers()["location"], "/ui/");
        let r = get("/ui/app.js").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript"));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() {
        for p in super::asset_paths() {
            let (_, body) = super::asset(p).unwrap();
            let text = String::from_utf8_lossy(body);
            for other in [
                "src=\"http",
                "href=\"http",
                "url(http",
                "from \"http",
                "('http",
            ] {
                assert!(
                    !text.contains(other),
                    "{p} loads from another origin: {other}"
                );
            }
            if p.ends_with(".html") {
                // Every script is a file of this origin; no handler attributes.
                for (i, _) in text.match_indices("<script") {
                    let tag = &text[i..i + text[i..].find('>').unwrap()];
                    assert!(tag.contains("src=\"/ui/"), "{p}: {tag}");
                }
                assert!(!text.contains(" onclick="), "{p}");
                assert!(!text.contains("<style"), "{p}");
                assert!(!text.contains(" style="), "{p}");
            }
        }
    }

    /// A module the console imports but the binary does not serve breaks every page (the
    /// browser refuses the whole module graph): each `from "./x.js"` names a served file.
    #[test]
    fn every_imported_module_is_served() {
        let served: Vec<&str> = super::asset_paths().collect();
        for p in super::asset_paths().filter(|p| p.ends_with(".js") && !p.contains('/')) {
            let (_, body) = super::asset(p).unwrap();
            let text = String::from_utf8_lossy(body);
            for (i, _) in text.match_indices("from \"./") {
                let rest = &text[i + "from \"./".len()..];
                let name = &rest[..rest.find('"').unwrap()];
                assert!(
                    served.contains(&name),
                    "{p} imports {name}, which is not served"
                );
            }
        }
    }
}
