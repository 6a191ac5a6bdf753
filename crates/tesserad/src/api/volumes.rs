//! Volumes and their snapshots and clones. The API reserves the records and queues a task
//! in one transaction (so two creates of one name cannot both pass); the node whose store
//! holds the volume runs the task against its `tessera-store` (see `crate::tasks`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tessera_api::{
    CopyState, NewClone, NewSnapshot, NewVolume, Replication, VolumeCopy, VolumeView,
};
use tessera_state::Require;

use super::events::event;
use super::extract::{Auditor, Auth, Body, IdempotencyKey, Operator, Param, Synced};
use super::tasks::{queued, submit, submit_idempotent, Idempotent};
use super::{check_name, now_ms, put, read, read_all, ApiError, ErrorBody, St};
use crate::records::table::{DISK_CLAIMS, NODES, SNAPSHOTS, TASKS, VOLUMES};
use crate::records::{snapshot_key, Snapshot, Task, TaskOp, TaskState, Volume, VolumeState};
use crate::replication::placement::Candidate;

pub(super) fn view(n: &tessera_state::Node, v: Volume) -> Result<VolumeView, ApiError> {
    let prefix = format!("{}@", v.name);
    let snapshots = read_all::<Snapshot>(n, SNAPSHOTS)?
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, s)| s)
        .collect();
    let attached_to = read(n, DISK_CLAIMS, &v.name)?;
    let replication = Replication {
        replicas: v.replicas,
        primary: v.node.clone(),
        generation: v.generation,
        copies: v.all_copies(),
    };
    Ok(VolumeView {
        volume: v,
        snapshots,
        attached_to,
        replication,
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

/// A snapshot of a replicated volume is taken by every copy at one point of the write
/// stream (the primary's store sends it through the stream), and a clone is made from
/// each copy's snapshot: refused (409, naming the copy) while a copy is not in sync,
/// since it would lack the snapshot. The primary's store checks again when it takes it.
fn copies_in_sync(v: &Volume, what: &str) -> Result<(), ApiError> {
    if let Some(c) = v.copies.iter().find(|c| c.state != CopyState::InSync) {
        let state = serde_json::to_value(c.state)
            .ok()
            .and_then(|s| s.as_str().map(str::to_string))
            .unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "{what} of volume {} needs every copy in sync: the copy on node {} is {state}",
            v.name, c.node
        )));
    }
    Ok(())
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

