//! Volumes and their snapshots and clones. The API reserves the records and queues a task
//! in one transaction (so two creates of one name cannot both pass); the node whose store
//! holds the volume runs the task against its `tessera-store` (see `crate::tasks`).

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use tessera_state::Require;
use utoipa::ToSchema;

use super::auth::{authorize, Role};
use super::events::event;
use super::tasks::{queued, submit};
use super::{all, body, check_name, get, now_ms, path, put, synced, ApiError, ErrorBody, St};
use crate::records::{snapshot_key, Snapshot, Task, TaskOp, Volume, VolumeState};

/// Largest volume: 64 TiB (the store's limit).
const MAX_SIZE: u64 = 64 << 40;

/// A volume with its snapshots and the VM it is attached to.
#[derive(Serialize, ToSchema)]
pub struct VolumeView {
    #[serde(flatten)]
    volume: Volume,
    snapshots: Vec<Snapshot>,
    /// The VM using it, if any.
    attached_to: Option<String>,
}

fn view(n: &tessera_state::Node, v: Volume) -> VolumeView {
    let prefix = format!("{}@", v.name);
    let snapshots = all::<Snapshot>(n, "snapshots")
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, s)| s)
        .collect();
    let attached_to = get(n, "disk_claims", &v.name);
    VolumeView {
        volume: v,
        snapshots,
        attached_to,
    }
}

/// List volumes.
#[utoipa::path(get, path = "/api/v1/volumes", tag = "volumes",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [VolumeView]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn list(State(st): St, headers: HeaderMap) -> Result<Json<Vec<VolumeView>>, ApiError> {
    authorize(&st, &headers, Role::Auditor, false).await?;
    let n = synced(&st).await?;
    Ok(Json(
        all::<Volume>(&n, "volumes")
            .into_iter()
            .map(|(_, v)| view(&n, v))
            .collect(),
    ))
}

/// One volume.
#[utoipa::path(get, path = "/api/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = VolumeView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<VolumeView>, ApiError> {
    authorize(&st, &headers, Role::Auditor, false).await?;
    let name = path(name)?;
    let n = synced(&st).await?;
    let v: Volume = get(&n, "volumes", &name)
        .ok_or_else(|| ApiError::not_found(format!("no volume {name}")))?;
    Ok(Json(view(&n, v)))
}

/// A new volume.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVolume {
    /// 1-63 of a-z, 0-9, '-'.
    name: String,
    /// Bytes: a multiple of 4096, at most 64 TiB.
    size_bytes: u64,
    /// The node whose store holds it (default: the node receiving the request).
    node: Option<String>,
}

fn ready_volume(n: &tessera_state::Node, name: &str) -> Result<Volume, ApiError> {
    let v: Volume =
        get(n, "volumes", name).ok_or_else(|| ApiError::not_found(format!("no volume {name}")))?;
    if v.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!(
            "volume {name} is {:?}; wait for its task",
            v.state
        )));
    }
    Ok(v)
}

fn nbd_uri(n: &tessera_state::Node, node: &str, export: &str) -> Option<String> {
    let rec: serde_json::Value = get(n, "nodes", node)?;
    rec["nbd"].as_str().map(|a| format!("nbd://{a}/{export}"))
}

