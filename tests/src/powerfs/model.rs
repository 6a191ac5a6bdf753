//! The filesystem powerfs serves, in memory and free of I/O: what every file and directory
//! holds now, what of it is durable, and what a power cut leaves of it.
//!
//! A file keeps its durable content and the operations (writes, hole punches, size
//! changes) issued since its last `fsync`/`fdatasync`; a directory keeps its durable
//! entries and the entry changes (create, unlink, rename) since its last `fsync`. That is
//! the POSIX rule taken strictly: syncing a file does not make its name durable, only
//! syncing the directory does. A cut either drops every unsynced operation or "tears":
//! each 4 KiB page keeps a random prefix of the unsynced writes that touched it (the
//! kernel wrote that page back at some moment, pages in any order), the size keeps a
//! random prefix of the size changes, and each directory a random prefix of its entry
//! changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use rand::Rng;

/// Granularity of what a tear keeps or drops (a page of the kernel's page cache).
pub const PAGE: u64 = 4096;
/// Inode number of the root directory (FUSE's fixed root id).
pub const ROOT: Ino = 1;

/// An inode number.
pub type Ino = u64;
type Page = Arc<[u8; PAGE as usize]>;

mod file;

pub use file::{Content, File};

/// What a power cut keeps of the writes that no sync covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing unsynced survives.
    DropAll,
    /// A random part survives, page by page (see the module doc).
    Tear,
}

/// A change to a directory's entries, as issued.
#[derive(Clone, Debug)]
enum DirOp {
    Set(OsString, Ino),
    Remove(OsString),
    Rename(OsString, OsString, Ino),
}

impl DirOp {
    fn apply(&self, entries: &mut BTreeMap<OsString, Ino>) {
        match self {
            DirOp::Set(name, ino) => {
                entries.insert(name.clone(), *ino);
            }
            DirOp::Remove(name) => {
                entries.remove(name);
            }
            DirOp::Rename(from, to, ino) => {
                entries.remove(from);
                entries.insert(to.clone(), *ino);
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            DirOp::Set(n, _) => format!("create {}", n.to_string_lossy()),
            DirOp::Remove(n) => format!("unlink {}", n.to_string_lossy()),
            DirOp::Rename(a, b, _) => {
                format!("rename {} -> {}", a.to_string_lossy(), b.to_string_lossy())
            }
        }
    }
}

/// A directory: current entries, durable entries, changes since the last sync.
#[derive(Clone, Debug, Default)]
pub struct Dir {
    cur: BTreeMap<OsString, Ino>,
    durable: BTreeMap<OsString, Ino>,
    unsynced: Vec<DirOp>,
}

impl Dir {
    /// The entries a lookup or `readdir` sees.
    pub fn entries(&self) -> &BTreeMap<OsString, Ino> {
        &self.cur
    }

    fn push(&mut self, op: DirOp) {
        op.apply(&mut self.cur);
        self.unsynced.push(op);
    }

    /// `fsync` of the directory: its entries as they are become durable.
    pub fn sync(&mut self) {
        self.durable = self.cur.clone();
        self.unsynced.clear();
    }

    /// Loses power; returns the changes that were dropped, described.
    fn cut(&mut self, mode: CutMode, rng: &mut impl Rng) -> Vec<String> {
        let ops = std::mem::take(&mut self.unsynced);
        let keep = match mode {
            CutMode::DropAll => 0,
            CutMode::Tear => rng.gen_range(0..=ops.len()),
        };
        for op in &ops[..keep] {
            op.apply(&mut self.durable);
        }
        self.cur = self.durable.clone();
        ops[keep..].iter().map(DirOp::describe).collect()
    }
}

/// What an inode is.
#[derive(Clone, Debug)]
pub enum Node {
    /// A regular file.
    File(File),
    /// A directory.
    Dir(Dir),
}

/// Why an operation on the model failed (each maps to an errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsError {
    /// No such entry or inode.
    NotFound,
    /// The name exists.
    Exists,
    /// A directory was expected.
    NotDir,
    /// A file was expected.
    IsDir,
    /// The directory is not empty.
    NotEmpty,
}

/// How many syncs the filesystem honoured or ignored since it was created.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncCounts {
    /// `fsync`/`fdatasync` of files that made data durable.
    pub files: u64,
    /// `fsync` of directories that made entries durable.
    pub dirs: u64,
    /// Syncs answered with success while nothing was made durable ("lying sync").
    pub lied: u64,
}

/// What a cut threw away (for the report when a check fails).
#[derive(Clone, Debug, Default)]
pub struct CutReport {
    /// Page updates kept by a tear, and page updates dropped.
    pub pages_kept: usize,
    /// Page updates dropped.
    pub pages_dropped: usize,
    /// Per path: a file's unsynced operation count or a directory's dropped changes.
    pub lost: Vec<String>,
    /// Inodes no durable directory entry reaches any more (freed).
    pub orphans: usize,
}

/// The whole filesystem.
#[derive(Debug)]
pub struct Model {
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    /// When set, syncs succeed without making anything durable.
    pub lying_sync: bool,
    /// How long a sync takes before it makes anything durable (a disk's flush latency:
    /// it widens every window in which a caller could rely on a sync still under way).
    pub sync_latency: std::time::Duration,
    /// Sync statistics.
    pub syncs: SyncCounts,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            nodes: HashMap::from([(ROOT, Node::Dir(Dir::default()))]),
            next_ino: ROOT + 1,
            lying_sync: false,
            sync_latency: std::time::Duration::ZERO,
            syncs: SyncCounts::default(),
        }
    }
}

