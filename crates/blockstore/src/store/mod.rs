//! The store: volumes, snapshots and clones over layers, with the write path, the read
//! path, checkpointing and crash recovery.
//!
//! Write path: a write is appended to the WAL and published in the in-memory `pending`
//! map (newest version of each block not yet in its layer file); only then is it
//! acknowledged. Reads look in `pending` first, then the layer chain. The checkpoint seals
//! the WAL segment, copies pending blocks into the layer files, syncs them and deletes the
//! segment. Layer files therefore only ever receive data whose WAL record is durable, so a
//! crash can never leave a block whose data and checksum disagree: recovery replays the
//! WAL over them, idempotently.
//!
//! Fills (trim, write-zeroes) write their markers into the checksum table at once; a lost
//! marker leaves the old data with its old checksum, and a marker that reached the disk
//! before its WAL record reads as zeroes; both are outcomes an unflushed trim may have.
//! Data space under a marker is only punched out during the checkpoint, after the marker
//! itself is durable.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::catalog::{self, Catalog, LayerId, SnapshotMeta, VolumeMeta};
use crate::error::{Result, StoreError};
use crate::format::{
    block_hash, BlockEntry, FillKind, RecordHeader, RecordKind, BLOCK, BLOCK_SIZE, SUM_LEN,
    WAL_MAX_BLOCKS,
};
use crate::layer::LayerFiles;
use crate::wal::{self, SegmentEnd, Wal};

/// Tunables of a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// The active WAL segment is sealed and checkpointed once it holds this many bytes.
    pub wal_segment_bytes: u64,
    /// A non-empty WAL is checkpointed at least this often, bounding replay time.
    pub checkpoint_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_segment_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// The newest version of a block that is in the WAL but not yet in its layer file.
#[derive(Clone)]
struct Pending {
    seg: u64,
    buf: Arc<Vec<u8>>,
    index: u32,
    hash: [u8; SUM_LEN],
}

impl Pending {
    fn block(&self) -> &[u8] {
        let start = self.index as usize * BLOCK_SIZE;
        &self.buf[start..start + BLOCK_SIZE]
    }
}

/// A fill whose data space is to be punched at the next checkpoint.
struct PunchLater {
    seg: u64,
    layer: LayerId,
    first: u64,
    count: u64,
}

struct VolumeRuntime {
    size: u64,
    generation: u64,
    chain: Vec<Arc<LayerFiles>>,
    deleted: bool,
}

struct VolumeState {
    name: String,
    rt: RwLock<VolumeRuntime>,
}

struct Inner {
    dir: PathBuf,
    layer_dir: PathBuf,
    _lock: Flock<fs::File>,
    opts: StoreOptions,
    catalog: Mutex<Catalog>,
    volumes: RwLock<HashMap<String, Arc<VolumeState>>>,
    layers: RwLock<HashMap<LayerId, Arc<LayerFiles>>>,
    open_exports: Mutex<HashMap<String, usize>>,
    wal: Wal,
    pending: RwLock<HashMap<(LayerId, u64), Pending>>,
    punches: Mutex<Vec<PunchLater>>,
    apply: RwLock<()>,
    checkpointing: Mutex<()>,
    rmw: Vec<Mutex<()>>,
    wake: (Mutex<bool>, Condvar),
    stop: AtomicBool,
    space: Mutex<SpaceGuard>,
}

/// Free space on the store's filesystem, re-read every few megabytes or milliseconds.
struct SpaceGuard {
    checked: Option<Instant>,
    free: u64,
    since: u64,
}

/// Space kept free beyond what the WAL needs, for the catalog and checksum tables.
const SPACE_RESERVE: u64 = 4 << 20;

/// A block store in one data directory. Cheap to clone; all clones share the state.
#[derive(Clone)]
pub struct Store {
    // Declared first so it drops first: the final checkpoint needs `inner` alive.
    _bg: Arc<Background>,
    inner: Arc<Inner>,
}

struct Background {
    inner: Weak<Inner>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.stop.store(true, Ordering::SeqCst);
            *inner.wake.0.lock() = true;
            inner.wake.1.notify_all();
        }
        if let Some(h) = self.handle.lock().take() {
            let _ = h.join();
        }
        if let Some(inner) = self.inner.upgrade() {
            if let Err(e) = inner.checkpoint() {
                tracing::error!(error = %e, "final checkpoint failed; the WAL will be replayed on start");
            }
        }
    }
}

/// What a volume looks like from outside.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Volume name (also its export name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes of data the volume's own top layer occupies on disk.
    pub allocated: u64,
    /// The writer generation.
    pub generation: u64,
    /// Seconds since the epoch.
    pub created: u64,
    /// `volume@snapshot` it was cloned from.
    pub origin: Option<String>,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
}

/// What a snapshot looks like from outside.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot name.
    pub name: String,
    /// Export name (`volume@snapshot`).
    pub export: String,
    /// Size of the volume when taken.
    pub size: u64,
    /// Seconds since the epoch.
    pub created: u64,
}

/// A block whose data does not match its checksum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    /// The layer holding it.
    pub layer: LayerId,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Volumes and snapshots whose reads can reach this block.
    pub affects: Vec<String>,
}

/// The result of a scrub.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScrubReport {
    /// Layers scanned.
    pub layers: u64,
    /// Data blocks verified.
    pub blocks_checked: u64,
    /// Every block that failed verification.
    pub bad: Vec<BadBlock>,
}

