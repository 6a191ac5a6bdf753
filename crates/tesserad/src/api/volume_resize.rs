//! Growing a volume: `POST /volumes/{name}/resize`. The API checks the request and queues
//! a task on the volume's node, whose `tessera-store` grows the volume (its catalog and
//! the size new NBD connections see); the record's size follows when the task succeeds
//! (`crate::tasks`).
//!
//! Volumes only grow: a shrink would silently drop what the guest wrote at the end. A
//! replicated volume's task goes to its primary's node, whose store grows every copy
//! through the replication stream (a `Resize` sequenced like a write: every copy grows
//! before it applies a write past the old end; a copy out of sync grows when it is caught
//! up; see docs/replication.md, "Resizing replicated volumes"). A VM using the volume
//! keeps the size its VMM read at start until it is stopped and started again: nothing
//! tells a running guest that its disk grew.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tessera_api::limits::{MAX_VOLUME_BYTES, VOLUME_BLOCK};
use tessera_api::VolumeResize;
use tessera_state::Require;

use super::events::event;
use super::extract::{Auth, Body, Operator, Param};
use super::tasks::{queued, submit};
use super::{read, ApiError, ErrorBody, St};
use crate::records::table::VOLUMES;
use crate::records::{Task, TaskOp, Volume, VolumeState};

/// Why a resize of `v` to `size` cannot be done, as the API answers it.
pub(crate) fn refusal(v: &Volume, size: u64) -> Option<ApiError> {
    if v.state != VolumeState::Ready {
        let state = serde_json::to_value(v.state)
            .ok()
            .and_then(|s| s.as_str().map(str::to_string))
            .unwrap_or_default();
        return Some(ApiError::conflict(format!(
            "volume {} is {state}; wait for its task",
            v.name
        )));
    }
    if size < v.size_bytes {
        return Some(ApiError::conflict(format!(
            "size_bytes: {size} is smaller than the volume's {} bytes; volumes only grow \
             (a smaller size would drop the data at its end)",
            v.size_bytes
        )));
    }
    None
}

/// Grow a volume (a task on its node). A VM using it sees the new size after its next
/// start, not while it runs.
#[utoipa::path(post, path = "/api/v1/volumes/{name}/resize", tag = "volumes",
    operation_id = "resize_volume",
    params(("name" = String, Path)), request_body = VolumeResize,
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Smaller than now, or not ready"),
        (status = 503, body = ErrorBody)))]
pub async fn resize(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    Body(req): Body<VolumeResize>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let size = req.size_bytes;
    if size == 0 || size % VOLUME_BLOCK != 0 || size > MAX_VOLUME_BYTES {
        return Err(ApiError::bad(
            "size_bytes: must be a positive multiple of 4096, at most 64 TiB",
        ));
    }
    let n = super::synced(&st).await?;
    let old: Volume = read(&n, VOLUMES, &name)?
        .ok_or_else(|| ApiError::not_found(format!("no volume {name}")))?;
    if let Some(e) = refusal(&old, size) {
        return Err(e);
    }
    let task = queued(
        &p,
        &old.node,
        TaskOp::ResizeVolume {
            name: name.clone(),
            size,
        },
    );
    // The record as checked: a delete, a change to replicated or another resize
    // committed meanwhile makes this one 409 rather than act on what it did not check.
    let require = vec![Require::equals(VOLUMES, &name, serde_json::json!(old))];
    let ops = vec![event(
        "volume.resize",
        &name,
        &p.user,
        &format!("resize from {} to {size} bytes requested", old.size_bytes),
    )];
    submit(&st, &task, require, ops, |_| {
        format!("volume {name} changed meanwhile; read it and try again")
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn volume(size: u64, replicas: u8, state: VolumeState) -> Volume {
        // From JSON, as the record is stored: fields added later take their defaults.
        serde_json::from_value(serde_json::json!({
            "name": "v", "node": "n1", "size_bytes": size, "state": state, "origin": null,
            "nbd": null, "created_ms": 0, "replicas": replicas,
        }))
        .unwrap()
    }

    fn message(e: Option<ApiError>) -> String {
        format!("{:?}", e.map(|e| e.1))
    }

    #[test]
    fn volumes_only_grow_whatever_their_copies() {
        let v = volume(1 << 20, 1, VolumeState::Ready);
        assert!(refusal(&v, 2 << 20).is_none());
        assert!(
            refusal(&v, 1 << 20).is_none(),
            "the same size changes nothing"
        );
        let m = message(refusal(&v, 4096));
        assert!(m.contains("size_bytes: 4096 is smaller"), "{m}");
        let three = volume(1 << 20, 3, VolumeState::Ready);
        assert!(refusal(&three, 2 << 20).is_none(), "three copies grow too");
        let m = message(refusal(&three, 4096));
        assert!(m.contains("size_bytes: 4096 is smaller"), "{m}");
        let m = message(refusal(&volume(1 << 20, 1, VolumeState::Creating), 2 << 20));
        assert!(m.contains("is creating; wait for its task"), "{m}");
    }
}
