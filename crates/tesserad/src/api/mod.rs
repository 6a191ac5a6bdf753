//! The REST API, the same on every node, under `/api/v1`: JSON in and out, errors as
//! `{"error": "..."}`. Handlers are thin: parse, authorize, call the replicated state, map.
//!
//! Implemented so far: login, password change, API tokens (create, revoke), cluster status
//! and the node list. Everything but login requires credentials; see `auth.rs`.

mod auth;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tessera_cluster::identity::NodeId;

pub use auth::{create_first_admin, Role};

use crate::{health, metrics, Heard, SharedNode};

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
}

type St = State<Arc<ApiState>>;

/// An error answer.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(code: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError(code, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// Bad JSON, unknown fields and wrong types become 400 with serde's message (which names
/// the field).
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

fn node(st: &ApiState) -> Result<Arc<tessera_state::Node>, ApiError> {
    st.node
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node has not joined a cluster yet",
            )
        })
}

/// Serves the API on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, st: Arc<ApiState>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/api/v1/login", post(auth::login))
        .route("/api/v1/password", post(auth::change_password))
        .route("/api/v1/tokens", post(auth::create_token))
        .route("/api/v1/tokens/{id}", delete(auth::revoke_token))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/nodes", get(nodes))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(st);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "REST API listening");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn cluster(State(st): St, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    auth::authorize(&st, &headers, Role::Auditor, false).await?;
    let n = node(&st)?;
    let m = n.raft.metrics().borrow().clone();
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let cluster_id = st
        .cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(Json(json!({
        "cluster_id": cluster_id,
        "leader": m.current_leader,
        "term": m.current_term,
        "voters": voters,
    })))
}

async fn nodes(State(st): St, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    auth::authorize(&st, &headers, Role::Auditor, false).await?;
    let n = node(&st)?;
    let registered = n
        .state
        .read(|t| json!(t.get("nodes").cloned().unwrap_or_default()));
    let heard = st.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let health = health::report(&st.me.0, &registered, &heard);
    let mut out = Vec::new();
    if let Some(obj) = registered.as_object() {
        for (id, rec) in obj {
            let state = if *id == st.me.0 {
                json!("up")
            } else {
                health[id]["state"].clone()
            };
            let mut v = json!({ "id": id, "address": rec["address"], "state": state });
            if *id == st.me.0 {
                v["metrics"] = st.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
            }
            out.push(v);
        }
    }
    Ok(Json(Value::Array(out)))
}

/// Revoking needs the path parameter; kept here so the router reads in one place.
pub(crate) type IdPath = Path<String>;