/// How a range reads, for NBD's `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data is stored.
    Data,
    /// Nothing stored; reads as zeroes.
    Hole,
}

/// One run of same-allocation bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Its allocation.
    pub allocation: Allocation,
}

/// Largest range one [`Export::extents`] call describes; callers ask again for more.
pub const MAX_EXTENT_QUERY: u64 = 1 << 30;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn block_range(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK, (offset + len).div_ceil(BLOCK))
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, replaying any WAL left by a crash.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store> {
        let io = |what: &str, p: &Path, e| StoreError::io(format!("{what} {}", p.display()), e);
        let layer_dir = dir.join("layers");
        let wal_dir = dir.join("wal");
        for d in [dir, &layer_dir, &wal_dir] {
            fs::create_dir_all(d).map_err(|e| io("creating", d, e))?;
        }
        let lock_path = dir.join("lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("opening", &lock_path, e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked(dir.display().to_string()))?;

        let cat_path = dir.join("catalog.json");
        let catalog = Catalog::load(&cat_path)?;
        let mut layers = HashMap::new();
        for id in catalog.layers.keys() {
            layers.insert(*id, Arc::new(LayerFiles::open(&layer_dir, *id, true)?));
        }
        let next_seg = recover(&wal_dir, &layers)?;
        remove_stray_layers(&layer_dir, &catalog)?;

        let mut volumes = HashMap::new();
        for (name, v) in &catalog.volumes {
            volumes.insert(
                name.clone(),
                Arc::new(runtime_for(&catalog, &layers, name, v)?),
            );
        }
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            layer_dir,
            _lock: lock,
            opts,
            catalog: Mutex::new(catalog),
            volumes: RwLock::new(volumes),
            layers: RwLock::new(layers),
            open_exports: Mutex::new(HashMap::new()),
            wal: Wal::create(&wal_dir, next_seg)?,
            pending: RwLock::new(HashMap::new()),
            punches: Mutex::new(Vec::new()),
            apply: RwLock::new(()),
            checkpointing: Mutex::new(()),
            rmw: (0..256).map(|_| Mutex::new(())).collect(),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            space: Mutex::new(SpaceGuard {
                checked: None,
                free: 0,
                since: 0,
            }),
        });
        let weak = Arc::downgrade(&inner);
        let bg_weak = weak.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || checkpoint_loop(bg_weak))
            .map_err(|e| StoreError::io("starting the checkpoint thread", e))?;
        Ok(Store {
            inner,
            _bg: Arc::new(Background {
                inner: weak,
                handle: Mutex::new(Some(handle)),
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Creates an empty, thin volume.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        catalog::validate_name("name", name)?;
        catalog::validate_size(size)?;
        let inner = &self.inner;
        let mut cat = inner.catalog.lock();
        if cat.volumes.contains_key(name) {
            return Err(StoreError::AlreadyExists(format!("volume {name}")));
        }
        let mut next = cat.clone();
        let top = next.new_layer(None);
        let meta = VolumeMeta {
            size,
            top,
            generation: 1,
            created: now(),
            origin: None,
            snapshots: BTreeMap::new(),
        };
        next.volumes.insert(name.to_string(), meta);
        self.commit_with_new_layer(&mut cat, next, top)?;
        self.add_runtime(&cat, name)?;
        drop(cat);
        self.volume_info(name)
    }

    /// Lists volumes by name.
    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let names: Vec<String> = self.inner.catalog.lock().volumes.keys().cloned().collect();
        names
            .iter()
            .filter_map(|n| self.volume_info(n).ok())
            .collect()
    }

    /// Describes one volume.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let cat = self.inner.catalog.lock();
        let v = cat
            .volumes
            .get(name)
            .ok_or_else(|| StoreError::NotFound(format!("volume {name}")))?;
        let allocated = self
            .inner
            .layers
            .read()
            .get(&v.top)
            .map(|l| l.allocated_bytes())
            .unwrap_or(0);
        Ok(VolumeInfo {
            name: name.to_string(),
            size: v.size,
            allocated,
            generation: v.generation,
            created: v.created,
            origin: v.origin.clone(),
            snapshots: v
                .snapshots
                .iter()
                .map(|(s, m)| SnapshotInfo {
                    name: s.clone(),
                    export: format!("{name}@{s}"),
                    size: m.size,
                    created: m.created,
                })
                .collect(),
        })
    }

    /// Grows a volume. Shrinking is refused: it would silently drop data.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        catalog::validate_size(size)?;
        let mut cat = self.inner.catalog.lock();
        let old = cat
            .volumes
            .get(name)
            .ok_or_else(|| StoreError::NotFound(format!("volume {name}")))?
            .size;
        if size < old {
            return Err(StoreError::Invalid {
                field: "size",
                reason: format!("{size} is smaller than the current {old}; volumes only grow"),
            });
        }
        let state = self.runtime(name)?;
        let mut rt = state.rt.write();
        let mut next = cat.clone();
        if let Some(v) = next.volumes.get_mut(name) {
            v.size = size;
        }
        next.save(&self.cat_path())?;
        *cat = next;
        rt.size = size;
        drop(rt);
        drop(cat);
        self.volume_info(name)
    }

    /// Deletes a volume and its snapshots. Refused while any of them is exported.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut cat = self.inner.catalog.lock();
        if !cat.volumes.contains_key(name) {
            return Err(StoreError::NotFound(format!("volume {name}")));
        }
        self.refuse_if_open(name, true)?;
        let mut next = cat.clone();
        next.volumes.remove(name);
        let dead = next.collect_garbage();
        next.save(&self.cat_path())?;
        *cat = next;
        if let Some(state) = self.inner.volumes.write().remove(name) {
            state.rt.write().deleted = true;
        }
        self.drop_layers(&dead);
        Ok(())
    }

    /// Takes a point-in-time snapshot: the volume's top layer is frozen and a new, empty
    /// layer on top of it takes the writes. No data is copied.
    pub fn create_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        catalog::validate_name("snapshot", snapshot)?;
        let mut cat = self.inner.catalog.lock();
        let v = cat
            .volumes
            .get(volume)
            .ok_or_else(|| StoreError::NotFound(format!("volume {volume}")))?;
        if v.snapshots.contains_key(snapshot) {
            return Err(StoreError::AlreadyExists(format!(
                "snapshot {volume}@{snapshot}"
            )));
        }
        let state = self.runtime(volume)?;
        // Writes wait while the top layer changes, so the snapshot holds exactly the
        // writes acknowledged before this point.
        let mut rt = state.rt.write();
        let mut next = cat.clone();
        let old_top = v.top;
        let new_top = next.new_layer(Some(old_top));
        let created = now();
        if let Some(v) = next.volumes.get_mut(volume) {
            v.snapshots.insert(
                snapshot.to_string(),
                SnapshotMeta {
                    layer: old_top,
                    size: rt.size,
                    created,
                },
            );
            v.top = new_top;
        }
        let size = rt.size;
        self.commit_with_new_layer(&mut cat, next, new_top)?;
        let files = self.layer(new_top)?;
        rt.chain.insert(0, files);
        Ok(SnapshotInfo {
            name: snapshot.to_string(),
            export: format!("{volume}@{snapshot}"),
            size,
            created,
        })
    }

    /// Deletes a snapshot. Its layer stays while newer layers build on it.
    pub fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        let mut cat = self.inner.catalog.lock();
        let exists = cat
            .volumes
            .get(volume)
            .is_some_and(|v| v.snapshots.contains_key(snapshot));
        if !exists {
            return Err(StoreError::NotFound(format!(
                "snapshot {volume}@{snapshot}"
            )));
        }
        self.refuse_if_open(&format!("{volume}@{snapshot}"), false)?;
        let mut next = cat.clone();
        if let Some(v) = next.volumes.get_mut(volume) {
            v.snapshots.remove(snapshot);
        }
        let dead = next.collect_garbage();
        next.save(&self.cat_path())?;
        *cat = next;
        self.drop_layers(&dead);
        Ok(())
    }

    /// Makes a new writable volume from a snapshot; it shares the snapshot's blocks.
    pub fn clone_snapshot(&self, volume: &str, snapshot: &str, name: &str) -> Result<VolumeInfo> {
        catalog::validate_name("name", name)?;
        let mut cat = self.inner.catalog.lock();
        let snap = cat
            .volumes
            .get(volume)
            .and_then(|v| v.snapshots.get(snapshot))
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("snapshot {volume}@{snapshot}")))?;
        if cat.volumes.contains_key(name) {
            return Err(StoreError::AlreadyExists(format!("volume {name}")));
        }
        let mut next = cat.clone();
        let top = next.new_layer(Some(snap.layer));
        next.volumes.insert(
            name.to_string(),
            VolumeMeta {
                size: snap.size,
                top,
                generation: 1,
                created: now(),
                origin: Some(format!("{volume}@{snapshot}")),
                snapshots: BTreeMap::new(),
            },
        );
        self.commit_with_new_layer(&mut cat, next, top)?;
        self.add_runtime(&cat, name)?;
        drop(cat);
        self.volume_info(name)
    }

    /// Names of everything that can be exported: volumes and `volume@snapshot`s.
    pub fn list_exports(&self) -> Vec<(String, bool)> {
        let cat = self.inner.catalog.lock();
        let mut out = Vec::new();
        for (name, v) in &cat.volumes {
            out.push((name.clone(), false));
            for s in v.snapshots.keys() {
                out.push((format!("{name}@{s}"), true));
            }
        }
        out
    }

    /// Opens an export: `volume` (read-write) or `volume@snapshot` (read-only).
    pub fn open_export(&self, export: &str) -> Result<Export> {
        let cat = self.inner.catalog.lock();
        let target = match export.split_once('@') {
            None => {
                let state = self.runtime(export)?;
                Target::Volume(state)
            }
            Some((vol, snap)) => {
                let meta = cat
                    .volumes
                    .get(vol)
                    .and_then(|v| v.snapshots.get(snap))
                    .ok_or_else(|| StoreError::NotFound(format!("snapshot {export}")))?;
                let chain = cat
                    .chain(meta.layer)
                    .map_err(|reason| StoreError::BadCatalog {
                        path: self.cat_path().display().to_string(),
                        reason,
                    })?
                    .into_iter()
                    .map(|l| self.layer(l))
                    .collect::<Result<Vec<_>>>()?;
                Target::Snapshot {
                    chain,
                    size: meta.size,
                }
            }
        };
        *self
            .inner
            .open_exports
            .lock()
            .entry(export.to_string())
            .or_default() += 1;
        Ok(Export {
            store: self.clone(),
            name: export.to_string(),
            target,
        })
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.wal.sync()
    }

    /// Copies the WAL into the layer files now (normally done in the background).
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint()
    }

    /// Reads and verifies every stored block of every layer.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let cat = self.inner.catalog.lock().clone();
        let mut owners: HashMap<LayerId, Vec<String>> = HashMap::new();
        for (name, v) in &cat.volumes {
            let roots = std::iter::once((name.clone(), v.top)).chain(
                v.snapshots
                    .iter()
                    .map(|(s, m)| (format!("{name}@{s}"), m.layer)),
            );
            for (who, root) in roots {
                for l in cat.chain(root).unwrap_or_default() {
                    owners.entry(l).or_default().push(who.clone());
                }
            }
        }
        let mut report = ScrubReport::default();
        for id in cat.layers.keys() {
            let files = self.layer(*id)?;
            report.layers += 1;
            let total = files.table_blocks()?;
            let mut first = 0;
            while first < total {
                let n = (total - first).min(1024);
                // The checkpoint writes a block's data and checksum one after the other;
                // scrubbing between the two would report a false mismatch.
                let _apply = self.inner.apply.read();
                let entries = files.read_entries(first, n as usize)?;
                let mut buf = vec![0u8; BLOCK_SIZE];
                for (i, e) in entries.iter().enumerate() {
                    if let BlockEntry::Data(h) = e {
                        let b = first + i as u64;
                        files.read_blocks(b, &mut buf)?;
                        report.blocks_checked += 1;
                        if block_hash(&buf) != *h {
                            tracing::error!(layer = id, block = b, "scrub found a corrupt block");
                            report.bad.push(BadBlock {
                                layer: *id,
                                offset: b * BLOCK,
                                affects: owners.get(id).cloned().unwrap_or_default(),
                            });
                        }
                    }
                }
                first += n;
            }
        }
        Ok(report)
    }

    fn cat_path(&self) -> PathBuf {
        self.inner.dir.join("catalog.json")
    }

    fn runtime(&self, name: &str) -> Result<Arc<VolumeState>> {
        self.inner
            .volumes
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("volume {name}")))
    }

    fn layer(&self, id: LayerId) -> Result<Arc<LayerFiles>> {
        self.inner
            .layers
            .read()
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("layer {id}")))
    }

    /// Creates the files of `layer`, then persists `next`; on failure nothing changes.
    fn commit_with_new_layer(
        &self,
        cat: &mut Catalog,
        next: Catalog,
        layer: LayerId,
    ) -> Result<()> {
        let files = Arc::new(LayerFiles::open(&self.inner.layer_dir, layer, true)?);
        catalog::sync_dir(&self.inner.layer_dir)?;
        if let Err(e) = next.save(&self.cat_path()) {
            let _ = LayerFiles::remove(&self.inner.layer_dir, layer);
            return Err(e);
        }
        self.inner.layers.write().insert(layer, files);
        *cat = next;
        Ok(())
    }

    fn add_runtime(&self, cat: &Catalog, name: &str) -> Result<()> {
        let Some(v) = cat.volumes.get(name) else {
            return Err(StoreError::NotFound(format!("volume {name}")));
        };
        let layers = self.inner.layers.read();
        let state = runtime_for(cat, &layers, name, v)?;
        drop(layers);
        self.inner
            .volumes
            .write()
            .insert(name.to_string(), Arc::new(state));
        Ok(())
    }

    fn refuse_if_open(&self, name: &str, with_snapshots: bool) -> Result<()> {
        let open = self.inner.open_exports.lock();
        let prefix = format!("{name}@");
        let users: usize = open
            .iter()
            .filter(|(k, _)| *k == name || (with_snapshots && k.starts_with(&prefix)))
            .map(|(_, n)| *n)
            .sum();
        if users > 0 {
            return Err(StoreError::Busy(
                name.to_string(),
                format!("{users} open export connection(s)"),
            ));
        }
        Ok(())
    }

    fn drop_layers(&self, dead: &[LayerId]) {
        let mut layers = self.inner.layers.write();
        for id in dead {
            layers.remove(id);
            if let Err(e) = LayerFiles::remove(&self.inner.layer_dir, *id) {
                tracing::warn!(layer = id, error = %e, "could not remove files of a deleted layer; removed at next start");
            }
        }
    }
}

