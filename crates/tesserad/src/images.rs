//! Boot images on this node: the verified local copies under `<data_dir>/images/<name>/`
//! (`kernel`, `initrd`), fetching a missing or damaged copy from a node that holds one
//! (over the peers' HTTPS API, checked by blake3 before it replaces anything), and the
//! loop that copies every image to this node and records it in the image's `copies`.
//!
//! The image records (`images/<name>`) are written by the API (`api/images.rs`); this
//! module owns the files. Nodes authenticate each other's fetches with a random key kept
//! in the replicated state (`image_keys/fetch`), which only cluster members can read.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::json;
use tessera_api::{Image, ImageCopy, ImageFile, Vm};
use tessera_state::{Command, Node, Require};

use crate::tables::{get, put};

/// `images/<name>`: [`Image`].
pub const IMAGES: &str = "images";
/// `image_keys/fetch`: the key nodes present to fetch image files from each other.
pub const IMAGE_KEYS: &str = "image_keys";
/// The key of the fetch key's record.
pub const FETCH_KEY: &str = "fetch";
/// The header carrying the fetch key.
pub const KEY_HEADER: &str = "x-tessera-image-key";

/// What can go wrong with a local copy.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A local file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A peer did not deliver the file.
    #[error("fetching {file} of image {image} from {address}: {reason}")]
    Fetch {
        /// The image.
        image: String,
        /// `kernel` or `initrd`.
        file: &'static str,
        /// The peer's API address.
        address: String,
        /// Why.
        reason: String,
    },
    /// What arrived is not what the image record says.
    #[error("{file} of image {image} from {address} does not match its record ({reason})")]
    Mismatch {
        /// The image.
        image: String,
        /// `kernel` or `initrd`.
        file: &'static str,
        /// The peer's API address.
        address: String,
        /// Size or hash.
        reason: String,
    },
}

/// This node's id and API address (where peers fetch from), once [`start`] ran.
static ME: OnceLock<(String, String)> = OnceLock::new();
/// One fetch at a time on this node: the copy loop and a VM start may want the same image.
static FETCHING: Mutex<()> = Mutex::new(());

/// This node's entry in an image's `copies`, once [`start`] ran.
pub fn me() -> Option<ImageCopy> {
    ME.get().map(|(node, address)| ImageCopy {
        node: node.clone(),
        address: address.clone(),
    })
}

/// Where the images live on this node.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

/// The directory of image `name`'s local copy.
pub fn dir(data_dir: &Path, name: &str) -> PathBuf {
    root(data_dir).join(name)
}

/// The image's files, by the names a fetch uses.
pub fn files(img: &Image) -> Vec<(&'static str, &ImageFile)> {
    let mut v = vec![("kernel", &img.kernel)];
    if let Some(i) = &img.initrd {
        v.push(("initrd", i));
    }
    v
}

/// Size and blake3 of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, h.finalize().to_hex().to_string()))
}

/// Whether this node holds a copy of `img` whose every file matches the record.
pub fn verified(data_dir: &Path, img: &Image) -> bool {
    let d = dir(data_dir, &img.name);
    files(img).iter().all(|(file, rec)| {
        hash_file(&d.join(file))
            .is_ok_and(|(size, hash)| size == rec.size_bytes && hash == rec.blake3)
    })
}

