//! The replication role a volume last held on this store, kept in the catalog next to its
//! generation so that a restarted store serves the volume only in that role. The block
//! store does not interpret it: `tessera-store`'s replication writes and reads it.

use super::Store;
use crate::error::{Result, StoreError};

impl Store {
    /// Sets volume `name`'s replication role (`None`: not replicated) and raises its
    /// generation to `generation` in one catalog change, synced before this returns.
    /// Returns the generation afterwards; a `generation` below the current one changes
    /// nothing and is refused as stale, like [`Store::raise_generation`] never lowers it.
    pub fn set_replication_role(
        &self,
        name: &str,
        generation: u64,
        role: Option<serde_json::Value>,
    ) -> Result<u64> {
        let mut cat = self.inner.catalog.lock();
        let state = self.runtime(name)?;
        let mut rt = state.rt.write();
        if rt.deleted {
            return Err(StoreError::Gone(name.to_string()));
        }
        if generation < rt.generation {
            return Err(StoreError::StaleGeneration {
                volume: name.to_string(),
                held: generation,
                current: rt.generation,
            });
        }
        let mut next = cat.clone();
        match next.volumes.get_mut(name) {
            Some(v) => {
                if v.generation == generation && v.replication == role {
                    return Ok(generation);
                }
                v.generation = generation;
                v.replication = role;
            }
            None => return Err(StoreError::NotFound(format!("volume {name}"))),
        }
        next.save(&self.cat_path())?;
        *cat = next;
        rt.generation = generation;
        Ok(generation)
    }

    /// Every volume with a replication role, by name, as last set.
    pub fn replication_roles(&self) -> Vec<(String, serde_json::Value)> {
        self.inner
            .catalog
            .lock()
            .volumes
            .iter()
            .filter_map(|(n, v)| v.replication.clone().map(|r| (n.clone(), r)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreOptions};

    #[test]
    fn a_role_survives_a_reopen_with_its_generation_and_never_lowers_it() {
        let d = tempfile::tempdir().unwrap();
        let role = serde_json::json!({"type": "replica"});
        {
            let s = Store::open(d.path(), StoreOptions::default()).unwrap();
            s.create_volume("v", 1 << 20).unwrap();
            s.create_volume("w", 1 << 20).unwrap();
            assert_eq!(
                s.set_replication_role("v", 3, Some(role.clone())).unwrap(),
                3
            );
            assert!(s.set_replication_role("v", 2, None).is_err());
        }
        let s = Store::open(d.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.replication_roles(), vec![("v".to_string(), role)]);
        assert_eq!(s.generation("v").unwrap(), 3);
        s.set_replication_role("v", 3, None).unwrap();
        assert!(s.replication_roles().is_empty());
        assert_eq!(s.generation("v").unwrap(), 3);
    }
}