fn runtime_for(
    cat: &Catalog,
    layers: &HashMap<LayerId, Arc<LayerFiles>>,
    name: &str,
    v: &VolumeMeta,
) -> Result<VolumeState> {
    let ids = cat.chain(v.top).map_err(|reason| StoreError::BadCatalog {
        path: "catalog.json".into(),
        reason,
    })?;
    let chain = ids
        .iter()
        .map(|l| {
            layers
                .get(l)
                .cloned()
                .ok_or_else(|| StoreError::NotFound(format!("layer {l}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(VolumeState {
        name: name.to_string(),
        rt: RwLock::new(VolumeRuntime {
            size: v.size,
            generation: v.generation,
            chain,
            deleted: false,
        }),
    })
}

/// Removes layer files the catalog does not know (left by a crash mid-create or delete).
fn remove_stray_layers(layer_dir: &Path, cat: &Catalog) -> Result<()> {
    let rd = fs::read_dir(layer_dir)
        .map_err(|e| StoreError::io(format!("listing {}", layer_dir.display()), e))?;
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(stem) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".data").or_else(|| n.strip_suffix(".sums")))
        else {
            continue;
        };
        if let Ok(id) = u64::from_str_radix(stem, 16) {
            if !cat.layers.contains_key(&id) {
                tracing::info!(
                    layer = id,
                    "removing files of a layer the catalog does not know"
                );
                LayerFiles::remove(layer_dir, id)?;
            }
        }
    }
    Ok(())
}

