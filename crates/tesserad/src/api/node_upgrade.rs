//! Upgrading a node booted from the node image (docs/image.md, "Upgrades"):
//! `PUT /nodes/{id}/upgrade` takes the new image's root file system (streamed to the data
//! partition, never held in memory, hashed as it arrives and kept only if its blake3 is
//! the one given with it) and hands it to the node's upgrade service
//! (`tessera-upgrade.path` watches `<data_dir>/upgrade/request.json`), which writes it to
//! the root slot not running and reboots into it on trial; `GET /nodes/{id}/upgrade` shows
//! the slot running and the last upgrade. `tesserad` itself writes no disk and boots
//! nothing: its unit has no capability for it. A node answers only for itself (the image
//! goes to the node it upgrades); another node's id is 421 with that node's address.

use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use futures_util::StreamExt;
use serde_json::Value;
use tessera_api::{
    parse_blake3, NodeUpgradeStatus, UpgradeQuery, UpgradeRecord, UpgradeRequest, UpgradeState,
    DEFAULT_UPGRADE_TRIES, MAX_ROOT_IMAGE_BYTES,
};
use tokio::io::AsyncWriteExt;

use super::events::event;
use super::extract::{Administrator, Auditor, Auth, Param, Q};
use super::{commit, now_ms, read, ApiError, ErrorBody, St};
use crate::records::table::NODES;

/// The part of the image's start that says what it is (ext4's superblock).
const HEAD_BYTES: usize = 2048;

fn upgrade_dir(st: &super::ApiState) -> PathBuf {
    st.data_dir.join("upgrade")
}

/// The slot this node booted from (`tessera.slot=` on its kernel command line), or why an
/// upgrade is not supported here.
fn booted_slot() -> Result<String, ApiError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let slot = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tessera.slot="))
        .filter(|s| matches!(*s, "a" | "b"));
    match slot {
        Some(s)
            if Path::new("/dev/disk/by-partlabel/tessera-root-a").exists()
                && Path::new("/dev/disk/by-partlabel/tessera-root-b").exists() =>
        {
            Ok(s.to_string())
        }
        _ => Err(ApiError::conflict(
            "not supported: this node was not booted from the node image's A/B root slots \
             (upgrade it by installing the image)",
        )),
    }
}

/// 404 for an unknown node, 421 naming its API for another node: the image must reach
/// the node it upgrades.
fn local_only(st: &super::ApiState, id: &str) -> Result<(), ApiError> {
    if id == st.me.0 {
        return Ok(());
    }
    let n = super::node(st)?;
    let rec: Value =
        read(&n, NODES, id)?.ok_or_else(|| ApiError::not_found(format!("no node {id}")))?;
    let host = rec["address"]
        .as_str()
        .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.to_string()))
        .unwrap_or_else(|| "its address".into());
    Err(ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        format!("node {id} is upgraded through its own API: https://{host}:8006/api/v1/nodes/{id}/upgrade"),
    ))
}

fn release() -> String {
    std::fs::read_to_string("/etc/tessera-release")
        .map(|r| r.trim().to_string())
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn last(dir: &Path) -> Option<UpgradeRecord> {
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn status(st: &super::ApiState, slot: String) -> NodeUpgradeStatus {
    let last = last(&upgrade_dir(st));
    let on_trial = last
        .as_ref()
        .is_some_and(|r| r.state == UpgradeState::Trial && r.to_slot == slot);
    NodeUpgradeStatus {
        node: st.me.0.clone(),
        release: release(),
        slot,
        on_trial,
        last,
    }
}

/// This node's root slots and its last upgrade.
#[utoipa::path(get, path = "/api/v1/nodes/{id}/upgrade", tag = "cluster", operation_id = "node_upgrade_status",
    params(("id" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = NodeUpgradeStatus),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such node"),
        (status = 409, body = ErrorBody, description = "This node was not booted from the node image"),
        (status = 421, body = ErrorBody, description = "Another node: ask it (the message gives its address)"),
        (status = 503, body = ErrorBody)))]
pub async fn show(
    State(st): St,
    _p: Auth<Auditor>,
    Param(id): Param<String>,
) -> Result<Json<NodeUpgradeStatus>, ApiError> {
    local_only(&st, &id)?;
    let slot = booted_slot()?;
    Ok(Json(status(&st, slot)))
}

type BodyStream = axum::body::BodyDataStream;

/// Reads a body to its end (at most [`MAX_ROOT_IMAGE_BYTES`]), keeping nothing: a client
/// still sending would otherwise see the connection closed instead of the answer.
async fn drain(stream: &mut BodyStream) {
    let mut total = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        total += chunk.len() as u64;
        if total > MAX_ROOT_IMAGE_BYTES {
            return;
        }
    }
}

