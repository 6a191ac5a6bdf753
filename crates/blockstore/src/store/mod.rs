//! The store: volumes, snapshots and clones over layers, with the write path, the read
//! path, checkpointing and crash recovery.
//!
//! Write path: a write is appended to the WAL and published in the in-memory
//! pending-write map (newest version of each block not yet in its layer file); only then
//! is it acknowledged. Reads look in the pending map first, then the layer chain. The
//! checkpoint seals the WAL segment, copies pending blocks into the layer files, syncs
//! them and deletes the segment. Layer files therefore only ever receive data whose WAL
//! record is durable, so a crash can never leave a block whose data and checksum
//! disagree: recovery replays the WAL over them, idempotently.
//!
//! This module holds the state every job shares and opens the store; each job has its
//! own module:
//! - `admin`: creating, growing and deleting volumes; snapshots and clones;
//! - `export`: the handle the NBD server and the VMM read and write through;
//! - `generation`: the replication fence (highest generation seen, persisted);
//! - `pending`: the pending-write map;
//! - `read` and `write`: the read path and the write path (writes and fills);
//! - `checkpoint`: copying the WAL into the layer files, in the background;
//! - `recovery`: replaying the WAL at open;
//! - `space`: refusing writes the filesystem could not checkpoint;
//! - `scrub`: verifying every stored block;
//! - `sized_snapshot`: the check a snapshot smaller than its volume needs;
//! - `repair`: rewriting a block that fails its checksum with another copy's bytes.

mod admin;
mod checkpoint;
mod export;
mod flush;
mod generation;
#[cfg(test)]
mod generation_tests;
mod merge;
#[cfg(test)]
mod merge_tests;
mod pending;
#[cfg(test)]
mod placed_tests;
#[cfg(test)]
mod power_cut_tests;
#[cfg(test)]
mod race_tests;
mod read;
mod recovery;
mod repair;
mod replication_role;
mod scrub;
mod sized_snapshot;
mod space;
mod write;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use parking_lot::{Condvar, Mutex, RwLock};

pub use admin::{SnapshotInfo, VolumeInfo};
pub use export::{Allocation, Export, Extent, MAX_EXTENT_QUERY};
pub use repair::BlockRepair;
pub use scrub::{BadBlock, ScrubReport};

use crate::catalog::{Catalog, LayerId, VolumeMeta};
use crate::error::{Result, StoreError};
use crate::format::BLOCK;
use crate::hooks::{Hooks, Point};
use crate::layer::LayerFiles;
use crate::wal::Wal;
use checkpoint::{Background, PunchLater};
use pending::PendingWrites;
use space::SpaceGuard;

/// Tunables of a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// The active WAL segment is sealed and checkpointed once it holds this many bytes.
    pub wal_segment_bytes: u64,
    /// A non-empty WAL is checkpointed at least this often, bounding replay time.
    pub checkpoint_interval: Duration,
    /// Start even if the WAL holds a bad record that a completed flush covered, dropping
    /// it and what follows (the operator's explicit choice; logged as an error).
    pub accept_wal_damage: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_segment_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(10),
            accept_wal_damage: false,
        }
    }
}

/// What reads and writes of a volume need, changed by admin operations under its lock.
struct VolumeRuntime {
    size: u64,
    generation: u64,
    /// The layers a read looks through, newest (the one written to) first.
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
    pending: PendingWrites,
    punches: Mutex<Vec<PunchLater>>,
    /// Held for writing by the checkpoint from choosing the blocks to copy until the
    /// punches are done (syncs included); fills and the scrub hold it for reading.
    apply: RwLock<()>,
    /// Held for writing by the checkpoint only while it changes layer files (block data
    /// and checksums, punches), never across a sync. Reads do not take it; a read whose
    /// checksum check fails reads again holding it for reading, so a race with the
    /// checkpoint is never reported as corruption. See docs/storage.md, "Concurrency".
    layer_writes: RwLock<()>,
    checkpointing: Mutex<()>,
    /// Per-block locks (by block number modulo their count) for read-modify-write.
    rmw: Vec<Mutex<()>>,
    wake: (Mutex<bool>, Condvar),
    stop: AtomicBool,
    space: Mutex<SpaceGuard>,
    /// Layers whose data files took placed writes since the last flush: a flush syncs
    /// them before the log.
    placed_dirty: Mutex<HashMap<LayerId, Arc<LayerFiles>>>,
    /// The flushes of the moment: one leads, the others wait for it (`flush.rs`).
    flushes: flush::Flushes,
    /// Set by the first failed sync, never cleared: the kernel may have dropped the dirty
    /// pages the sync was about, so no later sync can prove them durable (PostgreSQL's
    /// fsync lesson). Every later flush fails and the checkpoint stops, keeping the WAL
    /// for the replay at the next start.
    failed_sync: Mutex<Option<String>>,
    hooks: Hooks,
}

/// A block store in one data directory. Cheap to clone; all clones share the state.
#[derive(Clone)]
pub struct Store {
    // Declared first so it drops first: the final checkpoint needs `inner` alive.
    _bg: Arc<Background>,
    inner: Arc<Inner>,
}

impl Inner {
    /// Fails with the first sync failure, if there was one.
    fn check_synced(&self) -> Result<()> {
        match &*self.failed_sync.lock() {
            Some(why) => Err(StoreError::Degraded(why.clone())),
            None => Ok(()),
        }
    }