/// Replays every WAL segment into the layer files, makes them durable and deletes the
/// segments. Returns the number for the next segment.
fn recover(wal_dir: &Path, layers: &HashMap<LayerId, Arc<LayerFiles>>) -> Result<u64> {
    let segs = wal::list_segments(wal_dir)?;
    let Some(last) = segs.last().copied() else {
        return Ok(1);
    };
    let mut punches = Vec::new();
    let mut records = 0u64;
    for &seg in &segs {
        let end = wal::replay_segment(wal_dir, seg, |rec| {
            records += 1;
            let h = rec.header;
            let Some(files) = layers.get(&h.layer) else {
                return Ok(()); // the layer was deleted after this write
            };
            match h.kind {
                RecordKind::Data => {
                    files.write_blocks(h.first_block, &rec.data)?;
                    files.write_entries(h.first_block, &rec.hashes)
                }
                RecordKind::Fill(kind) => {
                    files.fill_entries(h.first_block, u64::from(h.nblocks), kind)?;
                    punches.push((h.layer, h.first_block, u64::from(h.nblocks)));
                    Ok(())
                }
            }
        })?;
        if let SegmentEnd::Torn { offset, reason } = end {
            if seg != last {
                // Sealed segments were synced whole before the next began: this is damage,
                // not a crash. Refuse to guess which writes to drop.
                return Err(StoreError::Io {
                    context: format!(
                        "WAL segment {seg} (sealed) is damaged at offset {offset}: {reason}; \
                         refusing to start without it"
                    ),
                    source: std::io::Error::from_raw_os_error(nix::libc::EIO),
                });
            }
            tracing::warn!(segment = seg, offset, %reason, "WAL ends in an incomplete record (crash before flush); it is dropped");
        }
    }
    for files in layers.values() {
        files.sync()?;
    }
    for (layer, first, count) in punches {
        if let Some(files) = layers.get(&layer) {
            punch_markers(files, first, count)?;
        }
    }
    wal::remove_segments(wal_dir, &segs)?;
    if records > 0 {
        tracing::info!(
            records,
            segments = segs.len(),
            "replayed the write-ahead log"
        );
    }
    Ok(last + 1)
}

