//! The REST API, the same on every node, under `/api/v1`: JSON in and out, errors as
//! `{"error": "..."}`, the OpenAPI document at `/api/v1/openapi.json` generated from the
//! handlers' annotations (so the document and the router cannot drift apart).
//!
//! Handlers are thin: parse, authorize, read or commit through the replicated state.
//! Writes go through the Raft leader from whichever node received them; reads first pass
//! a read barrier ([`tessera_state::Node::sync`]) so a client reads its own writes on any
//! node. A change and its event are one transaction: nothing is half-written.

pub(crate) mod audit;
mod auth;
mod certificate;
mod cluster;
mod console;
mod directory;
mod events;
mod extract;
mod images;
mod listener;
mod login;
mod login_limit;
mod login_policy;
mod nbd;
mod networks;
pub(crate) mod nics;
pub mod node_maintenance;
mod node_metrics;
mod node_upgrade;
mod realms;
mod sealed;
mod second_factor;
pub(crate) mod settings;
mod tasks;
mod totp;
mod users;
mod vm_actions;
mod vm_list;
pub(crate) mod vm_migrate;
mod vms;
mod volume_override;
mod volume_resize;
mod volumes;
mod whoami;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
pub use tessera_api::ErrorBody;
use tessera_cluster::identity::NodeId;
use tessera_state::{Command, Require};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) use crate::tables::{del, put};
pub use auth::create_first_admin;

use crate::{metrics, now_ms, Heard, SharedNode};

/// What handlers need.
pub struct ApiState {
    /// This node.
    pub me: NodeId,
    /// This node's Raft member, once formed.
    pub node: SharedNode,
    /// The cluster id, once formed.
    pub cluster_id: Arc<Mutex<Option<String>>>,
    /// Discovery silence per peer.
    pub heard: Heard,
    /// Local metrics.
    pub metrics: metrics::Metrics,
    /// This node's last hour of metrics.
    pub history: metrics::history::History,
    /// The health of the local store.
    pub storage: Arc<crate::storage::Health>,
    /// This node's data directory (VM runtime directories live under it).
    pub data_dir: std::path::PathBuf,
}

type St = axum::extract::State<Arc<ApiState>>;

/// An error answer: status, message, and for a failed write through the cluster state
/// its outcome (`not_applied`, `unknown`, `committed`).
#[derive(Debug)]
pub struct ApiError(StatusCode, String, Option<&'static str>);

impl ApiError {
    fn new(code: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError(code, msg.into(), None)
    }
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, msg)
    }
    fn not_found(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, msg)
    }
    fn conflict(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, msg)
    }
    fn unavailable(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg)
    }
    fn internal(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::warn!(status = %self.0, error = %self.1, "request failed");
        }
        let body = match self.2 {
            Some(outcome) => json!({ "error": self.1, "outcome": outcome }),
            None => json!({ "error": self.1 }),
        };
        (self.0, Json(body)).into_response()
    }
}

fn node(st: &ApiState) -> Result<Arc<tessera_state::Node>, ApiError> {
    st.node
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| ApiError::unavailable("this node has not joined a cluster yet"))
}

/// This node's state, after a read barrier: every write committed before the request
/// is visible.
async fn synced(st: &ApiState) -> Result<Arc<tessera_state::Node>, ApiError> {
    let n = node(st)?;
    n.sync().await.map_err(|e| sync_error(&e))?;
    Ok(n)
}

/// A failed read barrier as an answer: 503 in words without Raft's internals (the log
/// gets those), outcome `not_applied`.
fn sync_error(e: &tessera_state::StateError) -> ApiError {
    tracing::debug!(error = %e, "read barrier failed");
    // Handlers change nothing before their barrier: whatever was asked was not done.
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        crate::replicated::sync_failure(e).into(),
        Some("not_applied"),
    )
}

/// A failed write as an answer: 503 saying whether the change was not applied, may have
/// been, or was (see [`crate::replicated::write_failure`]).
fn write_error(e: &tessera_state::StateError) -> ApiError {
    use crate::replicated::WriteFailure;
    let f = crate::replicated::write_failure(e);
    tracing::warn!(error = %e, outcome = ?f, "a write through the cluster state failed");
    let outcome = match f {
        WriteFailure::NotApplied => "not_applied",
        WriteFailure::Unknown => "unknown",
        WriteFailure::Committed => "committed",
    };
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        f.message().into(),
        Some(outcome),
    )
}