    /// Runs a sync, remembering its failure for good (see `failed_sync`).
    fn synced(&self, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        self.check_synced()?;
        if let Err(e) = sync() {
            tracing::error!(error = %e, "a sync failed: every flush fails from now until restart");
            self.failed_sync.lock().get_or_insert_with(|| e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Makes the WAL durable up to its end.
    fn sync_wal(&self) -> Result<()> {
        self.synced(|| {
            self.at(Point::WalSync)?;
            self.wal.sync()
        })
    }

    /// Runs the test hook at `point` (nothing outside unit tests).
    #[inline(always)]
    fn at(&self, point: Point) -> Result<()> {
        self.hooks
            .at(point)
            .map_err(|e| StoreError::io(format!("at {point:?}"), e))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The blocks `first..end` that bytes `offset..offset+len` touch.
fn block_range(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK, (offset + len).div_ceil(BLOCK))
}

impl Store {
    /// Opens the store in `dir`, replaying any WAL left by a crash. A new (empty or
    /// absent) directory becomes an empty store.
    ///
    /// Refuses to start, naming the file, when `catalog.json` is missing from a directory
    /// that holds store data, when it cannot be read or parsed, or when a layer it lists
    /// has lost its data file or checksum table: nothing is recreated empty.
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

        let catalog = load_catalog(&dir.join("catalog.json"), &layer_dir, &wal_dir)?;
        let mut layers = HashMap::new();
        for id in catalog.layers.keys() {
            // Never created here: a listed layer whose file is gone stops the start.
            layers.insert(*id, Arc::new(LayerFiles::open(&layer_dir, *id, false)?));
        }
        let next_seg = recovery::recover(&wal_dir, &layers, opts.accept_wal_damage)?;
        recovery::remove_stray_layers(&layer_dir, &catalog)?;

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
            pending: PendingWrites::default(),
            punches: Mutex::new(Vec::new()),
            apply: RwLock::new(()),
            layer_writes: RwLock::new(()),
            checkpointing: Mutex::new(()),
            rmw: (0..256).map(|_| Mutex::new(())).collect(),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            space: Mutex::new(SpaceGuard::default()),
            placed_dirty: Mutex::new(HashMap::new()),
            flushes: flush::Flushes::default(),
            failed_sync: Mutex::new(None),
            hooks: Hooks::default(),
        });
        let bg = Background::start(&inner)?;
        Ok(Store {
            inner,
            _bg: Arc::new(bg),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Why the store is degraded (a sync failed since it started), if it is.
    pub fn degraded(&self) -> Option<String> {
        self.inner.failed_sync.lock().clone()
    }

    /// Copies the WAL into the layer files now (normally done in the background).
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint()
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
}

/// Loads the catalog at `path`, or writes an empty one in a new data directory.
///
/// A missing catalog means a new store only when the directory holds no store data: no
/// layer file (even an empty one: a volume that was never written is still a volume) and
/// no WAL segment holding records. Anything else means the catalog was lost, and starting
/// with an empty one would serve every volume as gone, then delete its layer files as
/// strays. The lock file tells nothing: a store that never had a volume leaves one too.
/// From now on a new store writes its catalog at once, so every used directory has one.
///
/// A temporary file left by a save cut short before its rename is never read (the rename
/// is what makes a catalog); it is removed once the catalog is settled, and left in place
/// when the start is refused, for whoever repairs the directory.
fn load_catalog(path: &Path, layer_dir: &Path, wal_dir: &Path) -> Result<Catalog> {
    let catalog = match Catalog::load(path)? {
        Some(cat) => cat,
        None => {
            if let Some(found) = store_data(layer_dir, wal_dir)? {
                return Err(StoreError::BadCatalog {
                    path: path.display().to_string(),
                    reason: format!(
                        "missing, but the data directory holds store data ({}); refusing to \
                         start with an empty catalog. Restore the catalog, or move the \
                         directory's contents away to start a new store",
                        found.display()
                    ),
                });
            }
            let cat = Catalog::default();
            cat.save(path)?;
            tracing::info!(path = %path.display(), "new store: wrote an empty catalog");
            cat
        }
    };
    Catalog::discard_temp(path)?;
    Ok(catalog)
}

/// The first piece of store data found: a layer file, or a WAL segment that is not
/// empty (a store that never had a volume leaves empty segments behind).
fn store_data(layer_dir: &Path, wal_dir: &Path) -> Result<Option<PathBuf>> {
    let kinds: [(&Path, &[&str], bool); 2] = [
        (layer_dir, &[".data", ".sums"], false),
        (wal_dir, &[".wal"], true),
    ];
    for (dir, suffixes, only_if_not_empty) in kinds {
        let listing = |e| StoreError::io(format!("listing {}", dir.display()), e);
        for ent in fs::read_dir(dir).map_err(listing)? {
            let ent = ent.map_err(listing)?;
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if !suffixes.iter().any(|s| name.ends_with(s)) {
                continue;
            }
            let path = ent.path();
            let empty = || -> Result<bool> {
                let meta = ent
                    .metadata()
                    .map_err(|e| StoreError::io(format!("inspecting {}", path.display()), e))?;
                Ok(meta.is_file() && meta.len() == 0)
            };
            if !only_if_not_empty || !empty()? {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

/// The live state of volume `name` (described by `v`) over the open `layers`.
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
