//! Admin operations: creating, growing and deleting volumes, taking and deleting
//! snapshots, cloning. Each builds the next catalog, persists it, and only then changes
//! the live state, so a failure leaves both as they were. Deleting a snapshot may first
//! merge its layer into its child (`merge.rs`), without the catalog's lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::merge::{self, MergePlan};
use super::{now, runtime_for, Store, VolumeState};
use crate::catalog::{self, Catalog, LayerId, SnapshotMeta, VolumeMeta};
use crate::error::{Result, StoreError};
use crate::hooks::Point;
use crate::layer::LayerFiles;

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

impl Store {
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
            replication: None,
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
        let v = volume_meta(&cat, name)?;
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
        let old = volume_meta(&cat, name)?.size;
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
        self.snapshot_of(volume, snapshot, None)
    }

    /// Takes a snapshot holding only the first `size` bytes of the volume (a positive
    /// multiple of the block size, at most its size): what a snapshot taken when the
    /// volume was `size` bytes long holds. For a replica that missed a snapshot taken
    /// before its volume grew (`tessera-store`'s catch-up). Every byte past `size` must
    /// read as zeroes (the caller trims them first), else it is refused: a clone of the
    /// snapshot grown later must read zeroes there, as it would from a snapshot taken at
    /// that size (see `sized_snapshot.rs`).
    pub fn create_snapshot_sized(
        &self,
        volume: &str,
        snapshot: &str,
        size: u64,
    ) -> Result<SnapshotInfo> {
        self.snapshot_of(volume, snapshot, Some(size))
    }

    /// [`Store::create_snapshot`], at `size` bytes when given.
    fn snapshot_of(&self, volume: &str, snapshot: &str, size: Option<u64>) -> Result<SnapshotInfo> {
        catalog::validate_name("snapshot", snapshot)?;
        let mut cat = self.inner.catalog.lock();
        let v = volume_meta(&cat, volume)?;
        if v.snapshots.contains_key(snapshot) {
            return Err(StoreError::AlreadyExists(format!(
                "snapshot {volume}@{snapshot}"
            )));
        }
        let state = self.runtime(volume)?;
        // Writes wait while the top layer changes, so the snapshot holds exactly the
        // writes acknowledged before this point.
        let mut rt = state.rt.write();
        let size = match size {
            None => rt.size,
            Some(size) => self.check_snapshot_size(&rt.chain, size, rt.size)?,
        };
        let mut next = cat.clone();
        let old_top = v.top;
        let new_top = next.new_layer(Some(old_top));
        let created = now();
        if let Some(v) = next.volumes.get_mut(volume) {
            v.snapshots.insert(
                snapshot.to_string(),
                SnapshotMeta {
                    layer: old_top,
                    size,
                    created,
                },
            );
            v.top = new_top;
        }
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

    /// Deletes a snapshot, giving its space back.
    ///
    /// When its layer is then left as the backing of exactly one layer (the next
    /// snapshot's or the volume's top: so unless a clone was made from the snapshot), the
    /// layer is merged into that child while I/O goes on (see `merge.rs`), and the
    /// snapshot is removed together with the layer in one catalog write: a failed or
    /// interrupted merge leaves the snapshot and every image as they were. A layer more
    /// layers build on stays, hidden, until they go.
    pub fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        let what = format!("{volume}@{snapshot}");
        let mut plan = {
            let mut cat = self.inner.catalog.lock();
            let layer = snapshot_layer(&cat, volume, snapshot)?;
            self.refuse_if_open(&what, false)?;
            let (next, dead) = without_snapshot(&cat, volume, snapshot);
            match merge::plan(&next, layer) {
                Some(p) => p,
                None => {
                    next.save(&self.cat_path())?;
                    *cat = next;
                    drop(cat);
                    self.drop_layers(&dead);
                    return Ok(());
                }
            }
        };
        // None: the whole layer is to copy; Some: only these blocks.
        let mut only: Option<Vec<u64>> = None;
        for _ in 0..MERGE_ATTEMPTS {
            let watch = match &only {
                None => self.merge_copy_layer(&plan, &what)?,
                Some(blocks) => self.merge_copy_blocks(&plan, blocks, &what)?,
            };
            match self.finish_snapshot_delete(volume, snapshot, Some((&plan, &watch)))? {
                Finish::Done => return Ok(()),
                Finish::Unfinished(blocks) => only = Some(blocks),
                Finish::Replan(Some(p)) => {
                    plan = p;
                    only = None;
                }
                Finish::Replan(None) => {
                    // A clone of the snapshot was made meanwhile: its layer stays for it.
                    return self
                        .finish_snapshot_delete(volume, snapshot, None)
                        .map(|_| ());
                }
            }
        }
        tracing::warn!(
            snapshot = %what,
            layer = plan.layer,
            "the snapshot's layer could not be merged (writes or the chain kept changing \
             under the merge); the snapshot is deleted and its layer stays until the \
             layers built on it go"
        );
        self.finish_snapshot_delete(volume, snapshot, None)
            .map(|_| ())
    }

    /// Removes the snapshot from the catalog: with `merge`, together with its layer, once
    /// the copy (`watch`: the blocks it left to pending writes) is complete; without,
    /// keeping the layer for the layers built on it.
    ///
    /// The volumes reading through the layer stop their I/O while this runs (their
    /// runtimes are held for writing), so no write to the child is in flight when the
    /// copy is checked, the log is flushed and the chains change.
    fn finish_snapshot_delete(
        &self,
        volume: &str,
        snapshot: &str,
        merge: Option<(&MergePlan, &[u64])>,
    ) -> Result<Finish> {
        let what = format!("{volume}@{snapshot}");
        let mut cat = self.inner.catalog.lock();
        let layer = snapshot_layer(&cat, volume, snapshot)?;
        self.refuse_if_open(&what, false)?;
        let (mut next, mut dead) = without_snapshot(&cat, volume, snapshot);
        let Some((plan, watch)) = merge else {
            next.save(&self.cat_path())?;
            *cat = next;
            drop(cat);
            self.drop_layers(&dead);
            return Ok(Finish::Done);
        };
        let now = merge::plan(&next, layer);
        if now.as_ref() != Some(plan) {
            // A merge into the layer, or of its child, or a clone of a snapshot finished
            // meanwhile: the copy may have missed blocks or gone to the wrong layer.
            return Ok(Finish::Replan(now));
        }
        let users: Vec<Arc<VolumeState>> = cat
            .volumes
            .iter()
            .filter(|(_, v)| cat.chain(v.top).is_ok_and(|c| c.contains(&plan.layer)))
            .map(|(name, _)| self.runtime(name))
            .collect::<Result<_>>()?;
        let mut held: Vec<_> = users.iter().map(|u| u.rt.write()).collect();
        let missing = self.merge_unfinished(plan, watch)?;
        if !missing.is_empty() {
            return Ok(Finish::Unfinished(missing));
        }
        // Blocks the copy left to the child's pending writes and markers of trims not yet
        // checkpointed are only in the log: made durable before the layer under them goes,
        // so a crash cannot bring back a hole where the layer's data was.
        self.inner.flush()?;
        self.inner.at(Point::MergeCommit)?;
        if let Some(child) = next.layers.get_mut(&plan.child) {
            child.backing = plan.backing;
        }
        next.layers.remove(&plan.layer);
        dead.push(plan.layer);
        next.save(&self.cat_path())?;
        *cat = next;
        for rt in &mut held {
            rt.chain.retain(|l| l.id != plan.layer);
        }
        drop(held);
        drop(cat);
        self.drop_layers(&dead);
        tracing::info!(snapshot = %what, layer = plan.layer, into = plan.child, "snapshot deleted; its layer was merged and removed");
        Ok(Finish::Done)
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
                replication: None,
            },
        );
        self.commit_with_new_layer(&mut cat, next, top)?;
        self.add_runtime(&cat, name)?;
        drop(cat);
        self.volume_info(name)
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

