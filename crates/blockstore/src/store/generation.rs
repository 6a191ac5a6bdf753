//! The replication fence of a volume: the highest generation this store has seen for it,
//! persisted in the catalog before anyone is told it was accepted, never lowered, and
//! stamped on every write record. An export can be bound to the generation its writer
//! holds, so that once a higher one is accepted, the old writer's writes are refused.

use std::sync::atomic::Ordering;

use super::export::Export;
use super::Store;
use crate::error::{Result, StoreError};

impl Store {
    /// The highest generation accepted for volume `name`.
    pub fn generation(&self, name: &str) -> Result<u64> {
        let state = self.runtime(name)?;
        let rt = state.rt.read();
        if rt.deleted {
            return Err(StoreError::Gone(name.to_string()));
        }
        Ok(rt.generation)
    }

    /// Raises volume `name`'s generation to `generation`, durably (the catalog is synced
    /// before this returns), and returns the volume's generation afterwards. A generation
    /// not above the current one changes nothing: the fence never moves back.
    ///
    /// Writes in progress finish under the old generation first (they hold the volume's
    /// runtime for reading); every write that starts afterwards is stamped with the new
    /// one, and exports bound to an older generation are refused from then on.
    pub fn raise_generation(&self, name: &str, generation: u64) -> Result<u64> {
        let mut cat = self.inner.catalog.lock();
        let state = self.runtime(name)?;
        let mut rt = state.rt.write();
        if rt.deleted {
            return Err(StoreError::Gone(name.to_string()));
        }
        if generation <= rt.generation {
            return Ok(rt.generation);
        }
        let mut next = cat.clone();
        match next.volumes.get_mut(name) {
            Some(v) => v.generation = generation,
            None => return Err(StoreError::NotFound(format!("volume {name}"))),
        }
        next.save(&self.cat_path())?;
        *cat = next;
        rt.generation = generation;
        tracing::info!(volume = name, generation, "volume generation raised");
        Ok(generation)
    }
}

impl Export {
    /// The generation of the volume this export writes (0 for a snapshot).
    pub fn generation(&self) -> u64 {
        self.volume_generation().unwrap_or(0)
    }

    /// Binds this export to `generation`: from now on its writes, zeroes and trims fail
    /// with [`StoreError::StaleGeneration`] once the volume's generation is above it.
    /// `0` unbinds it.
    pub fn bind_generation(&self, generation: u64) {
        self.fence.store(generation, Ordering::Release);
    }
}
