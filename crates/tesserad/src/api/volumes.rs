//! Volumes and their snapshots and clones. The API reserves the records and queues a task
//! in one transaction (so two creates of one name cannot both pass); the node whose store
//! holds the volume runs the task against its `tessera-store` (see `crate::tasks`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tessera_api::{NewClone, NewSnapshot, NewVolume, VolumeView};
use tessera_state::Require;

use super::events::event;
use super::extract::{Auditor, Auth, Body, IdempotencyKey, Operator, Param, Synced};
use super::tasks::{queued, submit, submit_idempotent, Idempotent};
use super::{check_name, now_ms, put, read, read_all, ApiError, ErrorBody, St};
use crate::records::table::{DISK_CLAIMS, NODES, SNAPSHOTS, TASKS, VOLUMES};
use crate::records::{snapshot_key, Snapshot, Task, TaskOp, TaskState, Volume, VolumeState};

fn view(n: &tessera_state::Node, v: Volume) -> Result<VolumeView, ApiError> {
    let prefix = format!("{}@", v.name);
    let snapshots = read_all::<Snapshot>(n, SNAPSHOTS)?
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, s)| s)
        .collect();
    let attached_to = read(n, DISK_CLAIMS, &v.name)?;
    Ok(VolumeView {
        volume: v,
        snapshots,
        attached_to,
    })
}

fn no_volume(name: &str) -> ApiError {
    ApiError::not_found(format!("no volume {name}"))
}

/// List volumes.
#[utoipa::path(get, path = "/api/v1/volumes", tag = "volumes", operation_id = "list_volumes",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [VolumeView]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(_: Auth<Auditor>, n: Synced) -> Result<Json<Vec<VolumeView>>, ApiError> {
    let mut out = Vec::new();
    for (_, v) in read_all::<Volume>(&n, VOLUMES)? {
        out.push(view(&n, v)?);
    }
    Ok(Json(out))
}

/// One volume.
#[utoipa::path(get, path = "/api/v1/volumes/{name}", tag = "volumes", operation_id = "get_volume",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = VolumeView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    _: Auth<Auditor>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<VolumeView>, ApiError> {
    let v: Volume = read(&n, VOLUMES, &name)?.ok_or_else(|| no_volume(&name))?;
    Ok(Json(view(&n, v)?))
}

fn ready_volume(n: &tessera_state::Node, name: &str) -> Result<Volume, ApiError> {
    let v: Volume = read(n, VOLUMES, name)?.ok_or_else(|| no_volume(name))?;
    if v.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!(
            "volume {name} is {:?}; wait for its task",
            v.state
        )));
    }
    Ok(v)
}

/// A volume a delete may start on: ready, or stuck in `creating`/`deleting` because the
/// task that would have finished it ended without doing so (cut off by a restart of its
/// node, or failed while its node was down). A volume whose task is still queued or
/// running waits for it (409).
fn deletable_volume(n: &tessera_state::Node, name: &str) -> Result<Volume, ApiError> {
    let v: Volume = read(n, VOLUMES, name)?.ok_or_else(|| no_volume(name))?;
    if v.state == VolumeState::Ready {
        return Ok(v);
    }
    let live = read_all::<Task>(n, TASKS)?.into_iter().any(|(_, t)| {
        matches!(t.state, TaskState::Queued | TaskState::Running)
            && task_volume(&t.op) == Some(name)
    });
    if live {
        return Err(ApiError::conflict(format!(
            "volume {name} is {:?}; wait for its task",
            v.state
        )));
    }
    Ok(v)
}

/// The volume a task works on, if any.
fn task_volume(op: &TaskOp) -> Option<&str> {
    match op {
        TaskOp::CreateVolume { name, .. }
        | TaskOp::VolumeInfo { name }
        | TaskOp::ResizeVolume { name, .. }
        | TaskOp::DeleteVolume { name }
        | TaskOp::CloneSnapshot { name, .. } => Some(name),
        TaskOp::CreateSnapshot { volume, .. }
        | TaskOp::DeleteSnapshot { volume, .. }
        | TaskOp::SetReplication { volume, .. } => Some(volume),
        TaskOp::ListVolumes {}
        | TaskOp::Scrub {}
        | TaskOp::Status {}
        | TaskOp::ReplicationStatus {} => None,
    }
}

fn nbd_uri(n: &tessera_state::Node, node: &str, export: &str) -> Result<Option<String>, ApiError> {
    let rec: Option<serde_json::Value> = read(n, NODES, node)?;
    Ok(rec.and_then(|r| r["nbd"].as_str().map(|a| format!("nbds://{a}/{export}"))))
}

