//! The FUSE side of powerfs: kernel requests translated into [`Model`] operations.
//!
//! Writes go through to the model as they are made (no FUSE writeback cache), so the model
//! sees every write before the system call returns. The kernel may cache what was read
//! (readahead keeps scrub and reads fast), which is safe because every change goes through
//! the kernel and a cut unmounts: the page cache dies with the mount. Entries and
//! attributes have a zero TTL all the same.
//! `flock` is left to the kernel (no `FUSE_FLOCK_LOCKS`), which then locks locally.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use nix::libc;

use super::model::{FsError, Ino, Model, Node, PAGE};

/// Nothing is cached by the kernel: a cut must be visible to the next access.
const TTL: Duration = Duration::ZERO;
/// Page cache on, kept across opens (nothing changes a file behind the kernel's back).
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;
/// What `statvfs` reports: 4 TiB, all free (the store checks free space before writes).
const FS_PAGES: u64 = 1 << 30;

/// The filesystem the kernel talks to; shares its model with the test.
pub struct PowerFuse {
    pub(super) model: Arc<Mutex<Model>>,
    /// Reported as mtime/ctime of everything (no test depends on times).
    pub(super) epoch: SystemTime,
}

fn errno(e: FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
    }
}

impl PowerFuse {
    fn model(&self) -> MutexGuard<'_, Model> {
        // A panic in another request leaves the model usable: it is plain data.
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self, m: &Model, ino: Ino) -> Result<FileAttr, FsError> {
        let (kind, size, pages, perm) = match m.node(ino)? {
            Node::File(f) => (
                FileType::RegularFile,
                f.content().size(),
                f.content().allocated_pages(),
                0o644,
            ),
            Node::Dir(d) => (FileType::Directory, d.entries().len() as u64, 0, 0o755),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: pages * (PAGE / 512),
            atime: self.epoch,
            mtime: self.epoch,
            ctime: self.epoch,
            crtime: self.epoch,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn entry(&self, m: &Model, ino: Ino, reply: ReplyEntry) {
        match self.attr(m, ino) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        match self.model().remove(parent.0, name, dir) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        let latency = self.model().sync_latency;
        if !latency.is_zero() {
            // Outside the lock: other requests go on while this sync "reaches the disk".
            std::thread::sleep(latency);
        }
        match self.model().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl Filesystem for PowerFuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let m = self.model();
        match m.lookup(parent.0, name) {
            Ok(ino) => self.entry(&m, ino, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let m = self.model();
        match self.attr(&m, ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut m = self.model();
        if let Some(size) = size {
            match m.file_mut(ino.0) {
                Ok(f) => f.set_len(size),
                Err(e) => return reply.error(errno(e)),
            }
        }
        match self.attr(&m, ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut m = self.model();
        match m.create(parent.0, name, true) {
            Ok(ino) => self.entry(&m, ino, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .model()
            .rename(parent.0, name, newparent.0, newname, no_replace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut m = self.model();
        if let Ok(f) = m.file_mut(ino.0) {
            // Only reaches here with FUSE_ATOMIC_O_TRUNC; otherwise the kernel truncates
            // with a setattr first.
            if flags.0 & libc::O_TRUNC != 0 {
                f.set_len(0);
            }
        } else if let Err(e) = m.node(ino.0) {
            return reply.error(errno(e));
        }
        reply.opened(FileHandle(0), OPEN_FLAGS);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut m = self.model();
        let ino = match m.create(parent.0, name, false) {
            Ok(ino) => ino,
            Err(FsError::Exists) if flags & libc::O_EXCL == 0 => {
                match m.lookup(parent.0, name).and_then(|ino| {
                    let f = m.file_mut(ino)?;
                    if flags & libc::O_TRUNC != 0 {
                        f.set_len(0);
                    }
                    Ok(ino)
                }) {
                    Ok(ino) => ino,
                    Err(e) => return reply.error(errno(e)),
                }
            }
            Err(e) => return reply.error(errno(e)),
        };
        match self.attr(&m, ino) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let m = self.model();
        match m.node(ino.0) {
            Ok(Node::File(f)) => reply.data(&f.content().read(offset, u64::from(size))),
            Ok(Node::Dir(_)) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().file_mut(ino.0) {
            Ok(f) => {
                f.write(offset, data);
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2), not a sync: nothing becomes durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let m = self.model();
        let dir = match m.dir(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(errno(e)),
        };
        let mut all: Vec<(Ino, FileType, &OsStr)> = vec![
            (ino.0, FileType::Directory, OsStr::new(".")),
            (ino.0, FileType::Directory, OsStr::new("..")),
        ];
        for (name, child) in dir.entries() {
            let kind = match m.node(*child) {
                Ok(Node::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((*child, kind, name.as_os_str()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            FS_PAGES,
            FS_PAGES,
            FS_PAGES,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut m = self.model();
        let f = match m.file_mut(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match mode {
            PUNCH => f.punch(offset, length),
            // Allocation only: no byte changes; without KEEP_SIZE the size may grow.
            libc::FALLOC_FL_KEEP_SIZE => {}
            0 => {
                let end = offset.saturating_add(length);
                if end > f.content().size() {
                    f.set_len(end);
                }
            }
            _ => return reply.error(Errno::EOPNOTSUPP),
        }
        reply.ok();
    }
}