/// Fetches every file of `img` from `from` into a fresh directory, checks each against
/// the record, and only then puts it in place of this node's copy (blocking).
pub fn fetch(data_dir: &Path, img: &Image, key: &str, from: &ImageCopy) -> Result<(), ImageError> {
    let _one = FETCHING.lock().unwrap_or_else(|p| p.into_inner());
    if verified(data_dir, img) {
        return Ok(());
    }
    let fail = |file: &'static str, reason: String| ImageError::Fetch {
        image: img.name.clone(),
        file,
        address: from.address.clone(),
        reason,
    };
    let config = crate::peer_https::client_config(data_dir).map_err(|r| fail("kernel", r))?;
    let agent = ureq::AgentBuilder::new()
        .tls_config(config)
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(30))
        .build();
    let root = root(data_dir);
    let tmp = root.join(format!(".fetch-{}", crate::tables::random_id()));
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::File { what, path, source }
    };
    std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
    let res = (|| {
        for (file, rec) in files(img) {
            let url = format!(
                "https://{}/api/v1/images/{}/files/{file}",
                from.address, img.name
            );
            let resp = agent
                .get(&url)
                .set(KEY_HEADER, key)
                .call()
                .map_err(|e| fail(file, e.to_string()))?;
            let path = tmp.join(file);
            let mut out = std::fs::File::create(&path).map_err(io("creating", &path))?;
            // At most one byte more than the record says: enough to tell "too long".
            let mut body = resp.into_reader().take(rec.size_bytes + 1);
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = body.read(&mut buf).map_err(|e| fail(file, e.to_string()))?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                h.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io("writing", &path))?;
            }
            out.sync_all().map_err(io("syncing", &path))?;
            let hash = h.finalize().to_hex().to_string();
            let mismatch = if size != rec.size_bytes {
                Some(format!("{size} bytes, not {}", rec.size_bytes))
            } else if hash != rec.blake3 {
                Some(format!("blake3 {hash}, not {}", rec.blake3))
            } else {
                None
            };
            if let Some(reason) = mismatch {
                return Err(ImageError::Mismatch {
                    image: img.name.clone(),
                    file,
                    address: from.address.clone(),
                    reason,
                });
            }
        }
        let d = dir(data_dir, &img.name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::rename(&tmp, &d).map_err(io("renaming into place", &d))
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Makes sure this node holds a verified copy of `img`, fetching it from the nodes that
/// hold one (each tried in turn) when it does not.
pub async fn ensure_local(node: &Node, data_dir: &Path, img: &Image) -> Result<(), String> {
    let (dd, i) = (data_dir.to_path_buf(), img.clone());
    if blocking(move || verified(&dd, &i)).await.unwrap_or(false) {
        return Ok(());
    }
    let key: String = get(node, IMAGE_KEYS, FETCH_KEY)
        .ok_or("the cluster has no image fetch key yet (no image was uploaded)")?;
    let me = ME.get().map(|(id, _)| id.as_str()).unwrap_or_default();
    let mut why = Vec::new();
    for from in img.copies.iter().filter(|c| c.node != me) {
        let (dd, i, k, f) = (
            data_dir.to_path_buf(),
            img.clone(),
            key.clone(),
            from.clone(),
        );
        match blocking(move || fetch(&dd, &i, &k, &f)).await {
            Some(Ok(())) => {
                tracing::info!(image = %img.name, from = %from.node, "image copied to this node");
                return Ok(());
            }
            Some(Err(e)) => why.push(e.to_string()),
            None => why.push("the fetch panicked".into()),
        }
    }
    if why.is_empty() {
        why.push("no other node holds a verified copy".into());
    }
    Err(format!(
        "no verified copy of image {} here and none could be fetched: {}",
        img.name,
        why.join("; ")
    ))
}

/// What a VM boots: kernel path, initramfs path, command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boot {
    /// The kernel file on this node.
    pub kernel: String,
    /// The initramfs file on this node, if any.
    pub initrd: Option<String>,
    /// The command line (the VM's own, else its image's).
    pub cmdline: Option<String>,
}

