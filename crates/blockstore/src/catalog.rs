//! The catalog: which volumes, snapshots and layers exist. Small, changed rarely, and
//! replaced atomically (write a temporary file, fsync it, rename it over the catalog, fsync
//! the directory) on every change.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::format::BLOCK;

/// Identifies a layer: a sparse data file and its checksum table. Never reused.
pub type LayerId = u64;

/// Largest volume size accepted (64 TiB): keeps offsets and table sizes far from overflow.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// Version of the catalog format.
pub const CATALOG_VERSION: u32 = 1;

/// A layer's place in a copy-on-write chain.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LayerMeta {
    /// Blocks absent from this layer are read from here.
    pub backing: Option<LayerId>,
}

/// A point-in-time, read-only image of a volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// The frozen layer holding the snapshot's newest blocks.
    pub layer: LayerId,
    /// Volume size when the snapshot was taken.
    pub size: u64,
    /// Seconds since the epoch.
    pub created: u64,
}

/// A writable volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    /// Size in bytes, a multiple of the block size.
    pub size: u64,
    /// The layer that receives writes.
    pub top: LayerId,
    /// Bumped whenever the writer changes; every WAL record carries it.
    pub generation: u64,
    /// Seconds since the epoch.
    pub created: u64,
    /// `volume@snapshot` this volume was cloned from, if any.
    pub origin: Option<String>,
    /// Snapshots by name.
    pub snapshots: BTreeMap<String, SnapshotMeta>,
    /// The replication role the volume last held on this store, as its owner
    /// (`tessera-store`'s replication) wrote it; absent when not replicated. Opaque here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<serde_json::Value>,
}

/// Everything the store knows about its volumes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Format version.
    pub version: u32,
    /// The next layer id to hand out.
    pub next_layer: LayerId,
    /// All live layers.
    pub layers: BTreeMap<LayerId, LayerMeta>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, VolumeMeta>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            version: CATALOG_VERSION,
            next_layer: 1,
            layers: BTreeMap::new(),
            volumes: BTreeMap::new(),
        }
    }
}