/// `GET` of one record by name, 404 naming it.
fn show_one<T: DeserializeOwned>(
    n: &tessera_state::Node,
    table: &str,
    name: &str,
    what: &str,
) -> Result<Json<T>, ApiError> {
    read(n, table, name)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no {what} {name}")))
}

/// A node that is not there is 404; a name several nodes share is 409 (never one of them).
fn node_lookup(e: crate::replicated::names::Lookup) -> ApiError {
    match e {
        crate::replicated::names::Lookup::NotFound(_) => ApiError::not_found(e.to_string()),
        crate::replicated::names::Lookup::Ambiguous(..) => ApiError::conflict(e.to_string()),
    }
}

/// A stored record that does not decode: a bug or a damaged state, never "not found".
fn unreadable(table: &str, key: &str, source: serde_json::Error) -> ApiError {
    let e = crate::tables::Unreadable {
        table: table.into(),
        key: key.into(),
        source,
    };
    ApiError::internal(e.to_string())
}

/// One record, typed; `None` if absent, 500 if it does not decode.
fn read<T: DeserializeOwned>(
    n: &tessera_state::Node,
    table: &str,
    key: &str,
) -> Result<Option<T>, ApiError> {
    crate::tables::read(n, table, key).map_err(|e| ApiError::internal(e.to_string()))
}

/// Every record of a table, typed, in key order; 500 if one does not decode.
fn read_all<T: DeserializeOwned>(
    n: &tessera_state::Node,
    table: &str,
) -> Result<Vec<(String, T)>, ApiError> {
    n.state.read(|t| {
        t.get(table)
            .map(|t| {
                t.iter()
                    .map(|(k, v)| {
                        serde_json::from_value(v.clone())
                            .map(|v| (k.clone(), v))
                            .map_err(|e| unreadable(table, k, e))
                    })
                    .collect()
            })
            .unwrap_or(Ok(Vec::new()))
    })
}

/// Commits `ops` if every requirement holds; `conflict` words the refusal (409) when one
/// does not.
async fn commit(
    st: &ApiState,
    require: Vec<Require>,
    ops: Vec<Command>,
    conflict: impl FnOnce(&Require) -> String,
) -> Result<(), ApiError> {
    let applied = node(st)?
        .write(Command::Txn { require, ops })
        .await
        .map_err(|e| write_error(&e))?;
    match applied.conflict {
        None => Ok(()),
        Some(r) => Err(ApiError::conflict(conflict(&r))),
    }
}

/// Names of volumes, snapshots, VMs and users: 1-63 of `[a-z0-9-]` (users also `._`),
/// starting with a letter or digit. Store names allow more; we keep to what is safe in
/// URLs, file names and NBD export names everywhere.
fn check_name(field: &str, v: &str, extra: &[u8]) -> Result<(), ApiError> {
    if tessera_api::limits::is_name(v, extra) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{field}: 1-63 characters of a-z, 0-9, '-'{}, starting with a letter or digit",
            if extra.is_empty() { "" } else { ", '.', '_'" }
        )))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tessera API",
        description = "The REST API of a Tessera cluster, the same on every node. \
            Authenticate with `Authorization: Bearer <token>` (from POST /api/v1/login or \
            an API token) or the `tessera_session` cookie set by login; cookie-authenticated \
            changes also need the header `X-Tessera-CSRF: 1`."
    ),
    modifiers(&SecurityAddon)
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::SecurityScheme;
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(auth::COOKIE))),
        );
    }
}

