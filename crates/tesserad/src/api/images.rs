//! Boot images: upload (the body streamed to disk, never held in memory, at most
//! [`MAX_IMAGE_BYTES`]), list, show, delete (refused while a VM names the image), and the
//! route other nodes fetch an image's files from (not in the OpenAPI document: it takes
//! the nodes' fetch key, not a user's credentials). The receiving node keeps the upload;
//! every node's copy loop (`crate::images`) fetches and checks its own copy.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::json;
use tessera_api::limits::MAX_KERNEL_CHARS;
use tessera_api::{Deleted, Image, ImageFile, ImageUpload, MAX_IMAGE_BYTES};
use tessera_state::Require;
use tokio::io::AsyncWriteExt;

use super::events::event;
use super::extract::{Auditor, Auth, Operator, Param, Synced, Q};
use super::{check_name, commit, del, now_ms, put, read, read_all, ApiError, ErrorBody, St};
use crate::images::{self, FETCH_KEY, IMAGES, IMAGE_KEYS, KEY_HEADER};
use crate::records::table::VMS;
use crate::records::Vm;

fn no_image(name: &str) -> ApiError {
    ApiError::not_found(format!("no image {name}"))
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("body: an image (kernel and initramfs) is at most {MAX_IMAGE_BYTES} bytes"),
    )
}

/// List boot images.
#[utoipa::path(get, path = "/api/v1/images", tag = "images", operation_id = "list_images",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Image]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(_: Auth<Auditor>, n: Synced) -> Result<Json<Vec<Image>>, ApiError> {
    Ok(Json(
        read_all::<Image>(&n, IMAGES)?
            .into_iter()
            .map(|(_, i)| i)
            .collect(),
    ))
}

/// One boot image.
#[utoipa::path(get, path = "/api/v1/images/{name}", tag = "images", operation_id = "get_image",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Image), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    _: Auth<Auditor>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Image>, ApiError> {
    super::show_one(&n, IMAGES, &name, "image")
}

/// The body, written as it arrives: the first `kernel_bytes` bytes to `kernel`, the rest
/// to `initrd`; each file's size and blake3.
async fn receive(
    req: Request,
    dir: &std::path::Path,
    kernel_bytes: u64,
) -> Result<(ImageFile, Option<ImageFile>), ApiError> {
    let io = |what: &str, e: std::io::Error| ApiError::internal(format!("{what}: {e}"));
    let mut stream = req.into_body().into_data_stream();
    let mut files = [
        (
            tokio::fs::File::create(dir.join("kernel"))
                .await
                .map_err(|e| io("creating the kernel file", e))?,
            blake3::Hasher::new(),
            0u64,
        ),
        (
            tokio::fs::File::create(dir.join("initrd"))
                .await
                .map_err(|e| io("creating the initrd file", e))?,
            blake3::Hasher::new(),
            0u64,
        ),
    ];
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(format!("body: not received whole: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_IMAGE_BYTES {
            return Err(too_large());
        }
        let mut rest: &[u8] = &chunk;
        while !rest.is_empty() {
            let f = if files[0].2 < kernel_bytes { 0 } else { 1 };
            let room = if f == 0 {
                (kernel_bytes - files[0].2) as usize
            } else {
                rest.len()
            };
            let (part, tail) = rest.split_at(room.min(rest.len()));
            let (file, hasher, size) = &mut files[f];
            file.write_all(part)
                .await
                .map_err(|e| io("writing the image", e))?;
            hasher.update(part);
            *size += part.len() as u64;
            rest = tail;
        }
    }
    if files[0].2 < kernel_bytes {
        return Err(ApiError::bad(format!(
            "body: {total} bytes, shorter than kernel_bytes ({kernel_bytes})"
        )));
    }
    let mut out = Vec::new();
    for (file, hasher, size) in files {
        file.sync_all()
            .await
            .map_err(|e| io("syncing the image", e))?;
        out.push(ImageFile {
            size_bytes: size,
            blake3: hasher.finalize().to_hex().to_string(),
        });
    }
    let initrd = out.pop().filter(|f| f.size_bytes > 0);
    if initrd.is_none() {
        let _ = tokio::fs::remove_file(dir.join("initrd")).await;
    }
    let kernel = out
        .pop()
        .ok_or_else(|| ApiError::internal("no kernel file"))?;
    Ok((kernel, initrd))
}