impl Model {
    /// The inode `ino`.
    pub fn node(&self, ino: Ino) -> Result<&Node, FsError> {
        self.nodes.get(&ino).ok_or(FsError::NotFound)
    }

    /// The file `ino`, for changing it.
    pub fn file_mut(&mut self, ino: Ino) -> Result<&mut File, FsError> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => Ok(f),
            Some(Node::Dir(_)) => Err(FsError::IsDir),
            None => Err(FsError::NotFound),
        }
    }

    /// The directory `ino`.
    pub fn dir(&self, ino: Ino) -> Result<&Dir, FsError> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Result<&mut Dir, FsError> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Ino, FsError> {
        self.dir(parent)?
            .cur
            .get(name)
            .copied()
            .ok_or(FsError::NotFound)
    }

    /// Creates a file or directory `name` in `parent`.
    pub fn create(&mut self, parent: Ino, name: &OsStr, dir: bool) -> Result<Ino, FsError> {
        if self.dir(parent)?.cur.contains_key(name) {
            return Err(FsError::Exists);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = if dir {
            Node::Dir(Dir::default())
        } else {
            Node::File(File::default())
        };
        self.nodes.insert(ino, node);
        self.dir_mut(parent)?.push(DirOp::Set(name.to_owned(), ino));
        Ok(ino)
    }

    /// Removes `name` from `parent`: a file (`unlink`) or an empty directory (`rmdir`).
    pub fn remove(&mut self, parent: Ino, name: &OsStr, dir: bool) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?;
        match (self.node(ino)?, dir) {
            (Node::Dir(d), true) if !d.cur.is_empty() => return Err(FsError::NotEmpty),
            (Node::Dir(_), false) => return Err(FsError::IsDir),
            (Node::File(_), true) => return Err(FsError::NotDir),
            _ => {}
        }
        self.dir_mut(parent)?.push(DirOp::Remove(name.to_owned()));
        Ok(())
    }

    /// Renames, replacing a target file or empty directory (unless `no_replace`).
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?;
        match self.lookup(new_parent, new_name) {
            Ok(_) if no_replace => return Err(FsError::Exists),
            Ok(target) => match (self.node(target)?, self.node(ino)?) {
                (Node::Dir(d), Node::Dir(_)) if !d.cur.is_empty() => return Err(FsError::NotEmpty),
                (Node::Dir(_), Node::File(_)) => return Err(FsError::IsDir),
                (Node::File(_), Node::Dir(_)) => return Err(FsError::NotDir),
                _ => {}
            },
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        if parent == new_parent {
            let op = DirOp::Rename(name.to_owned(), new_name.to_owned(), ino);
            self.dir_mut(parent)?.push(op);
        } else {
            // Each directory's change becomes durable with that directory's own sync.
            self.dir_mut(new_parent)?
                .push(DirOp::Set(new_name.to_owned(), ino));
            self.dir_mut(parent)?.push(DirOp::Remove(name.to_owned()));
        }
        Ok(())
    }

    /// `fsync` of any inode; `fdatasync` is the same here (the size is data).
    pub fn sync(&mut self, ino: Ino) -> Result<(), FsError> {
        if self.lying_sync {
            self.node(ino)?;
            self.syncs.lied += 1;
            return Ok(());
        }
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => {
                f.sync();
                self.syncs.files += 1;
            }
            Some(Node::Dir(d)) => {
                d.sync();
                self.syncs.dirs += 1;
            }
            None => return Err(FsError::NotFound),
        }
        Ok(())
    }

    /// Loses power. Afterwards every inode holds what survived, and inodes that no
    /// durable entry reaches from the root are gone.
    pub fn cut(&mut self, mode: CutMode, rng: &mut impl Rng) -> CutReport {
        let paths = self.paths();
        let path = |ino: &Ino| {
            paths
                .get(ino)
                .cloned()
                .unwrap_or_else(|| format!("(unlinked inode {ino})"))
        };
        let mut report = CutReport::default();
        let mut inos: Vec<Ino> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(node) = self.nodes.get_mut(&ino) else {
                continue;
            };
            match node {
                Node::File(f) => {
                    let ops = f.unsynced_ops();
                    let (kept, dropped) = f.cut(mode, rng);
                    report.pages_kept += kept;
                    report.pages_dropped += dropped;
                    if ops > 0 {
                        report.lost.push(format!(
                            "{}: {ops} unsynced operation(s), {dropped} page update(s) dropped, {kept} kept",
                            path(&ino)
                        ));
                    }
                }
                Node::Dir(d) => {
                    for change in d.cut(mode, rng) {
                        report
                            .lost
                            .push(format!("{}/: {change} (dropped)", path(&ino)));
                    }
                }
            }
        }
        let reachable = self.reachable();
        let before = self.nodes.len();
        self.nodes.retain(|ino, _| reachable.contains(ino));
        report.orphans = before - self.nodes.len();
        report
    }

    /// Inodes reachable from the root through current entries.
    fn reachable(&self) -> HashSet<Ino> {
        let mut seen = HashSet::from([ROOT]);
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if let Some(Node::Dir(d)) = self.nodes.get(&ino) {
                for child in d.cur.values() {
                    if seen.insert(*child) {
                        todo.push(*child);
                    }
                }
            }
        }
        seen
    }

    /// A path for every inode reachable now or durably (for reports).
    fn paths(&self) -> HashMap<Ino, String> {
        let mut out = HashMap::from([(ROOT, String::new())]);
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if let Some(Node::Dir(d)) = self.nodes.get(&ino) {
                let base = out[&ino].clone();
                for (name, child) in d.cur.iter().chain(&d.durable) {
                    if !out.contains_key(child) {
                        out.insert(*child, format!("{base}/{}", name.to_string_lossy()));
                        todo.push(*child);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
