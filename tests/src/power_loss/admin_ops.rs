//! Catalog changes during a cycle: scratch volumes created and deleted, snapshots of the
//! volume taken and deleted, through the admin CLI while writes go on. An acknowledged
//! change must survive the cut; one the cut interrupted may or may not have happened.
//! This is what exercises `catalog.json`'s atomic replacement and the creation and removal
//! of layer files.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;

use super::store::RunningStore;

/// What must be true of a name after the cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Present,
    Absent,
    Either,
}

/// One admin operation.
#[derive(Clone, Debug)]
pub enum AdminOp {
    /// Creates a 1 MiB scratch volume.
    CreateVolume(String),
    /// Deletes a scratch volume.
    DeleteVolume(String),
    /// Takes a snapshot of `volume`: (volume, snapshot).
    Snapshot(String, String),
    /// Deletes a snapshot: (volume, snapshot).
    DeleteSnapshot(String, String),
}

impl AdminOp {
    /// Arguments of `tessera-store` for it.
    pub fn args(&self) -> Vec<String> {
        let v: Vec<&str> = match self {
            AdminOp::CreateVolume(n) => vec!["volume", "create", n, "--size", "1M"],
            AdminOp::DeleteVolume(n) => vec!["volume", "rm", n],
            AdminOp::Snapshot(v, s) => vec!["snapshot", "create", v, s],
            AdminOp::DeleteSnapshot(v, s) => vec!["snapshot", "rm", v, s],
        };
        v.into_iter().map(String::from).collect()
    }

    /// The export name it creates or removes, and whether it creates it.
    fn target(&self) -> (String, bool) {
        match self {
            AdminOp::CreateVolume(n) => (n.clone(), true),
            AdminOp::DeleteVolume(n) => (n.clone(), false),
            AdminOp::Snapshot(v, s) => (format!("{v}@{s}"), true),
            AdminOp::DeleteSnapshot(v, s) => (format!("{v}@{s}"), false),
        }
    }
}

/// The exports (volumes and `volume@snapshot`) the store must, must not, or may have.
#[derive(Debug)]
pub struct CatalogModel {
    volume: String,
    names: BTreeMap<String, Expect>,
    /// Snapshots of the main volume taken so far: each leaves a layer in its read path
    /// for good (and scrub reads them all), so there are few.
    volume_snapshots: usize,
}

/// Snapshots of the main volume in a whole run; other snapshots are of scratch volumes.
const VOLUME_SNAPSHOTS: usize = 4;

impl CatalogModel {
    /// A store holding only `volume`.
    pub fn new(volume: &str) -> CatalogModel {
        CatalogModel {
            volume: volume.to_string(),
            names: BTreeMap::from([(volume.to_string(), Expect::Present)]),
            volume_snapshots: 0,
        }
    }

    /// A random operation that makes sense now (named after cycle `k`), keeping at most
    /// three scratch volumes and three live snapshots.
    pub fn pick(&mut self, rng: &mut impl Rng, k: u64) -> AdminOp {
        let present = |snap: bool| -> Vec<&String> {
            self.names
                .iter()
                .filter(|(n, e)| {
                    **e == Expect::Present && n.contains('@') == snap && **n != self.volume
                })
                .map(|(n, _)| n)
                .collect()
        };
        let (vols, snaps) = (present(false), present(true));
        let mut ops = Vec::new();
        if vols.len() < 3 {
            ops.push(AdminOp::CreateVolume(format!("x{k}")));
        }
        if let Some(n) = vols.first() {
            ops.push(AdminOp::DeleteVolume(n.to_string()));
        }
        if snaps.len() < 3 {
            let of = match vols.first() {
                Some(v) if self.volume_snapshots >= VOLUME_SNAPSHOTS || rng.gen_bool(0.8) => {
                    v.to_string()
                }
                _ => self.volume.clone(),
            };
            ops.push(AdminOp::Snapshot(of, format!("s{k}")));
        }
        if let Some((v, s)) = snaps.first().and_then(|n| n.split_once('@')) {
            ops.push(AdminOp::DeleteSnapshot(v.to_string(), s.to_string()));
        }
        let op = ops.swap_remove(rng.gen_range(0..ops.len()));
        if matches!(&op, AdminOp::Snapshot(v, _) if *v == self.volume) {
            self.volume_snapshots += 1;
        }
        op
    }

    /// Records the outcome: acknowledged (it must have happened) or not answered.
    pub fn record(&mut self, op: &AdminOp, acked: bool) {
        let (name, creates) = op.target();
        let e = match (acked, creates) {
            (false, _) => Expect::Either,
            (true, true) => Expect::Present,
            (true, false) => Expect::Absent,
        };
        if let AdminOp::DeleteVolume(v) = op {
            // Its snapshots go with it.
            let prefix = format!("{v}@");
            for (n, x) in self.names.iter_mut() {
                if n.starts_with(&prefix) {
                    *x = e;
                }
            }
        }
        self.names.insert(name, e);
    }

    /// Compares with what the store lists, then takes that as the new truth.
    pub fn check(&mut self, store: &RunningStore) -> Result<(), String> {
        let seen = exports(store)?;
        let mut wrong = Vec::new();
        for (name, e) in &self.names {
            match (e, seen.contains(name)) {
                (Expect::Present, false) => wrong.push(format!("{name} is missing")),
                (Expect::Absent, true) => wrong.push(format!("{name} came back")),
                _ => {}
            }
        }
        for name in &seen {
            if !self.names.contains_key(name) {
                wrong.push(format!("{name} appeared, though no one created it"));
            }
        }
        if !wrong.is_empty() {
            return Err(format!(
                "the catalog lost acknowledged changes: {}; expected {:?}",
                wrong.join(", "),
                self.names
            ));
        }
        self.names = seen.into_iter().map(|n| (n, Expect::Present)).collect();
        Ok(())
    }
}

/// Every export the store lists: volumes and `volume@snapshot`.
fn exports(store: &RunningStore) -> Result<BTreeSet<String>, String> {
    let out = store.admin(&["--output", "json", "volume", "ls"])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("volume ls: {e}: {out}"))?;
    let mut names = BTreeSet::new();
    for vol in v.as_array().ok_or("volume ls: not a list")? {
        names.insert(vol["name"].as_str().unwrap_or_default().to_string());
        for s in vol["snapshots"].as_array().into_iter().flatten() {
            names.insert(s["export"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(names)
}