/// Reads a body to its end (at most [`MAX_IMAGE_BYTES`]), keeping nothing.
async fn drain(req: Request) {
    let mut stream = req.into_body().into_data_stream();
    let mut total = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        total += chunk.len() as u64;
        if total > MAX_IMAGE_BYTES {
            return;
        }
    }
}

/// Upload a boot image: the body (`application/octet-stream`, at most 256 MiB) is the
/// kernel's `kernel_bytes` bytes followed by the initramfs, if any. This node keeps it;
/// every other node fetches its own copy and checks it by blake3 (see `copies`).
#[utoipa::path(post, path = "/api/v1/images", tag = "images", operation_id = "upload_image",
    params(ImageUpload),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The kernel, then the initramfs"),
    security(("token" = []), ("cookie" = [])),
    responses((status = 201, body = Image), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "An image of that name exists"),
        (status = 413, body = ErrorBody, description = "The body is larger than 256 MiB"),
        (status = 503, body = ErrorBody)))]
pub async fn upload(
    State(st): St,
    p: Auth<Operator>,
    Q(q): Q<ImageUpload>,
    req: Request,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    check_name("name", &q.name, &[])?;
    if q.kernel_bytes == 0 || q.kernel_bytes > MAX_IMAGE_BYTES {
        return Err(ApiError::bad(format!(
            "kernel_bytes: 1 to {MAX_IMAGE_BYTES}"
        )));
    }
    if q.cmdline
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_KERNEL_CHARS)
    {
        return Err(ApiError::bad("cmdline: at most 4096 characters"));
    }
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > MAX_IMAGE_BYTES) {
        return Err(too_large());
    }
    let me = images::me()
        .ok_or_else(|| ApiError::unavailable("this node is not ready for images yet"))?;
    let n = super::synced(&st).await?;
    if read::<Image>(&n, IMAGES, &q.name)?.is_some() {
        // Read (and drop) the body first: a client still sending it would see the
        // connection closed instead of the answer.
        drain(req).await;
        return Err(ApiError::conflict(format!(
            "name: image {} already exists",
            q.name
        )));
    }
    let root = images::root(&st.data_dir);
    let tmp = root.join(format!(".upload-{}", crate::tables::random_id()));
    tokio::fs::create_dir_all(&tmp)
        .await
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", tmp.display())))?;
    let res = async {
        let (kernel, initrd) = receive(req, &tmp, q.kernel_bytes).await?;
        let img = Image {
            name: q.name.clone(),
            kernel,
            initrd,
            cmdline: q.cmdline.clone(),
            copies: vec![me],
            uploaded_by: p.user.clone(),
            deleting: false,
            created_ms: now_ms(),
        };
        let mut require = vec![Require::absent(IMAGES, &img.name)];
        let mut ops = vec![put(IMAGES, &img.name, &img)];
        if read::<String>(&n, IMAGE_KEYS, FETCH_KEY)?.is_none() {
            let key = format!(
                "{}{}",
                crate::tables::random_id(),
                crate::tables::random_id()
            );
            require.push(Require::absent(IMAGE_KEYS, FETCH_KEY));
            ops.push(put(IMAGE_KEYS, FETCH_KEY, &key));
        }
        let size = img.kernel.size_bytes + img.initrd.as_ref().map_or(0, |i| i.size_bytes);
        ops.push(event(
            "image.upload",
            &img.name,
            &p.user,
            &format!("boot image uploaded ({size} bytes)"),
        ));
        commit(&st, require, ops, |r| {
            if r.table == IMAGES {
                format!("name: image {} already exists", q.name)
            } else {
                "the image fetch key was made meanwhile; try again".into()
            }
        })
        .await?;
        Ok::<_, ApiError>(img)
    }
    .await;
    match res {
        Ok(img) => {
            let d = images::dir(&st.data_dir, &img.name);
            let _ = tokio::fs::remove_dir_all(&d).await;
            tokio::fs::rename(&tmp, &d)
                .await
                .map_err(|e| ApiError::internal(format!("keeping the upload: {e}")))?;
            Ok((StatusCode::CREATED, Json(img)))
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            Err(e)
        }
    }
}