/// Create a volume (a task on the volume's node). With an `Idempotency-Key` header, a
/// retry with the same key and body within 24 hours gets the first answer again (the same
/// task), so a create whose outcome was unknown can be retried safely.
#[utoipa::path(post, path = "/api/v1/volumes", tag = "volumes", operation_id = "create_volume",
    request_body = NewVolume,
    params(("Idempotency-Key" = Option<String>, Header,
        min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        description = "Makes a retry safe: the same key and body get the first answer")),
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such node"),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(st): St,
    p: Auth<Operator>,
    IdempotencyKey(key): IdempotencyKey,
    Body(req): Body<NewVolume>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    use tessera_api::limits::{MAX_VOLUME_BYTES, VOLUME_BLOCK};
    check_name("name", &req.name, &[])?;
    if req.size_bytes == 0
        || req.size_bytes % VOLUME_BLOCK != 0
        || req.size_bytes > MAX_VOLUME_BYTES
    {
        return Err(ApiError::bad(
            "size_bytes: must be a positive multiple of 4096, at most 64 TiB",
        ));
    }
    let n = super::synced(&st).await?;
    let idem = key.map(|k| Idempotent::new(&p.user, &k, &req));
    if let Some(task) = idem.as_ref().map(|i| i.replay(&n)).transpose()?.flatten() {
        return Ok((StatusCode::ACCEPTED, Json(task)));
    }
    let node = req.node.clone().unwrap_or_else(|| st.me.0.clone());
    if read::<serde_json::Value>(&n, NODES, &node)?.is_none() {
        return Err(ApiError::not_found(format!(
            "node: no node {node} in the cluster"
        )));
    }
    let vol = Volume {
        name: req.name.clone(),
        node: node.clone(),
        size_bytes: req.size_bytes,
        state: VolumeState::Creating,
        origin: None,
        nbd: nbd_uri(&n, &node, &req.name)?,
        created_ms: now_ms(),
    };
    let task = queued(
        &p,
        &node,
        TaskOp::CreateVolume {
            name: req.name.clone(),
            size: req.size_bytes,
        },
    );
    let task = submit_idempotent(
        &st,
        &task,
        idem.as_ref(),
        vec![Require::absent(VOLUMES, &req.name)],
        vec![
            put(VOLUMES, &req.name, &vol),
            event("volume.create", &req.name, &p.user, "volume requested"),
        ],
        |_| format!("name: volume {} already exists", req.name),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// Delete a volume and its snapshots (a task; refused while a VM uses it).
#[utoipa::path(delete, path = "/api/v1/volumes/{name}", tag = "volumes",
    operation_id = "delete_volume",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let old = deletable_volume(&n, &name)?;
    if let Some(vm) = read::<String>(&n, DISK_CLAIMS, &name)? {
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
            Require::equals(VOLUMES, &name, serde_json::json!(old)),
            Require::absent(DISK_CLAIMS, &name),
        ],
        vec![
            put(VOLUMES, &name, &v),
            event("volume.delete", &name, &p.user, "volume deletion requested"),
        ],
        |_| format!("volume {name} changed or was attached meanwhile; try again"),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// Snapshot a volume (a task). An `Idempotency-Key` makes a retry safe, as for
/// `POST /volumes`.
#[utoipa::path(post, path = "/api/v1/volumes/{name}/snapshots", tag = "volumes",
    operation_id = "create_snapshot",
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header,
        min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        description = "Makes a retry safe: the same key and body get the first answer")), request_body = NewSnapshot,
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn snapshot(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    IdempotencyKey(idem_key): IdempotencyKey,
    Body(req): Body<NewSnapshot>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    check_name("name", &req.name, &[])?;
    let n = super::synced(&st).await?;
    let idem = idem_key.map(|k| Idempotent::new(&p.user, &k, &("snapshot", &name, &req)));
    if let Some(task) = idem.as_ref().map(|i| i.replay(&n)).transpose()?.flatten() {
        return Ok((StatusCode::ACCEPTED, Json(task)));
    }
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
    let task = submit_idempotent(
        &st,
        &task,
        idem.as_ref(),
        vec![
            Require::exists(VOLUMES, &name),
            Require::absent(SNAPSHOTS, &key),
        ],
        vec![
            put(SNAPSHOTS, &key, &snap),
            event("snapshot.create", &key, &p.user, "snapshot requested"),
        ],
        |r| {
            if r.table == SNAPSHOTS {
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
    operation_id = "delete_snapshot",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove_snapshot(
    State(st): St,
    p: Auth<Operator>,
    Param((name, snapshot)): Param<(String, String)>,
    n: Synced,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let v = ready_volume(&n, &name)?;
    let key = snapshot_key(&name, &snapshot);
    let old: Snapshot = read(&n, SNAPSHOTS, &key)?
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
        vec![Require::equals(SNAPSHOTS, &key, serde_json::json!(old))],
        vec![
            put(SNAPSHOTS, &key, &s),
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

/// Clone a snapshot into a new writable volume on the same node (copy-on-write; a task).
/// An `Idempotency-Key` makes a retry safe, as for `POST /volumes`.
#[utoipa::path(post, path = "/api/v1/volumes/{name}/clone", tag = "volumes",
    operation_id = "clone_snapshot",
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header,
        min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        description = "Makes a retry safe: the same key and body get the first answer")), request_body = NewClone,
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn clone(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    IdempotencyKey(idem_key): IdempotencyKey,
    Body(req): Body<NewClone>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    check_name("name", &req.name, &[])?;
    let n = super::synced(&st).await?;
    let idem = idem_key.map(|k| Idempotent::new(&p.user, &k, &("clone", &name, &req)));
    if let Some(task) = idem.as_ref().map(|i| i.replay(&n)).transpose()?.flatten() {
        return Ok((StatusCode::ACCEPTED, Json(task)));
    }
    let v = ready_volume(&n, &name)?;
    let key = snapshot_key(&name, &req.snapshot);
    let snap: Snapshot = read(&n, SNAPSHOTS, &key)?
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
        nbd: nbd_uri(&n, &v.node, &req.name)?,
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
    let task = submit_idempotent(
        &st,
        &task,
        idem.as_ref(),
        vec![
            Require::absent(VOLUMES, &req.name),
            Require::exists(SNAPSHOTS, &key),
        ],
        vec![
            put(VOLUMES, &req.name, &new),
            event(
                "volume.clone",
                &req.name,
                &p.user,
                &format!("clone of {key} requested"),
            ),
        ],
        |r| {
            if r.table == VOLUMES {
                format!("name: volume {} already exists", req.name)
            } else {
                format!("snapshot {key} was deleted meanwhile")
            }
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}