impl Catalog {
    /// Loads the catalog; `None` when the file does not exist. Whether that means a new
    /// store or a lost catalog is the caller's decision (see `Store::open`).
    pub fn load(path: &Path) -> Result<Option<Catalog>> {
        let text = match fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
        };
        let bad = |reason: String| StoreError::BadCatalog {
            path: path.display().to_string(),
            reason,
        };
        let cat: Catalog = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if cat.version != CATALOG_VERSION {
            return Err(bad(format!("unsupported version {}", cat.version)));
        }
        cat.check().map_err(bad)?;
        Ok(Some(cat))
    }

    /// The temporary file [`Catalog::save`] writes before renaming it over `path`.
    pub fn temp_path(path: &Path) -> PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    }

    /// Removes a temporary file left by a save that a crash interrupted before its rename.
    /// It is never read: the rename is what makes a new catalog, and it did not happen.
    pub fn discard_temp(path: &Path) -> Result<()> {
        let tmp = Self::temp_path(path);
        match fs::remove_file(&tmp) {
            Ok(()) => {
                tracing::info!(path = %tmp.display(), "removed the temporary catalog of an interrupted save");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(format!("removing {}", tmp.display()), e)),
        }
    }

    /// Writes the catalog so that after a crash either the old or the new one is found.
    ///
    /// The new text goes to a temporary file which is synced before it is renamed over the
    /// catalog (so the name never points at a partly written file), and the directory is
    /// synced after (so the rename itself survives a power cut).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = Self::temp_path(path);
        let text = serde_json::to_vec_pretty(self).map_err(|e| StoreError::BadCatalog {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let mut f = File::create(&tmp).map_err(|e| StoreError::io(ctx("creating"), e))?;
        f.write_all(&text)
            .map_err(|e| StoreError::io(ctx("writing"), e))?;
        f.sync_all()
            .map_err(|e| StoreError::io(ctx("syncing"), e))?;
        fs::rename(&tmp, path).map_err(|e| StoreError::io(ctx("renaming"), e))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// Checks internal consistency: every referenced layer exists and chains end.
    fn check(&self) -> std::result::Result<(), String> {
        let known = |l: &LayerId| self.layers.contains_key(l);
        for (id, layer) in &self.layers {
            if *id >= self.next_layer {
                return Err(format!("layer {id} is not below next_layer"));
            }
            if let Some(b) = layer.backing {
                if !known(&b) {
                    return Err(format!("layer {id} is backed by unknown layer {b}"));
                }
            }
        }
        for (name, v) in &self.volumes {
            if !known(&v.top) {
                return Err(format!("volume {name} has unknown top layer {}", v.top));
            }
            for (s, snap) in &v.snapshots {
                if !known(&snap.layer) {
                    return Err(format!("snapshot {name}@{s} has unknown layer"));
                }
            }
        }
        for id in self.layers.keys() {
            self.chain(*id)?;
        }
        Ok(())
    }

    /// The layers a read of `top` looks through, newest first.
    pub fn chain(&self, top: LayerId) -> std::result::Result<Vec<LayerId>, String> {
        let mut out = vec![top];
        let mut cur = top;
        while let Some(b) = self.layers.get(&cur).and_then(|l| l.backing) {
            if out.len() > self.layers.len() {
                return Err(format!("layer chain from {top} loops"));
            }
            out.push(b);
            cur = b;
        }
        Ok(out)
    }

    /// Hands out a new layer id and records the layer.
    pub fn new_layer(&mut self, backing: Option<LayerId>) -> LayerId {
        let id = self.next_layer;
        self.next_layer += 1;
        self.layers.insert(id, LayerMeta { backing });
        id
    }

    /// Drops layers no volume or snapshot reaches any more; returns their ids.
    pub fn collect_garbage(&mut self) -> Vec<LayerId> {
        let mut live = std::collections::BTreeSet::new();
        let roots = self
            .volumes
            .values()
            .flat_map(|v| std::iter::once(v.top).chain(v.snapshots.values().map(|s| s.layer)));
        for root in roots {
            let mut cur = Some(root);
            while let Some(l) = cur {
                if !live.insert(l) {
                    break;
                }
                cur = self.layers.get(&l).and_then(|m| m.backing);
            }
        }
        let dead: Vec<LayerId> = self
            .layers
            .keys()
            .filter(|l| !live.contains(l))
            .copied()
            .collect();
        for l in &dead {
            self.layers.remove(l);
        }
        dead
    }
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing directory {}", dir.display()), e))
}

/// Checks a volume or snapshot name: 1-64 of `[A-Za-z0-9._-]`, not starting with `.`/`-`.
///
/// `@` and `/` are excluded because export names are `volume` and `volume@snapshot`.
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    let invalid = |reason: &str| StoreError::Invalid {
        field,
        reason: format!("{name:?}: {reason}"),
    };
    if name.is_empty() || name.len() > 64 {
        return Err(invalid("must be 1 to 64 characters"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(invalid("must not start with '.' or '-'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "may only contain letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

/// Checks a volume size: positive, a multiple of 4 KiB, at most [`MAX_VOLUME_SIZE`].
pub fn validate_size(size: u64) -> Result<()> {
    let invalid = |reason: String| StoreError::Invalid {
        field: "size",
        reason,
    };
    if size == 0 {
        return Err(invalid("must be greater than zero".into()));
    }
    if size % BLOCK != 0 {
        return Err(invalid(format!(
            "{size} is not a multiple of {BLOCK} bytes"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(invalid(format!(
            "{size} exceeds the maximum of {MAX_VOLUME_SIZE} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "vm-100-disk-0", "base.img", "A_9"] {
            validate_name("name", good).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a@b", "a/b", "ü", &"x".repeat(65)] {
            assert!(validate_name("name", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_are_checked() {
        validate_size(4096).unwrap();
        validate_size(MAX_VOLUME_SIZE).unwrap();
        for bad in [0, 512, 4097, MAX_VOLUME_SIZE + 4096] {
            assert!(validate_size(bad).is_err());
        }
    }

    #[test]
    fn garbage_collection_keeps_reachable_layers() {
        let mut c = Catalog::default();
        let base = c.new_layer(None);
        let top = c.new_layer(Some(base));
        let orphan = c.new_layer(Some(base));
        c.volumes.insert(
            "v".into(),
            VolumeMeta {
                size: 4096,
                top,
                generation: 1,
                created: 0,
                origin: None,
                snapshots: BTreeMap::new(),
                replication: None,
            },
        );
        assert_eq!(c.collect_garbage(), vec![orphan]);
        assert_eq!(c.chain(top).unwrap(), vec![top, base]);
        c.check().unwrap();
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        assert_eq!(
            Catalog::load(&path).unwrap(),
            None,
            "no file is not an empty catalog"
        );
        let mut c = Catalog::default();
        c.new_layer(None);
        c.save(&path).unwrap();
        assert_eq!(Catalog::load(&path).unwrap(), Some(c));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["catalog.json"],
            "the temporary file was renamed away"
        );
    }

    #[test]
    fn a_temporary_file_left_by_a_crash_is_never_read_and_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        let tmp = Catalog::temp_path(&path);
        assert_eq!(tmp, dir.path().join("catalog.json.tmp"));
        let mut c = Catalog::default();
        c.new_layer(None);
        c.save(&path).unwrap();
        // A save cut short before its rename: half a file under the temporary name.
        fs::write(&tmp, b"{\"version\": 1, \"next_la").unwrap();
        assert_eq!(Catalog::load(&path).unwrap(), Some(c.clone()));
        Catalog::discard_temp(&path).unwrap();
        assert!(!tmp.exists());
        Catalog::discard_temp(&path).unwrap();
        // The next save overwrites any leftover all the same.
        fs::write(&tmp, b"garbage").unwrap();
        c.new_layer(None);
        c.save(&path).unwrap();
        assert_eq!(Catalog::load(&path).unwrap(), Some(c));
        assert!(!tmp.exists());
    }

    #[test]
    fn unreadable_or_malformed_catalogs_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        fs::create_dir(&path).unwrap();
        let err = Catalog::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        fs::remove_dir(&path).unwrap();
        for text in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"version\": 2, \"next_layer\": 1, \"layers\": {}, \"volumes\": {}}",
        ] {
            fs::write(&path, text).unwrap();
            let err = Catalog::load(&path).unwrap_err();
            assert!(matches!(err, StoreError::BadCatalog { .. }), "{err}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn inconsistent_catalog_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        let mut c = Catalog::default();
        c.volumes.insert(
            "v".into(),
            VolumeMeta {
                size: 4096,
                top: 42,
                generation: 1,
                created: 0,
                origin: None,
                snapshots: BTreeMap::new(),
                replication: None,
            },
        );
        c.save(&path).unwrap();
        assert!(matches!(
            Catalog::load(&path),
            Err(StoreError::BadCatalog { .. })
        ));
    }
}
