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
//! - `pending`: the pending-write map;
//! - `read` and `write`: the read path and the write path (writes and fills);
//! - `checkpoint`: copying the WAL into the layer files, in the background;
//! - `recovery`: replaying the WAL at open;
//! - `space`: refusing writes the filesystem could not checkpoint;
//! - `scrub`: verifying every stored block.

mod admin;
mod checkpoint;
mod export;
mod pending;
#[cfg(test)]
mod race_tests;
mod read;
mod recovery;
mod scrub;
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_segment_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(10),
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
        let next_seg = recovery::recover(&wal_dir, &layers)?;
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
        self.inner.wal.sync()
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