/// Create a volume (a task on the volume's node; with `replicas` above 1, a task on each
/// copy's node, and the returned one ends when every copy replicates). Without
/// `replicas`: 3 copies when at least three nodes can hold one now, else as many as can
/// (at least 1). With an `Idempotency-Key` header, a
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
        (status = 409, body = ErrorBody, description = "The name is taken, or more replicas than nodes"),
        (status = 503, body = ErrorBody),
        (status = 507, body = ErrorBody, description = "Too few nodes able to hold a copy now")))]
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
    let candidates = copy_candidates(&st, &n);
    let replicas = match req.replicas {
        Some(r) if (1..=3).contains(&r) => r,
        Some(_) => return Err(ApiError::bad("replicas: 1, 2 or 3 copies")),
        None => default_replicas(&candidates),
    };
    if replicas > 1 {
        return create_replicated(&st, &p, &n, idem.as_ref(), &req, replicas, &candidates).await;
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
        replicas: 1,
        generation: 1,
        copies: Vec::new(),
        operator_override: None,
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

/// Every registered node as a place for a copy (see `crate::replication::candidates`).
fn copy_candidates(st: &super::ApiState, n: &tessera_state::Node) -> Vec<Candidate> {
    crate::replication::candidates(n, &st.me.0)
}

/// The replica count of a volume created without `replicas`: 3 when at least three
/// nodes can hold a copy now (up, healthy store, replication address), else as many as
/// can (at least 1: a one-copy volume on the node asked, as before replication).
fn default_replicas(candidates: &[Candidate]) -> u8 {
    let usable = candidates.iter().filter(|c| c.unusable.is_none()).count();
    u8::try_from(usable.clamp(1, 3)).unwrap_or(1)
}

/// A volume of `replicas` copies: placed on the nodes with the most free space (`node`
/// pins the primary), the copies made by a task on each node; the returned task is the
/// primary's, which ends once every copy exists and replicates (see
/// `crate::replication::roles`).
async fn create_replicated(
    st: &super::ApiState,
    p: &super::auth::Principal,
    n: &tessera_state::Node,
    idem: Option<&Idempotent>,
    req: &NewVolume,
    replicas: u8,
    candidates: &[Candidate],
) -> Result<(StatusCode, Json<Task>), ApiError> {
    use crate::replication::placement::{place, PlacementError};
    let nodes =
        place(candidates, usize::from(replicas), req.node.as_deref()).map_err(|e| match e {
            PlacementError::UnknownNode(_) => ApiError::not_found(e.to_string()),
            PlacementError::TooFewNodes { .. } => ApiError::conflict(e.to_string()),
            PlacementError::PinnedUnusable { .. } | PlacementError::NoRoom { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
        })?;
    let primary = nodes[0].clone();
    let vol = Volume {
        name: req.name.clone(),
        node: primary.clone(),
        size_bytes: req.size_bytes,
        state: VolumeState::Creating,
        origin: None,
        nbd: nbd_uri(n, &primary, &req.name)?,
        created_ms: now_ms(),
        replicas,
        generation: 1,
        copies: nodes
            .iter()
            .map(|id| VolumeCopy {
                node: id.clone(),
                state: CopyState::InSync,
                catch_up: None,
                joining: false,
                rebuild: false,
            })
            .collect(),
        operator_override: None,
    };
    let task = queued(
        p,
        &primary,
        TaskOp::CreateVolume {
            name: req.name.clone(),
            size: req.size_bytes,
        },
    );
    let mut ops = vec![
        put(VOLUMES, &req.name, &vol),
        event(
            "volume.create",
            &req.name,
            &p.user,
            &format!(
                "volume requested: {replicas} copies, primary on {primary}, replicas on {}",
                nodes[1..].join(", ")
            ),
        ),
    ];
    let mut require = vec![Require::absent(VOLUMES, &req.name)];
    for id in &nodes[1..] {
        let mut t = queued(
            p,
            id,
            serde_json::from_value(serde_json::json!({
                "type": "set_replication", "volume": req.name, "generation": 1,
                "role": {"type": "replica"},
            }))
            .map_err(|e| ApiError::internal(format!("building the replica task: {e}")))?,
        );
        t.log[0].message = format!(
            "create the copy of {} on node {id} and make it a replica; queued by {}",
            req.name, p.user
        );
        require.push(Require::absent(TASKS, &t.id));
        ops.push(put(TASKS, &t.id, &t));
    }
    let task = submit_idempotent(st, &task, idem, require, ops, |r| {
        if r.table == VOLUMES {
            format!("name: volume {} already exists", req.name)
        } else {
            "a task id was taken meanwhile; try again".to_string()
        }
    })
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
    let require = vec![
        Require::equals(VOLUMES, &name, serde_json::json!(old)),
        Require::absent(DISK_CLAIMS, &name),
    ];
    let ops = vec![
        put(VOLUMES, &name, &v),
        event("volume.delete", &name, &p.user, "volume deletion requested"),
    ];
    // A replicated volume's other copies are deleted by their own nodes once the
    // primary's copy is: the task's outcome records them as pending deletions
    // (`crate::replication::orphans`), done whenever each node's store answers, so a
    // copy whose node is down goes when it is back.
    submit(&st, &task, require, ops, |_| {
        format!("volume {name} changed or was attached meanwhile; try again")
    })
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
    let (task, require, mut ops) = snapshot_plan(&p, &n, &name, &req.name)?;
    let key = snapshot_key(&name, &req.name);
    ops.push(event(
        "snapshot.create",
        &key,
        &p.user,
        "snapshot requested",
    ));
    let task = submit_idempotent(&st, &task, idem.as_ref(), require, ops, |r| {
        if r.table == SNAPSHOTS {
            format!("name: snapshot {key} already exists")
        } else {
            format!("volume {name} was deleted meanwhile")
        }
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// What a snapshot `snapshot` of volume `volume` takes, for `POST .../snapshots` and for
/// `POST /vms/{name}/template` alike (one path, so what one refuses the other does): the
/// queued task, and the requirements and records to commit with it (the task not
/// included: `submit` adds it). Refused for a volume that is not ready or is replicated.
pub(super) fn snapshot_plan(
    p: &super::auth::Principal,
    n: &tessera_state::Node,
    volume: &str,
    snapshot: &str,
) -> Result<(Task, Vec<Require>, Vec<tessera_state::Command>), ApiError> {
    let v = ready_volume(n, volume)?;
    copies_in_sync(&v, "a snapshot")?;
    let key = snapshot_key(volume, snapshot);
    let snap = Snapshot {
        volume: volume.into(),
        name: snapshot.into(),
        state: VolumeState::Creating,
        created_ms: now_ms(),
    };
    let task = queued(
        p,
        &v.node,
        TaskOp::CreateSnapshot {
            volume: volume.into(),
            snapshot: snapshot.into(),
        },
    );
    let require = vec![
        Require::exists(VOLUMES, volume),
        Require::absent(SNAPSHOTS, &key),
    ];
    Ok((task, require, vec![put(SNAPSHOTS, &key, &snap)]))
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
    let delete = TaskOp::DeleteSnapshot {
        volume: name.clone(),
        snapshot: snapshot.clone(),
    };
    let task = queued(&p, &v.node, delete.clone());
    let mut require = vec![Require::equals(SNAPSHOTS, &key, serde_json::json!(old))];
    let mut ops = vec![
        put(SNAPSHOTS, &key, &s),
        event(
            "snapshot.delete",
            &key,
            &p.user,
            "snapshot deletion requested",
        ),
    ];
    // Every other copy's snapshot is deleted by its own node (one that does not hold
    // it, having left the in-sync set before the snapshot, succeeds at once).
    for c in v.copies.iter().filter(|c| c.node != v.node) {
        let t = queued(&p, &c.node, delete.clone());
        require.push(Require::absent(TASKS, &t.id));
        ops.push(put(TASKS, &t.id, &t));
    }
    submit(&st, &task, require, ops, |_| {
        format!("snapshot {key} changed meanwhile; try again")
    })
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
    let (task, require, mut ops) = clone_plan(&p, &n, &name, &req.snapshot, &req.name)?;
    let key = snapshot_key(&name, &req.snapshot);
    ops.push(event(
        "volume.clone",
        &req.name,
        &p.user,
        &format!("clone of {key} requested"),
    ));
    let task = submit_idempotent(&st, &task, idem.as_ref(), require, ops, |r| {
        if r.table == VOLUMES {
            format!("name: volume {} already exists", req.name)
        } else if r.table == TASKS {
            "a task id was taken meanwhile; try again".to_string()
        } else {
            format!("snapshot {key} was deleted meanwhile")
        }
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// What a clone of snapshot `snapshot` of volume `volume` into a new volume `name` takes,
/// for `POST /volumes/{name}/clone` and for a VM created from a template alike (one path,
/// so a template's replicated disk gets a replicated clone): the clone task on the
/// primary's node (not included in the records: `submit` adds it), and the requirements
/// and records to commit with it (the new volume; a `set_replication` task on each other
/// copy's node). A clone of a replicated volume has its copies where the snapshot's are,
/// each cloned from its own copy of the snapshot, replicated from birth (generation 1,
/// the same primary). Refused (409) while a copy is out of sync: it may lack the snapshot.
pub(super) fn clone_plan(
    p: &super::auth::Principal,
    n: &tessera_state::Node,
    volume: &str,
    snapshot: &str,
    name: &str,
) -> Result<(Task, Vec<Require>, Vec<tessera_state::Command>), ApiError> {
    let v = ready_volume(n, volume)?;
    copies_in_sync(&v, "a clone")?;
    let key = snapshot_key(volume, snapshot);
    let snap: Snapshot = read(n, SNAPSHOTS, &key)?
        .ok_or_else(|| ApiError::not_found(format!("snapshot: no snapshot {key}")))?;
    if snap.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!("snapshot {key} is not ready")));
    }
    let new = Volume {
        name: name.into(),
        node: v.node.clone(),
        size_bytes: v.size_bytes,
        state: VolumeState::Creating,
        origin: Some(key.clone()),
        nbd: nbd_uri(n, &v.node, name)?,
        created_ms: now_ms(),
        replicas: v.replicas,
        generation: 1,
        copies: v
            .copies
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.state = CopyState::InSync;
                c.catch_up = None;
                c
            })
            .collect(),
        operator_override: None,
    };
    let task = queued(
        p,
        &v.node,
        TaskOp::CloneSnapshot {
            volume: volume.into(),
            snapshot: snapshot.into(),
            name: name.into(),
        },
    );
    let mut require = vec![
        Require::absent(VOLUMES, name),
        Require::exists(SNAPSHOTS, &key),
    ];
    let mut ops = vec![put(VOLUMES, name, &new)];
    // As for a new replicated volume: each replica's node makes its copy (here a clone of
    // its own snapshot) and makes it a replica; the primary's task waits for them.
    for c in new.copies.iter().filter(|c| c.node != new.node) {
        let mut t = queued(
            p,
            &c.node,
            serde_json::from_value(serde_json::json!({
                "type": "set_replication", "volume": name, "generation": 1,
                "role": {"type": "replica"},
            }))
            .map_err(|e| ApiError::internal(format!("building the replica task: {e}")))?,
        );
        t.log[0].message = format!(
            "clone {key} into {name} on node {} and make it a replica; queued by {}",
            c.node, p.user
        );
        require.push(Require::absent(TASKS, &t.id));
        ops.push(put(TASKS, &t.id, &t));
    }
    Ok((task, require, ops))
}