/// What VM `vm` boots on this node: its image's verified local copy (fetched first if
/// this node has none), else its kernel path. The reason why not, as the VM's state
/// reason, when it cannot boot.
pub async fn boot(node: &Node, data_dir: &Path, vm: &Vm) -> Result<Boot, String> {
    let Some(name) = &vm.image else {
        let kernel = vm
            .kernel
            .clone()
            .ok_or("the VM has no kernel or image to boot")?;
        return Ok(Boot {
            kernel,
            initrd: None,
            cmdline: vm.cmdline.clone(),
        });
    };
    let img: Image =
        get(node, IMAGES, name).ok_or_else(|| format!("its boot image {name} does not exist"))?;
    ensure_local(node, data_dir, &img).await?;
    let d = dir(data_dir, name);
    Ok(Boot {
        kernel: d.join("kernel").display().to_string(),
        initrd: img
            .initrd
            .as_ref()
            .map(|_| d.join("initrd").display().to_string()),
        cmdline: vm.cmdline.clone().or(img.cmdline),
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// Starts the copy loop: every image not yet copied here is fetched, checked and recorded
/// in its `copies`; copies of images no longer in the cluster state are removed.
/// `api` is this node's API address (a wildcard one is reached at `management`'s IP).
pub fn start(
    shared: crate::SharedNode,
    me: String,
    data_dir: PathBuf,
    api: SocketAddr,
    management: SocketAddr,
) {
    let api = if api.ip().is_unspecified() {
        SocketAddr::new(management.ip(), api.port())
    } else {
        api
    };
    let _ = ME.set((me.clone(), api.to_string()));
    tokio::spawn(async move {
        let node = loop {
            if let Some(n) = shared.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut rx = node.state.subscribe();
        let mut seen: Option<crate::tables::Table> = None;
        loop {
            let table = node
                .state
                .read(|t| t.get(IMAGES).cloned())
                .unwrap_or_default();
            // Retried every 5 s while something is missing; otherwise only on a change.
            let changed = !seen.as_ref().is_some_and(|s| s.ptr_eq(&table));
            if changed && copy_all(&node, &me, &data_dir, &table).await {
                seen = Some(table);
            }
            if tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
    });
}

/// One pass of the copy loop; whether every image is copied here.
async fn copy_all(node: &Node, me: &str, data_dir: &Path, table: &crate::tables::Table) -> bool {
    let images: Vec<Image> = table
        .values()
        .filter_map(|v| serde_json::from_value(v.clone()).ok())
        .collect();
    let mut done = true;
    for img in images.iter().filter(|i| !i.deleting) {
        if img.copies.iter().any(|c| c.node == me) {
            continue;
        }
        match ensure_local(node, data_dir, img).await {
            Ok(()) => done &= record_copy(node, &img.name).await,
            Err(e) => {
                tracing::warn!(image = %img.name, error = %e, "image not copied yet");
                done = false;
            }
        }
    }
    // Copies of images that are gone (deleted, or a name being reused) go too.
    let names: Vec<String> = images.iter().map(|i| i.name.clone()).collect();
    let root = root(data_dir);
    let _ = blocking(move || {
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Uploads and fetches in progress are dot-directories.
            if !name.starts_with('.') && !names.contains(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    })
    .await;
    done
}

/// Adds this node to image `name`'s copies (compare-and-swap, retried on a race).
async fn record_copy(node: &Node, name: &str) -> bool {
    let Some(mine) = me() else { return false };
    for _ in 0..5 {
        let Some(old) = get::<Image>(node, IMAGES, name) else {
            return true;
        };
        if old.copies.iter().any(|c| c.node == mine.node) {
            return true;
        }
        let mut img = old.clone();
        img.copies.push(mine.clone());
        let txn = Command::Txn {
            require: vec![Require::equals(IMAGES, name, json!(old))],
            ops: vec![put(IMAGES, name, &img)],
        };
        match node.write(txn).await {
            Ok(a) if a.conflict.is_none() => return true,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(image = %name, error = %e, "recording the copy failed");
                return false;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, kernel: &[u8], initrd: Option<&[u8]>) -> Image {
        let file = |b: &[u8]| ImageFile {
            size_bytes: b.len() as u64,
            blake3: blake3::hash(b).to_hex().to_string(),
        };
        Image {
            name: name.into(),
            kernel: file(kernel),
            initrd: initrd.map(file),
            cmdline: None,
            copies: vec![],
            uploaded_by: "admin".into(),
            deleting: false,
            created_ms: 0,
        }
    }

    #[test]
    fn a_copy_counts_only_while_every_file_matches_its_record() {
        let d = tempfile::tempdir().unwrap();
        let img = image("g", b"kernel bytes", Some(b"initrd bytes"));
        assert!(!verified(d.path(), &img), "nothing there yet");
        let dir = dir(d.path(), "g");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernel"), b"kernel bytes").unwrap();
        assert!(!verified(d.path(), &img), "the initrd is missing");
        std::fs::write(dir.join("initrd"), b"initrd bytes").unwrap();
        assert!(verified(d.path(), &img));
        // Same size, one byte changed: the hash tells.
        std::fs::write(dir.join("initrd"), b"initrd bytez").unwrap();
        assert!(!verified(d.path(), &img));
        // Without an initrd in the record, only the kernel counts.
        assert!(verified(d.path(), &image("g", b"kernel bytes", None)));
    }
}