/// Punches the data of blocks in the range whose durable checksum entry is a marker.
fn punch_markers(files: &LayerFiles, first: u64, count: u64) -> Result<()> {
    let mut b = first;
    let end = first + count;
    while b < end {
        let n = (end - b).min(65536);
        let entries = files.read_entries(b, n as usize)?;
        let mut i = 0;
        while i < entries.len() {
            if matches!(entries[i], BlockEntry::Data(_)) {
                i += 1;
                continue;
            }
            let start = i;
            while i < entries.len() && !matches!(entries[i], BlockEntry::Data(_)) {
                i += 1;
            }
            files.punch_blocks(b + start as u64, (i - start) as u64)?;
        }
        b += n;
    }
    Ok(())
}

fn checkpoint_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let interval = inner.opts.checkpoint_interval;
        {
            let mut woken = inner.wake.0.lock();
            if !*woken {
                inner.wake.1.wait_for(&mut woken, interval);
            }
            *woken = false;
        }
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        if inner.wal.active_len() > 0 {
            if let Err(e) = inner.checkpoint() {
                tracing::error!(error = %e, "checkpoint failed; the WAL keeps the data and it is retried");
            }
        }
        drop(inner);
    }
}

impl Inner {
    fn checkpoint(&self) -> Result<()> {
        let _one = self.checkpointing.lock();
        let _apply = self.apply.write();
        let Some(sealed) = self.wal.rotate()? else {
            return Ok(());
        };
        let mut todo: Vec<((LayerId, u64), Pending)> = self
            .pending
            .read()
            .iter()
            .filter(|(_, p)| p.seg <= sealed)
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        todo.sort_unstable_by_key(|(k, _)| *k);
        let layers = self.layers.read().clone();
        let mut touched: HashMap<LayerId, Arc<LayerFiles>> = HashMap::new();
        let mut i = 0;
        while i < todo.len() {
            // Coalesce consecutive blocks of one layer into one write each for data and sums.
            let (layer, first) = todo[i].0;
            let mut j = i + 1;
            while j < todo.len() && todo[j].0 == (layer, first + (j - i) as u64) && j - i < 1024 {
                j += 1;
            }
            if let Some(files) = layers.get(&layer) {
                let data: Vec<&[u8]> = todo[i..j].iter().map(|(_, p)| p.block()).collect();
                let mut sums = Vec::with_capacity((j - i) * SUM_LEN);
                for (_, p) in &todo[i..j] {
                    sums.extend_from_slice(&p.hash);
                }
                files.write_blocks_vectored(first, &data)?;
                files.write_entries(first, &sums)?;
                touched.insert(layer, files.clone());
            }
            i = j;
        }
        let punches: Vec<PunchLater> = {
            let mut all = self.punches.lock();
            let (now, later): (Vec<_>, Vec<_>) = all.drain(..).partition(|p| p.seg <= sealed);
            *all = later;
            now
        };
        for p in &punches {
            if let Some(files) = layers.get(&p.layer) {
                touched.insert(p.layer, files.clone());
            }
        }
        for files in touched.values() {
            files.sync()?;
        }
        for p in &punches {
            if let Some(files) = layers.get(&p.layer) {
                punch_markers(files, p.first, p.count)?;
            }
        }
        {
            let mut pending = self.pending.write();
            for (k, p) in &todo {
                if pending.get(k).is_some_and(|cur| cur.seg == p.seg) {
                    pending.remove(k);
                }
            }
        }
        self.wal.remove_upto(sealed)?;
        tracing::debug!(sealed, blocks = todo.len(), "checkpoint done");
        Ok(())
    }