/// Checks an image's first bytes: ext4 (magic 0xEF53 at 1080) labelled `tessera-root`,
/// as `image/build` makes the root file system.
fn check_head(head: &[u8]) -> Result<(), ApiError> {
    if head.len() < HEAD_BYTES || head[1080..1082] != [0x53, 0xef] {
        return Err(ApiError::bad(
            "body: not an ext4 file system image (send image/build's tessera-root.img)",
        ));
    }
    let label = &head[1144..1160];
    let label = &label[..label.iter().position(|&b| b == 0).unwrap_or(label.len())];
    if label != b"tessera-root" {
        return Err(ApiError::bad(format!(
            "body: an ext4 image labelled {:?}, not tessera-root (send image/build's tessera-root.img)",
            String::from_utf8_lossy(label)
        )));
    }
    Ok(())
}

/// The blake3 asked for with an upload: required, 64 hex digits.
fn wanted_blake3(q: &UpgradeQuery) -> Result<blake3::Hash, ApiError> {
    let text = q.blake3.as_deref().ok_or_else(|| {
        ApiError::bad(
            "blake3: required: the image's blake3, 64 hex digits (image/build writes it \
             beside tessera-root.img as tessera-root.img.b3)",
        )
    })?;
    parse_blake3(text)
        .map(blake3::Hash::from_bytes)
        .map_err(|e| ApiError::bad(format!("blake3: {e}")))
}

/// The received image's hash against the one given: a corrupt, truncated or wrong image
/// is refused.
fn check_hash(got: &blake3::Hash, want: &blake3::Hash, bytes: u64) -> Result<(), ApiError> {
    if got == want {
        return Ok(());
    }
    Err(ApiError::bad(format!(
        "body: its blake3 is {got} ({bytes} bytes), not the {want} given: the image is \
         corrupt, truncated or not the one meant; nothing was kept"
    )))
}

/// Writes the body to `path`, checking its start and hashing it; its size and blake3.
async fn receive(stream: &mut BodyStream, path: &Path) -> Result<(u64, blake3::Hash), ApiError> {
    let io = |what: &str, e: std::io::Error| ApiError::internal(format!("{what}: {e}"));
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| io("creating the image file", e))?;
    let mut head: Vec<u8> = Vec::with_capacity(HEAD_BYTES);
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(format!("body: not received whole: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_ROOT_IMAGE_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: a root file system image is at most {MAX_ROOT_IMAGE_BYTES} bytes"),
            ));
        }
        if head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            if head.len() == HEAD_BYTES {
                check_head(&head)?;
            }
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| io("writing the image", e))?;
    }
    if head.len() < HEAD_BYTES {
        check_head(&head)?;
    }
    file.sync_all()
        .await
        .map_err(|e| io("syncing the image", e))?;
    Ok((total, hasher.finalize()))
}

/// Writes `value` as JSON to `path` through a temporary file and a rename.
async fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), ApiError> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| ApiError::internal(format!("encoding {}: {e}", path.display())))?;
    let tmp = path.with_extension("json.new");
    let res = async {
        tokio::fs::write(&tmp, &text).await?;
        tokio::fs::File::open(&tmp).await?.sync_all().await?;
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    res.map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))
}

/// Upgrade this node: the body (`application/octet-stream`) is the new image's root file
/// system, `tessera-root.img` from `image/build`. The node writes it to the root slot it
/// is not running and reboots into it on trial; if the new slot does not come back healthy
/// within `tries` boots, the node boots the old slot again by itself. Drain the node first
/// (`POST /nodes/{id}/maintenance`): its VMs stop with the reboot. Follow it with
/// `GET /nodes/{id}/upgrade`. The body must hash to the `blake3` given (`image/build`
/// writes it to `tessera-root.img.b3`): a corrupt or truncated image is 400 and nothing is
/// kept.
#[utoipa::path(put, path = "/api/v1/nodes/{id}/upgrade", tag = "cluster", operation_id = "upgrade_node",
    params(("id" = String, Path), UpgradeQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The new image's root file system (tessera-root.img)"),
    security(("token" = []), ("cookie" = [])),
    responses((status = 202, body = NodeUpgradeStatus, description = "Received: the node writes it and reboots"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such node"),
        (status = 409, body = ErrorBody, description = "Not booted from the node image, or an upgrade is under way"),
        (status = 413, body = ErrorBody),
        (status = 421, body = ErrorBody, description = "Another node: send the image to it (the message gives its address)"),
        (status = 503, body = ErrorBody)))]