/// The router and its OpenAPI document.
pub fn router(st: Arc<ApiState>) -> (Router, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(login::login))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::change_password))
        .routes(routes!(whoami::whoami))
        .routes(routes!(auth::create_token, auth::list_tokens))
        .routes(routes!(auth::revoke_token))
        .routes(routes!(users::list, users::create))
        .routes(routes!(users::update, users::remove))
        .routes(routes!(realms::list, realms::create))
        .routes(routes!(realms::show, realms::replace, realms::remove))
        .routes(routes!(realms::test))
        .routes(routes!(realms::sync))
        .routes(routes!(second_factor::enroll, second_factor::remove))
        .routes(routes!(second_factor::confirm))
        .routes(routes!(second_factor::remove_for))
        .routes(routes!(login_policy::show, login_policy::replace))
        .routes(routes!(cluster::cluster))
        .routes(routes!(cluster::nodes))
        .routes(routes!(cluster::remove))
        .routes(routes!(node_maintenance::set))
        .routes(routes!(node_upgrade::show, node_upgrade::upgrade))
        .routes(routes!(node_metrics::history))
        .route("/metrics", axum::routing::get(node_metrics::prometheus))
        .routes(routes!(settings::show, settings::update))
        .routes(routes!(volumes::list, volumes::create))
        .routes(routes!(volumes::show, volumes::remove))
        .routes(routes!(volumes::snapshot))
        .routes(routes!(volumes::remove_snapshot))
        .routes(routes!(volumes::clone))
        .routes(routes!(volume_override::override_volume))
        .routes(routes!(volume_resize::resize))
        .routes(routes!(nbd::export_creds))
        .routes(routes!(vm_list::list, vms::create))
        .routes(routes!(vms::show, vms::update, vms::remove))
        .routes(routes!(vms::template))
        .routes(routes!(images::list, images::upload))
        .routes(routes!(images::show, images::remove))
        .route(
            "/api/v1/images/{name}/files/{file}",
            axum::routing::get(images::serve_file),
        )
        .routes(routes!(vm_actions::start))
        .routes(routes!(vm_actions::stop))
        .routes(routes!(vm_actions::kill))
        .routes(routes!(vm_actions::reboot))
        .routes(routes!(vm_actions::pause))
        .routes(routes!(vm_actions::resume))
        .routes(routes!(vm_migrate::migrate, vm_migrate::cancel))
        .routes(routes!(console::console))
        .routes(routes!(networks::list, networks::create))
        .routes(routes!(networks::show, networks::remove))
        .routes(routes!(tasks::list))
        .routes(routes!(tasks::show))
        .routes(routes!(events::list))
        .routes(routes!(events::stream))
        .routes(routes!(
            certificate::show,
            certificate::install,
            certificate::remove
        ))
        .with_state(st)
        .split_for_parts();
    (router, doc)
}

/// The OpenAPI document as served: utoipa's, plus what its derive cannot say, as `not`
/// so that clients and generators (schemathesis) know it instead of a schema-valid
/// request being refused. `networks` is the shorthand of `nics`: a VM request gives one
/// or the other, not both non-empty (nics::requested). A VM made `from` a template gets
/// clones of the template's disks and starts once they are cloned: it names no `disks`
/// and asks no `desired_state` but stopped (vms::create).
fn served_document(doc: &utoipa::openapi::OpenApi) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    let mut v = serde_json::to_value(doc).context("the OpenAPI document")?;
    let both_nics = serde_json::json!({
        "required": ["networks", "nics"],
        "properties": {
            "networks": {"type": "array", "minItems": 1},
            "nics": {"type": "array", "minItems": 1}
        }
    });
    let from_template_with = |field: &str, value: serde_json::Value| {
        serde_json::json!({
            "required": ["from", field],
            "properties": {"from": {"type": "string"}, field: value}
        })
    };
    let forbidden = [
        (
            "NewVm",
            vec![
                both_nics.clone(),
                from_template_with("disks", serde_json::json!({"type": "array", "minItems": 1})),
                from_template_with(
                    "desired_state",
                    serde_json::json!({"enum": ["running", "paused"]}),
                ),
            ],
        ),
        ("VmUpdate", vec![both_nics]),
    ];
    for (name, cases) in forbidden {
        if let Some(schema) = v
            .pointer_mut(&format!("/components/schemas/{name}"))
            .and_then(|s| s.as_object_mut())
        {
            schema.insert("not".into(), serde_json::json!({ "anyOf": cases }));
        }
    }
    Ok(v)
}

/// Serves the API over HTTPS on `addr` (the node's cluster certificate, valid for its
/// address) until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    st: Arc<ApiState>,
    tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<()> {
    realms::start_sync(st.clone());
    let tls = certificate::serving(st.clone(), tls);
    let audit_state = st.clone();
    let (router, doc) = router(st);
    let doc = Arc::new(served_document(&doc)?);
    let app = router
        .merge(tessera_console::router())
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this path (see the Allow header)",
            )
        })
        .layer(axum::middleware::from_fn(csrf))
        .layer(axum::middleware::from_fn_with_state(
            audit_state,
            audit::record,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024));
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "REST API listening (HTTPS)");
    listener::serve(tcp, app, tls, listener::Limits::default()).await;
    Ok(())
}