    /// Refuses a WAL append of `len` bytes when the filesystem could not also hold the
    /// checkpoint's copy of everything in the WAL: a full disk must fail new writes, never
    /// leave acknowledged ones that cannot be replayed.
    fn admit(&self, len: u64) -> Result<()> {
        let mut g = self.space.lock();
        let stale = g
            .checked
            .is_none_or(|t| t.elapsed() > Duration::from_millis(200) || g.since > (8 << 20));
        if stale {
            let st = nix::sys::statvfs::statvfs(&self.dir)
                .map_err(|e| StoreError::io("checking free space", e.into()))?;
            g.free = st.blocks_available() as u64 * st.fragment_size() as u64;
            g.since = 0;
            g.checked = Some(Instant::now());
        }
        let unapplied = self.wal.unapplied();
        let need = 2 * len + unapplied + SPACE_RESERVE;
        let free = g.free.saturating_sub(g.since);
        if free < need {
            drop(g);
            self.wake_checkpoint();
            return Err(StoreError::NoSpace {
                context: format!(
                    "{free} bytes free, {need} needed to log this write and keep the log replayable"
                ),
            });
        }
        g.since += len;
        if unapplied > free / 4 {
            drop(g);
            self.wake_checkpoint();
        }
        Ok(())
    }

    fn wake_checkpoint(&self) {
        let mut w = self.wake.0.lock();
        if !*w {
            *w = true;
            self.wake.1.notify_one();
        }
    }

    fn maybe_wake_checkpoint(&self, wal_len: u64) {
        if wal_len >= self.opts.wal_segment_bytes {
            let mut w = self.wake.0.lock();
            if !*w {
                *w = true;
                self.wake.1.notify_one();
            }
        }
    }
}

enum Target {
    Volume(Arc<VolumeState>),
    Snapshot {
        chain: Vec<Arc<LayerFiles>>,
        size: u64,
    },
}

/// An open volume or snapshot: what the NBD server and the VMM read and write through.
pub struct Export {
    store: Store,
    name: String,
    target: Target,
}

impl Drop for Export {
    fn drop(&mut self) {
        let mut open = self.store.inner.open_exports.lock();
        if let Some(n) = open.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.name);
            }
        }
    }
}

/// Where one block's current content comes from.
enum Source {
    Pending(Pending),
    Layer(usize, [u8; SUM_LEN]),
    Zero,
}