/// Create a volume (a task on the volume's node).
#[utoipa::path(post, path = "/api/v1/volumes", tag = "volumes", request_body = NewVolume,
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    headers: HeaderMap,
    b: Result<Json<NewVolume>, JsonRejection>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let req = body(b)?;
    check_name("name", &req.name, &[])?;
    if req.size_bytes == 0 || req.size_bytes % 4096 != 0 || req.size_bytes > MAX_SIZE {
        return Err(ApiError::bad(
            "size_bytes: must be a positive multiple of 4096, at most 64 TiB",
        ));
    }
    let n = synced(&st).await?;
    let node = req.node.unwrap_or_else(|| st.me.0.clone());
    if get::<serde_json::Value>(&n, "nodes", &node).is_none() {
        return Err(ApiError::bad(format!(
            "node: no node {node} in the cluster"
        )));
    }
    let vol = Volume {
        name: req.name.clone(),
        node: node.clone(),
        size_bytes: req.size_bytes,
        state: VolumeState::Creating,
        origin: None,
        nbd: nbd_uri(&n, &node, &req.name),
        created_ms: now_ms(),
    };
    let task = queued(
        &p,
        &node,
        TaskOp::CreateVolume {
            name: req.name.clone(),
            size_bytes: req.size_bytes,
        },
    );
    submit(
        &st,
        &task,
        vec![Require::absent("volumes", &req.name)],
        vec![
            put("volumes", &req.name, &vol),
            event("volume.create", &req.name, &p.user, "volume requested"),
        ],
        |_| format!("name: volume {} already exists", req.name),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// Delete a volume and its snapshots (a task; refused while a VM uses it).
#[utoipa::path(delete, path = "/api/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let name = path(name)?;
    let n = synced(&st).await?;
    let old = ready_volume(&n, &name)?;
    if let Some(vm) = get::<String>(&n, "disk_claims", &name) {
        return Err(ApiError::conflict(format!(
            "volume {name} is attached to VM {vm}"
        )));
    }
    let mut v = old.clone();
    v.state = VolumeState::Deleting;
    let task = queued(&p, &v.node, TaskOp::DeleteVolume { name: name.clone() });
    submit(
        &st,
        &task,
        vec![
            Require::equals("volumes", &name, serde_json::json!(old)),
            Require::absent("disk_claims", &name),
        ],
        vec![
            put("volumes", &name, &v),
            event("volume.delete", &name, &p.user, "volume deletion requested"),
        ],
        |_| format!("volume {name} changed or was attached meanwhile; try again"),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// A new snapshot.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSnapshot {
    /// 1-63 of a-z, 0-9, '-'.
    name: String,
}

/// Snapshot a volume (a task).
#[utoipa::path(post, path = "/api/v1/volumes/{name}/snapshots", tag = "volumes",
    params(("name" = String, Path)), request_body = NewSnapshot,
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn snapshot(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    b: Result<Json<NewSnapshot>, JsonRejection>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let name = path(name)?;
    let req = body(b)?;
    check_name("name", &req.name, &[])?;
    let n = synced(&st).await?;
    let v = ready_volume(&n, &name)?;
    let key = snapshot_key(&name, &req.name);
    let snap = Snapshot {
        volume: name.clone(),
        name: req.name.clone(),
        state: VolumeState::Creating,
        created_ms: now_ms(),
    };
    let task = queued(
        &p,
        &v.node,
        TaskOp::CreateSnapshot {
            volume: name.clone(),
            snapshot: req.name.clone(),
        },
    );
    submit(
        &st,
        &task,
        vec![
            Require::exists("volumes", &name),
            Require::absent("snapshots", &key),
        ],
        vec![
            put("snapshots", &key, &snap),
            event("snapshot.create", &key, &p.user, "snapshot requested"),
        ],
        |r| {
            if r.table == "snapshots" {
                format!("name: snapshot {key} already exists")
            } else {
                format!("volume {name} was deleted meanwhile")
            }
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// Delete a snapshot (a task).
#[utoipa::path(delete, path = "/api/v1/volumes/{name}/snapshots/{snapshot}", tag = "volumes",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn remove_snapshot(
    State(st): St,
    headers: HeaderMap,
    names: Result<Path<(String, String)>, PathRejection>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let (name, snapshot) = path(names)?;
    let n = synced(&st).await?;
    let v = ready_volume(&n, &name)?;
    let key = snapshot_key(&name, &snapshot);
    let old: Snapshot = get(&n, "snapshots", &key)
        .ok_or_else(|| ApiError::not_found(format!("no snapshot {key}")))?;
    if old.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!(
            "snapshot {key} is {:?}; wait for its task",
            old.state
        )));
    }
    let mut s = old.clone();
    s.state = VolumeState::Deleting;
    let task = queued(
        &p,
        &v.node,
        TaskOp::DeleteSnapshot {
            volume: name.clone(),
            snapshot: snapshot.clone(),
        },
    );
    submit(
        &st,
        &task,
        vec![Require::equals("snapshots", &key, serde_json::json!(old))],
        vec![
            put("snapshots", &key, &s),
            event(
                "snapshot.delete",
                &key,
                &p.user,
                "snapshot deletion requested",
            ),
        ],
        |_| format!("snapshot {key} changed meanwhile; try again"),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// A clone of a snapshot.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewClone {
    /// The snapshot of this volume to clone.
    snapshot: String,
    /// The new volume's name.
    name: String,
}

/// Clone a snapshot into a new writable volume on the same node (copy-on-write; a task).
#[utoipa::path(post, path = "/api/v1/volumes/{name}/clone", tag = "volumes",
    params(("name" = String, Path)), request_body = NewClone,
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn clone(
    State(st): St,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    b: Result<Json<NewClone>, JsonRejection>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let p = authorize(&st, &headers, Role::Operator, false).await?;
    let name = path(name)?;
    let req = body(b)?;
    check_name("name", &req.name, &[])?;
    let n = synced(&st).await?;
    let v = ready_volume(&n, &name)?;
    let key = snapshot_key(&name, &req.snapshot);
    let snap: Snapshot = get(&n, "snapshots", &key)
        .ok_or_else(|| ApiError::not_found(format!("snapshot: no snapshot {key}")))?;
    if snap.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!("snapshot {key} is not ready")));
    }
    let new = Volume {
        name: req.name.clone(),
        node: v.node.clone(),
        size_bytes: v.size_bytes,
        state: VolumeState::Creating,
        origin: Some(key.clone()),
        nbd: nbd_uri(&n, &v.node, &req.name),
        created_ms: now_ms(),
    };
    let task = queued(
        &p,
        &v.node,
        TaskOp::CloneSnapshot {
            volume: name.clone(),
            snapshot: req.snapshot.clone(),
            name: req.name.clone(),
        },
    );
    submit(
        &st,
        &task,
        vec![
            Require::absent("volumes", &req.name),
            Require::exists("snapshots", &key),
        ],
        vec![
            put("volumes", &req.name, &new),
            event(
                "volume.clone",
                &req.name,
                &p.user,
                &format!("clone of {key} requested"),
            ),
        ],
        |r| {
            if r.table == "volumes" {
                format!("name: volume {} already exists", req.name)
            } else {
                format!("snapshot {key} was deleted meanwhile")
            }
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}