/// Times a snapshot delete copies and tries to commit a merge before it gives up merging.
const MERGE_ATTEMPTS: usize = 4;

/// How an attempt to finish a snapshot delete ended.
enum Finish {
    /// The snapshot is gone (with its layer, when merged).
    Done,
    /// The chain changed during the copy: merge as this says now (`None`: not at all).
    Replan(Option<MergePlan>),
    /// These blocks still lack a copy: a write the copy left them to failed.
    Unfinished(Vec<u64>),
}

/// The layer of snapshot `volume@snapshot`.
fn snapshot_layer(cat: &Catalog, volume: &str, snapshot: &str) -> Result<LayerId> {
    cat.volumes
        .get(volume)
        .and_then(|v| v.snapshots.get(snapshot))
        .map(|s| s.layer)
        .ok_or_else(|| StoreError::NotFound(format!("snapshot {volume}@{snapshot}")))
}

/// `cat` without snapshot `volume@snapshot`, garbage-collected, and the layers that
/// collection dropped.
fn without_snapshot(cat: &Catalog, volume: &str, snapshot: &str) -> (Catalog, Vec<LayerId>) {
    let mut next = cat.clone();
    if let Some(v) = next.volumes.get_mut(volume) {
        v.snapshots.remove(snapshot);
    }
    let dead = next.collect_garbage();
    (next, dead)
}

/// The catalog entry of volume `name`.
fn volume_meta<'a>(cat: &'a Catalog, name: &str) -> Result<&'a VolumeMeta> {
    cat.volumes
        .get(name)
        .ok_or_else(|| StoreError::NotFound(format!("volume {name}")))
}