/// The VMs that name image `name`.
fn users(n: &tessera_state::Node, name: &str) -> Result<Vec<String>, ApiError> {
    Ok(read_all::<Vm>(n, VMS)?
        .into_iter()
        .filter(|(_, v)| v.image.as_deref() == Some(name))
        .map(|(k, _)| k)
        .collect())
}

/// Delete a boot image (refused while a VM names it); every node removes its copy.
#[utoipa::path(delete, path = "/api/v1/images/{name}", tag = "images", operation_id = "delete_image",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A VM names the image"),
        (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): St,
    p: Auth<Operator>,
    Param(name): Param<String>,
    n: Synced,
) -> Result<Json<Deleted>, ApiError> {
    let old: Image = read(&n, IMAGES, &name)?.ok_or_else(|| no_image(&name))?;
    let in_use = |vms: Vec<String>| {
        ApiError::conflict(format!("image {name} is used by VM {}", vms.join(", ")))
    };
    let vms = users(&n, &name)?;
    if !vms.is_empty() {
        return Err(in_use(vms));
    }
    // Two steps, so a VM defined meanwhile cannot end up naming a deleted image: marked
    // `deleting` (a VM create or update requires the image unchanged), then checked again.
    let mut marked = old.clone();
    marked.deleting = true;
    commit(
        &st,
        vec![Require::equals(IMAGES, &name, json!(old))],
        vec![put(IMAGES, &name, &marked)],
        |_| format!("image {name} changed meanwhile; try again"),
    )
    .await?;
    let n = super::synced(&st).await?;
    let vms = users(&n, &name)?;
    if !vms.is_empty() {
        commit(
            &st,
            vec![Require::equals(IMAGES, &name, json!(marked))],
            vec![put(IMAGES, &name, &old)],
            |_| String::new(),
        )
        .await?;
        return Err(in_use(vms));
    }
    commit(
        &st,
        vec![Require::equals(IMAGES, &name, json!(marked))],
        vec![
            del(IMAGES, &name),
            event("image.delete", &name, &p.user, "boot image deleted"),
        ],
        |_| format!("image {name} changed meanwhile; try again"),
    )
    .await?;
    Ok(Json(Deleted { deleted: name }))
}

/// A file of this node's copy of an image, for another node (its fetch key in
/// [`KEY_HEADER`]). Served only from a copy that matches the record.
pub async fn serve_file(
    State(st): St,
    headers: HeaderMap,
    Param((name, file)): Param<(String, String)>,
) -> Result<Response, ApiError> {
    let n = super::synced(&st).await?;
    let key: Option<String> = read(&n, IMAGE_KEYS, FETCH_KEY)?;
    let given = headers
        .get(KEY_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    // blake3::Hash compares in constant time.
    let ok = key.is_some_and(|k| blake3::hash(k.as_bytes()) == blake3::hash(given));
    if !ok {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "only the cluster's nodes fetch image files",
        ));
    }
    let img: Image = read(&n, IMAGES, &name)?.ok_or_else(|| no_image(&name))?;
    let rec = images::files(&img)
        .into_iter()
        .find(|(f, _)| *f == file)
        .map(|(_, r)| r.clone())
        .ok_or_else(|| ApiError::not_found(format!("image {name} has no file {file}")))?;
    let path = images::dir(&st.data_dir, &name).join(&file);
    let (p, want) = (path.clone(), rec.clone());
    let good = tokio::task::spawn_blocking(move || {
        images::hash_file(&p).is_ok_and(|(s, h)| s == want.size_bytes && h == want.blake3)
    })
    .await
    .unwrap_or(false);
    if !good {
        return Err(ApiError::not_found(format!(
            "this node holds no verified copy of image {name}"
        )));
    }
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("opening {}: {e}", path.display())))?;
    // An error ends the stream (the state becomes None): the peer sees a short body.
    let stream = futures_util::stream::unfold(Some(f), |f| async move {
        use tokio::io::AsyncReadExt;
        let mut f = f?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(k) => {
                buf.truncate(k);
                Some((
                    Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)),
                    Some(f),
                ))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (
                axum::http::header::CONTENT_LENGTH,
                rec.size_bytes.to_string(),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
