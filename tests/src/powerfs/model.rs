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

/// What a power cut keeps of the writes that no sync covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing unsynced survives.
    DropAll,
    /// A random part survives, page by page (see the module doc).
    Tear,
}

/// File content: a size and sparse pages (an absent page reads as zeroes).
#[derive(Clone, Debug, Default)]
pub struct Content {
    size: u64,
    pages: BTreeMap<u64, Page>,
}

/// A change to a file's content, as issued.
#[derive(Clone, Debug)]
enum FileOp {
    Write { off: u64, data: Vec<u8> },
    Punch { off: u64, len: u64 },
    SetLen(u64),
}

impl FileOp {
    /// The size after this operation, from `size` before it.
    fn size_after(&self, size: u64) -> u64 {
        match self {
            FileOp::Write { off, data } => size.max(off + data.len() as u64),
            FileOp::Punch { .. } => size,
            FileOp::SetLen(n) => *n,
        }
    }

    /// The byte range whose content the operation sets, given the size before it.
    fn range(&self, size: u64) -> (u64, u64) {
        match self {
            FileOp::Write { off, data } => (*off, off + data.len() as u64),
            FileOp::Punch { off, len } => (*off, off + len),
            // Shrinking zeroes what was past the new end; growing changes no byte.
            FileOp::SetLen(n) => (*n, size.max(*n)),
        }
    }
}

impl Content {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages holding data (for `st_blocks`).
    pub fn allocated_pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Reads up to `len` bytes at `off` (less at the end of the file).
    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = self.size.min(off.saturating_add(len));
        if off >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - off) as usize];
        for (&p, page) in self.pages.range(off / PAGE..=(end - 1) / PAGE) {
            let (lo, hi) = ((p * PAGE).max(off), ((p + 1) * PAGE).min(end));
            out[(lo - off) as usize..(hi - off) as usize]
                .copy_from_slice(&page[(lo - p * PAGE) as usize..(hi - p * PAGE) as usize]);
        }
        out
    }

    /// Applies the part of `op` that falls into page `p` (bytes only, not the size).
    fn apply_page(&mut self, op: &FileOp, size_before: u64, p: u64) {
        let (lo, hi) = op.range(size_before);
        let (lo, hi) = (lo.max(p * PAGE), hi.min((p + 1) * PAGE));
        if lo >= hi {
            return;
        }
        let (a, b) = ((lo - p * PAGE) as usize, (hi - p * PAGE) as usize);
        match op {
            FileOp::Write { off, data } => {
                let page = Arc::make_mut(
                    self.pages
                        .entry(p)
                        .or_insert_with(|| Arc::new([0; PAGE as usize])),
                );
                page[a..b].copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
            }
            FileOp::Punch { .. } | FileOp::SetLen(_) => {
                if a == 0 && b == PAGE as usize {
                    self.pages.remove(&p);
                } else if let Some(page) = self.pages.get_mut(&p) {
                    Arc::make_mut(page)[a..b].fill(0);
                }
            }
        }
    }

    /// Applies `op` whole.
    fn apply(&mut self, op: &FileOp) {
        let size = self.size;
        let (lo, hi) = op.range(size);
        if lo < hi {
            for p in lo / PAGE..=(hi - 1) / PAGE {
                self.apply_page(op, size, p);
            }
        }
        self.size = op.size_after(size);
    }

    /// Sets the size and drops whatever lies past it.
    fn clip(&mut self, size: u64) {
        self.size = size;
        self.pages.retain(|&p, _| p * PAGE < size);
        if !size.is_multiple_of(PAGE) {
            if let Some(page) = self.pages.get_mut(&(size / PAGE)) {
                Arc::make_mut(page)[(size % PAGE) as usize..].fill(0);
            }
        }
    }
}

/// A regular file: current content, durable content, operations since the last sync.
#[derive(Clone, Debug, Default)]
pub struct File {
    cur: Content,
    durable: Content,
    unsynced: Vec<FileOp>,
}

impl File {
    /// What reads see.
    pub fn content(&self) -> &Content {
        &self.cur
    }

    /// Writes `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        self.push(FileOp::Write {
            off,
            data: data.to_vec(),
        });
    }

    /// Zeroes `len` bytes at `off`, keeping the size (`FALLOC_FL_PUNCH_HOLE`).
    pub fn punch(&mut self, off: u64, len: u64) {
        let len = len.min(self.cur.size.saturating_sub(off));
        if len > 0 {
            self.push(FileOp::Punch { off, len });
        }
    }

    /// Truncates or extends (`ftruncate`).
    pub fn set_len(&mut self, size: u64) {
        self.push(FileOp::SetLen(size));
    }

    fn push(&mut self, op: FileOp) {
        self.cur.apply(&op);
        self.unsynced.push(op);
    }

    /// `fsync`/`fdatasync`: everything so far becomes durable.
    pub fn sync(&mut self) {
        self.durable = self.cur.clone();
        self.unsynced.clear();
    }

    /// Bytes written and not yet synced.
    pub fn unsynced_ops(&self) -> usize {
        self.unsynced.len()
    }

    /// Loses power: keeps what `mode` says of the unsynced operations. Returns how many
    /// page updates were kept and how many dropped.
    fn cut(&mut self, mode: CutMode, rng: &mut impl Rng) -> (usize, usize) {
        let ops = std::mem::take(&mut self.unsynced);
        let mut next = self.durable.clone();
        let mut touched = 0usize;
        if mode == CutMode::Tear && !ops.is_empty() {
            // Which pages each operation touches, in order, with the size it saw.
            let mut size = self.durable.size;
            let mut per_page: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
            for (i, op) in ops.iter().enumerate() {
                let (lo, hi) = op.range(size);
                if lo < hi {
                    for p in lo / PAGE..=(hi - 1) / PAGE {
                        per_page.entry(p).or_default().push((i, size));
                    }
                }
                size = op.size_after(size);
            }
            // Each page was written back after a random number of its updates (maybe
            // none, maybe all); the inode's size after a random number of operations.
            let mut kept = 0;
            for (p, updates) in &per_page {
                touched += updates.len();
                let n = rng.gen_range(0..=updates.len());
                for &(i, size_before) in &updates[..n] {
                    next.apply_page(&ops[i], size_before, *p);
                }
                kept += n;
            }
            let cut_at = rng.gen_range(0..=ops.len());
            let size = ops[..cut_at]
                .iter()
                .fold(self.durable.size, |s, op| op.size_after(s));
            next.clip(size);
            self.durable = next;
            self.cur = self.durable.clone();
            return (kept, touched - kept);
        }
        for op in &ops {
            let (lo, hi) = op.range(0);
            touched += (hi.saturating_sub(lo)).div_ceil(PAGE) as usize;
        }
        self.cur = self.durable.clone();
        (0, touched)
    }
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