impl Export {
    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        match &self.target {
            Target::Volume(v) => v.rt.read().size,
            Target::Snapshot { size, .. } => *size,
        }
    }

    /// Snapshots are read-only.
    pub fn read_only(&self) -> bool {
        matches!(self.target, Target::Snapshot { .. })
    }

    fn with_chain<T>(&self, f: impl FnOnce(&[Arc<LayerFiles>], u64) -> Result<T>) -> Result<T> {
        match &self.target {
            Target::Volume(v) => {
                let rt = v.rt.read();
                if rt.deleted {
                    return Err(StoreError::Gone(v.name.clone()));
                }
                f(&rt.chain, rt.size)
            }
            Target::Snapshot { chain, size } => f(chain, *size),
        }
    }

    fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                length: len,
                size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`. A block failing its checksum fails the read.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.with_chain(|chain, size| {
            Self::check_range(offset, buf.len() as u64, size)?;
            self.store.read_chain(chain, offset, buf)
        })
    }

    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.write_owned(offset, data.to_vec(), fua)
    }

    /// Like [`Export::write_at`], taking the buffer: block-aligned writes are logged and
    /// published from it without another copy.
    pub fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        let Target::Volume(v) = &self.target else {
            return Err(StoreError::ReadOnly);
        };
        {
            let rt = v.rt.read();
            if rt.deleted {
                return Err(StoreError::Gone(v.name.clone()));
            }
            Self::check_range(offset, data.len() as u64, rt.size)?;
            if offset % BLOCK == 0 && data.len() % BLOCK_SIZE == 0 && !data.is_empty() {
                self.store.append_blocks(&rt, offset / BLOCK, data)?;
            } else {
                self.store.write_chain(&rt, offset, &data)?;
            }
        }
        if fua {
            self.store.flush()?;
        }
        Ok(())
    }

    /// Discards a range: it reads as zeroes afterwards and its space is freed.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.zero_range(offset, len, false, fua)
    }

    /// Writes zeroes over a range; with `allocate` the blocks are stored as data
    /// (NBD's NO_HOLE), otherwise they become holes.
    pub fn write_zeroes(&self, offset: u64, len: u64, allocate: bool, fua: bool) -> Result<()> {
        self.zero_range(offset, len, allocate, fua)
    }

    fn zero_range(&self, offset: u64, len: u64, allocate: bool, fua: bool) -> Result<()> {
        let Target::Volume(v) = &self.target else {
            return Err(StoreError::ReadOnly);
        };
        {
            let rt = v.rt.read();
            if rt.deleted {
                return Err(StoreError::Gone(v.name.clone()));
            }
            Self::check_range(offset, len, rt.size)?;
            let end = offset + len;
            let first_full = offset.div_ceil(BLOCK);
            let end_full = end / BLOCK;
            if allocate || first_full >= end_full {
                self.store.write_zero_data(&rt, offset, end)?;
            } else {
                if offset < first_full * BLOCK {
                    self.store
                        .write_zero_data(&rt, offset, first_full * BLOCK)?;
                }
                self.store.fill(&rt, first_full, end_full - first_full)?;
                if end > end_full * BLOCK {
                    self.store.write_zero_data(&rt, end_full * BLOCK, end)?;
                }
            }
        }
        if fua {
            self.store.flush()?;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable (on any export of this store).
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// Describes how `offset..offset+len` is allocated, as runs starting at `offset`. May
    /// describe less than asked (at most [`MAX_EXTENT_QUERY`] bytes), never nothing.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.with_chain(|chain, size| {
            Self::check_range(offset, len, size)?;
            let len = len.min(MAX_EXTENT_QUERY);
            let (b0, b1) = block_range(offset, len);
            let sources = self.store.resolve(chain, b0, (b1 - b0) as usize)?;
            let mut out: Vec<Extent> = Vec::new();
            let end = offset + len;
            for (i, s) in sources.iter().enumerate() {
                let b = b0 + i as u64;
                let lo = (b * BLOCK).max(offset);
                let hi = ((b + 1) * BLOCK).min(end);
                let allocation = match s {
                    Source::Zero => Allocation::Hole,
                    _ => Allocation::Data,
                };
                match out.last_mut() {
                    Some(e) if e.allocation == allocation => e.length += hi - lo,
                    _ => out.push(Extent {
                        length: hi - lo,
                        allocation,
                    }),
                }
            }
            Ok(out)
        })
    }
}

impl Store {
    /// Finds the source of blocks `first..first+n` through `chain`.
    fn resolve(&self, chain: &[Arc<LayerFiles>], first: u64, n: usize) -> Result<Vec<Source>> {
        let mut out: Vec<Option<Source>> = (0..n).map(|_| None).collect();
        let mut left = n;
        for (depth, layer) in chain.iter().enumerate() {
            {
                let pending = self.inner.pending.read();
                if !pending.is_empty() {
                    for (i, slot) in out.iter_mut().enumerate() {
                        if slot.is_none() {
                            if let Some(p) = pending.get(&(layer.id, first + i as u64)) {
                                *slot = Some(Source::Pending(p.clone()));
                                left -= 1;
                            }
                        }
                    }
                }
            }
            if left == 0 {
                break;
            }
            let lo = out.iter().position(Option::is_none).unwrap_or(0);
            let hi = out.iter().rposition(Option::is_none).map_or(0, |p| p + 1);
            let entries = layer.read_entries(first + lo as u64, hi - lo)?;
            for (k, e) in entries.into_iter().enumerate() {
                let slot = &mut out[lo + k];
                if slot.is_some() {
                    continue;
                }
                match e {
                    BlockEntry::Absent => {}
                    BlockEntry::Zero => {
                        *slot = Some(Source::Zero);
                        left -= 1;
                    }
                    BlockEntry::Data(h) => {
                        *slot = Some(Source::Layer(depth, h));
                        left -= 1;
                    }
                }
            }
            if left == 0 {
                break;
            }
        }
        Ok(out.into_iter().map(|s| s.unwrap_or(Source::Zero)).collect())
    }

    fn read_chain(&self, chain: &[Arc<LayerFiles>], offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (b0, b1) = block_range(offset, buf.len() as u64);
        let sources = self.resolve(chain, b0, (b1 - b0) as usize)?;
        let aligned = offset % BLOCK == 0 && buf.len() % BLOCK_SIZE == 0;
        if aligned {
            return Self::copy_sources(chain, b0, &sources, buf);
        }
        let mut blocks = vec![0u8; sources.len() * BLOCK_SIZE];
        Self::copy_sources(chain, b0, &sources, &mut blocks)?;
        let skip = (offset - b0 * BLOCK) as usize;
        let len = buf.len();
        buf.copy_from_slice(&blocks[skip..skip + len]);
        Ok(())
    }

    /// Fills `blocks` (whole blocks from `b0`) from their resolved sources, verifying
    /// every block read from a layer file against its checksum.
    fn copy_sources(
        chain: &[Arc<LayerFiles>],
        b0: u64,
        sources: &[Source],
        blocks: &mut [u8],
    ) -> Result<()> {
        let mut i = 0;
        while i < sources.len() {
            match &sources[i] {
                Source::Zero => {
                    blocks[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0);
                    i += 1;
                }
                Source::Pending(p) => {
                    blocks[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].copy_from_slice(p.block());
                    i += 1;
                }
                Source::Layer(depth, _) => {
                    let mut j = i + 1;
                    while j < sources.len()
                        && matches!(&sources[j], Source::Layer(d, _) if d == depth)
                    {
                        j += 1;
                    }
                    let layer = &chain[*depth];
                    let out = &mut blocks[i * BLOCK_SIZE..j * BLOCK_SIZE];
                    layer.read_blocks(b0 + i as u64, out)?;
                    for (k, block) in out.chunks_exact(BLOCK_SIZE).enumerate() {
                        if let Source::Layer(_, h) = &sources[i + k] {
                            if block_hash(block) != *h {
                                let b = b0 + (i + k) as u64;
                                tracing::error!(
                                    layer = layer.id,
                                    block = b,
                                    "checksum mismatch on read"
                                );
                                return Err(StoreError::Corrupt {
                                    layer: layer.id,
                                    block: b,
                                });
                            }
                        }
                    }
                    i = j;
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`, merging partial blocks at either end with their content.
    fn write_chain(&self, rt: &VolumeRuntime, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let (b0, b1) = block_range(offset, data.len() as u64);
        let aligned = offset % BLOCK == 0 && data.len() % BLOCK_SIZE == 0;
        if aligned {
            return self.append_blocks(rt, b0, data.to_vec());
        }
        // Two unaligned writes to different bytes of one block must both survive, so the
        // edge blocks are read, merged and written under a per-block lock.
        let mut locks: Vec<usize> = [b0, b1 - 1]
            .iter()
            .map(|b| (b % self.inner.rmw.len() as u64) as usize)
            .collect();
        locks.dedup();
        let _g: Vec<_> = locks.iter().map(|i| self.inner.rmw[*i].lock()).collect();
        let mut blocks = vec![0u8; ((b1 - b0) * BLOCK) as usize];
        let skip = (offset - b0 * BLOCK) as usize;
        if skip != 0 {
            self.read_chain(&rt.chain, b0 * BLOCK, &mut blocks[..BLOCK_SIZE])?;
        }
        let tail = skip + data.len();
        if tail % BLOCK_SIZE != 0 && (b1 - b0 > 1 || skip == 0) {
            let last = blocks.len() - BLOCK_SIZE;
            self.read_chain(&rt.chain, (b1 - 1) * BLOCK, &mut blocks[last..])?;
        }
        blocks[skip..tail].copy_from_slice(data);
        self.append_blocks(rt, b0, blocks)
    }

    fn write_zero_data(&self, rt: &VolumeRuntime, start: u64, end: u64) -> Result<()> {
        let zeroes = vec![0u8; (WAL_MAX_BLOCKS as usize * BLOCK_SIZE).min((end - start) as usize)];
        let mut at = start;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64);
            self.write_chain(rt, at, &zeroes[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// Appends whole blocks to the WAL and publishes them.
    fn append_blocks(&self, rt: &VolumeRuntime, first: u64, data: Vec<u8>) -> Result<()> {
        let max = WAL_MAX_BLOCKS as usize * BLOCK_SIZE;
        if data.len() <= max {
            return self.append_record(rt, first, data);
        }
        for (c, chunk) in data.chunks(max).enumerate() {
            let start = first + (c * WAL_MAX_BLOCKS as usize) as u64;
            self.append_record(rt, start, chunk.to_vec())?;
        }
        Ok(())
    }

    /// Logs one record of whole blocks (at most [`WAL_MAX_BLOCKS`]) and publishes them.
    fn append_record(&self, rt: &VolumeRuntime, start: u64, data: Vec<u8>) -> Result<()> {
        let layer = rt.chain[0].id;
        let n = data.len() / BLOCK_SIZE;
        let mut hashes = Vec::with_capacity(n * SUM_LEN);
        for block in data.chunks_exact(BLOCK_SIZE) {
            hashes.extend_from_slice(&block_hash(block));
        }
        self.inner.admit((data.len() + hashes.len()) as u64)?;
        let buf = Arc::new(data);
        let header = RecordHeader {
            kind: RecordKind::Data,
            nblocks: n as u32,
            segment: 0,
            layer,
            first_block: start,
            generation: rt.generation,
        };
        let ((), wal_len) = self.inner.wal.append(&header, &hashes, &buf, |seg| {
            let mut pending = self.inner.pending.write();
            for (i, hash) in hashes.chunks_exact(SUM_LEN).enumerate() {
                let mut h = [0u8; SUM_LEN];
                h.copy_from_slice(hash);
                pending.insert(
                    (layer, start + i as u64),
                    Pending {
                        seg,
                        buf: buf.clone(),
                        index: i as u32,
                        hash: h,
                    },
                );
            }
        })?;
        self.inner.maybe_wake_checkpoint(wal_len);
        Ok(())
    }

    /// Makes whole blocks read as zeroes without storing data.
    fn fill(&self, rt: &VolumeRuntime, first: u64, count: u64) -> Result<()> {
        let top = &rt.chain[0];
        let kind = if rt.chain.len() > 1 {
            FillKind::Zero
        } else {
            FillKind::Absent
        };
        let _apply = self.inner.apply.read();
        let mut at = first;
        let end = first + count;
        // One record may cover at most u32::MAX blocks.
        while at < end {
            let n = (end - at).min(u64::from(u32::MAX));
            let header = RecordHeader {
                kind: RecordKind::Fill(kind),
                nblocks: n as u32,
                segment: 0,
                layer: top.id,
                first_block: at,
                generation: rt.generation,
            };
            self.inner
                .admit(n.div_ceil(BLOCK_SIZE as u64 / SUM_LEN as u64) * BLOCK)?;
            let (seg, wal_len) = self.inner.wal.append(&header, &[], &[], |seg| {
                let mut pending = self.inner.pending.write();
                if (n as usize) < pending.len() {
                    for b in at..at + n {
                        pending.remove(&(top.id, b));
                    }
                } else {
                    pending.retain(|(l, b), _| !(*l == top.id && (at..at + n).contains(b)));
                }
                seg
            })?;
            top.fill_entries(at, n, kind)?;
            self.inner.punches.lock().push(PunchLater {
                seg,
                layer: top.id,
                first: at,
                count: n,
            });
            self.inner.maybe_wake_checkpoint(wal_len);
            at += n;
        }
        Ok(())
    }
}