pub async fn upgrade(
    State(st): St,
    p: Auth<Administrator>,
    Param(id): Param<String>,
    Q(q): Q<UpgradeQuery>,
    req: Request,
) -> Result<(StatusCode, Json<NodeUpgradeStatus>), ApiError> {
    let tries = q.tries.unwrap_or(DEFAULT_UPGRADE_TRIES);
    let checked = (|| {
        if !(1..=10).contains(&tries) {
            return Err(ApiError::bad("tries: 1 to 10"));
        }
        let want = wanted_blake3(&q)?;
        local_only(&st, &id)?;
        let slot = booted_slot()?;
        let dir = upgrade_dir(&st);
        let under_way = dir.join("request.json").exists()
            || last(&dir).is_some_and(|r| {
                matches!(r.state, UpgradeState::Applying | UpgradeState::Rebooting)
            });
        if under_way {
            return Err(ApiError::conflict(
                "an upgrade of this node is under way (GET /nodes/{id}/upgrade)",
            ));
        }
        Ok((slot, dir, want))
    })();
    let mut stream = req.into_body().into_data_stream();
    let (slot, dir, want) = match checked {
        Ok(v) => v,
        Err(e) => {
            drain(&mut stream).await;
            return Err(e);
        }
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
    let partial = dir.join("root.img.new");
    let received = receive(&mut stream, &partial)
        .await
        .and_then(|(bytes, got)| check_hash(&got, &want, bytes).map(|()| bytes));
    let bytes = match received {
        Ok(b) => b,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            drain(&mut stream).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&partial, dir.join("root.img"))
        .await
        .map_err(|e| ApiError::internal(format!("keeping the image: {e}")))?;
    let to = if slot == "a" { "b" } else { "a" };
    let mut rec = UpgradeRecord {
        state: UpgradeState::Applying,
        from_slot: slot.clone(),
        from_release: release(),
        to_slot: to.into(),
        to_release: None,
        tries,
        by: p.user.clone(),
        message: format!("received {bytes} bytes; writing them to slot {to}"),
        updated_ms: now_ms(),
    };
    write_json(&dir.join("state.json"), &rec).await?;
    // The upgrade service starts when this file appears: written last.
    let request = UpgradeRequest {
        tries,
        by: p.user.clone(),
        bytes,
        blake3: want.to_hex().to_string(),
    };
    write_json(&dir.join("request.json"), &request).await?;
    tracing::info!(bytes, tries, to, user = %p.user, "upgrade image received; the upgrade service takes it");
    rec.message = format!(
        "node {}: upgrade image received ({bytes} bytes), going to slot {to} on trial ({tries} boots)",
        st.me.0
    );
    // The event is a record of who asked; the upgrade goes on without it.
    let _ = commit(
        &st,
        vec![],
        vec![event("node.upgrade", &st.me.0, &p.user, &rec.message)],
        |_| "events changed meanwhile".into(),
    )
    .await;
    Ok((StatusCode::ACCEPTED, Json(status(&st, slot))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(magic: [u8; 2], label: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEAD_BYTES];
        h[1080..1082].copy_from_slice(&magic);
        h[1144..1144 + label.len()].copy_from_slice(label);
        h
    }

    #[test]
    fn only_a_tessera_root_ext4_image_is_taken() {
        assert!(check_head(&head([0x53, 0xef], b"tessera-root")).is_ok());
        let e = check_head(&head([0x53, 0xef], b"other")).unwrap_err();
        assert!(e.1.contains("labelled \"other\""), "{}", e.1);
        assert!(check_head(&head([0, 0], b"tessera-root")).is_err());
        assert!(check_head(&[0u8; 100]).is_err());
    }

    #[test]
    fn an_image_is_kept_only_with_the_blake3_given() {
        let want = blake3::hash(b"the image");
        assert!(check_hash(&blake3::hash(b"the image"), &want, 9).is_ok());
        let e = check_hash(&blake3::hash(b"the imag"), &want, 8).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(e.1.contains(&want.to_hex().to_string()), "{}", e.1);
        let q = |b: Option<&str>| UpgradeQuery {
            tries: None,
            blake3: b.map(str::to_string),
        };
        assert!(wanted_blake3(&q(None)).unwrap_err().1.contains("required"));
        assert!(wanted_blake3(&q(Some("abc"))).is_err());
        assert_eq!(wanted_blake3(&q(Some(&want.to_hex()))).unwrap(), want);
    }
}