/// Serves the API of a node removed from the cluster (`crate::removed`) on `addr`:
/// every request, whatever its path or method, is answered at once with 503 and
/// `{"error": why, "removed": true}`.
pub(crate) async fn serve_removed(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    why: String,
) -> anyhow::Result<()> {
    let body = axum::body::Bytes::from(json!({ "error": why, "removed": true }).to_string());
    let app = Router::new().fallback(move || {
        let body = body.clone();
        async move {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
        }
    });
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "REST API listening (HTTPS), answering 503: this node was removed");
    listener::serve(tcp, app, tls, listener::Limits::default()).await;
    Ok(())
}

/// A browser sends cookies with cross-site requests; a cross-site page cannot add a
/// custom header without a CORS preflight we never grant. So a change authenticated only
/// by the session cookie must carry `X-Tessera-CSRF`.
async fn csrf(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let h = req.headers();
    let by_cookie = !h.contains_key("authorization") && auth::cookie_secret(h).is_some();
    if !safe && by_cookie && !h.contains_key("x-tessera-csrf") {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "a change authenticated by the session cookie needs the X-Tessera-CSRF header",
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_checked() {
        assert!(super::check_name("name", "vm-100", &[]).is_ok());
        for bad in ["", "-a", "A", "a/b", "a b", &"x".repeat(64), "a.b"] {
            let e = super::check_name("name", bad, &[]).unwrap_err();
            assert!(e.1.starts_with("name:"), "{bad}: {}", e.1);
        }
        assert!(super::check_name("username", "j.doe_2", b"._").is_ok());
    }

    /// The served document, as JSON.
    fn document() -> serde_json::Value {
        let st = std::sync::Arc::new(super::ApiState {
            me: tessera_cluster::identity::NodeId("n1".into()),
            node: Default::default(),
            cluster_id: Default::default(),
            heard: Default::default(),
            metrics: Default::default(),
            history: Default::default(),
            storage: Default::default(),
            data_dir: Default::default(),
        });
        super::served_document(&super::router(st).1).unwrap()
    }

    #[test]
    fn the_document_names_each_operation_once_and_its_parameters_where_they_are() {
        let doc = document();
        let mut ids = std::collections::BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_string()), "{method} {path}: {id} repeats");
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.contains_key("503"), "{method} {path}: no 503");
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let name = p["name"].as_str().unwrap();
                    let in_path = path.contains(&format!("{{{name}}}"));
                    assert_eq!(p["in"] == "path", in_path, "{method} {path}: {p}");
                }
            }
        }
        assert!(ids.len() >= 30, "{ids:?}");
    }

    #[test]
    fn the_document_states_the_limits() {
        let doc = document();
        let s = &doc["components"]["schemas"];
        let vcpus = &s["NewVm"]["properties"]["vcpus"];
        assert_eq!(
            (vcpus["minimum"].as_f64(), vcpus["maximum"].as_f64()),
            (Some(1.0), Some(32.0))
        );
        assert_eq!(
            s["NewVm"]["properties"]["memory_mib"]["maximum"].as_f64(),
            Some(1048576.0)
        );
        assert_eq!(
            s["NewToken"]["properties"]["expires_in_s"]["minimum"].as_f64(),
            Some(60.0)
        );
        assert!(s["NewUser"]["properties"]["username"]["pattern"].is_string());
        for vm in ["NewVm", "VmUpdate"] {
            assert_eq!(
                s[vm]["not"]["anyOf"][0]["required"],
                serde_json::json!(["networks", "nics"]),
                "{vm}: networks and nics together"
            );
        }
        assert_eq!(
            s["NewVm"]["not"]["anyOf"][1]["required"],
            serde_json::json!(["from", "disks"])
        );
        assert_eq!(s["NewUser"]["properties"]["password"]["maxLength"], 1024);
        // Raft ids are unsigned 64-bit: they exceed int64.
        assert_eq!(s["Member"]["properties"]["raft_id"]["format"], "uint64");
        assert_eq!(s["NodeInfo"]["properties"]["raft_id"]["format"], "uint64");
        // Nodes go by name, the leader too.
        // A node's storage health, in the words docs/api.md uses.
        assert!(s["NodeInfo"]["properties"]["storage"].is_object());
        assert_eq!(
            s["StorageState"]["enum"],
            serde_json::json!(["ok", "degraded", "unreachable"])
        );
        for (schema, field) in [("NodeInfo", "name"), ("ClusterStatus", "leader_name")] {
            assert!(
                s[schema]["properties"][field].is_object(),
                "{schema}.{field}"
            );
        }
    }
}
