//! Disk backends for VM block devices: a raw file or an NBD export.
//!
//! A virtio-blk device reads and writes through [`Disk`] and never knows what is behind
//! it. Backends do blocking I/O; the device calls them from its own I/O thread, never
//! from a vCPU.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{fallocate, FallocateFlags};
use tessera_nbd::{Client, ClientError};

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The backing file or connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The NBD server refused or the connection broke.
    #[error("{0}")]
    Nbd(#[from] ClientError),
    /// A request beyond the end of the disk.
    #[error("request at {offset}+{len} is beyond the disk's {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The disk specification could not be understood.
    #[error("bad disk {0:?}: {1}")]
    BadSpec(String, String),
    /// The backend cannot do this.
    #[error("{0} is not supported by this disk")]
    Unsupported(&'static str),
}

/// A block device's storage.
pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), DiskError>;
    /// Discards a range (reads as zeroes afterwards, space may be freed).
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Zeroes a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// A short identifier for the guest (virtio-blk GET_ID), at most 20 bytes.
    fn id(&self) -> String;
}

fn check(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// A raw image file.
pub struct RawFile {
    file: File,
    size: u64,
    path: PathBuf,
}

impl RawFile {
    /// Opens an existing raw image read-write.
    pub fn open(path: &Path) -> Result<RawFile, DiskError> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RawFile {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    fn punch(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<bool, DiskError> {
        let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        };
        match fallocate(self.file.as_raw_fd(), mode, o, l) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(DiskError::Io(e.into())),
        }
    }
}

impl Disk for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check(offset, buf.len() as u64, self.size)?;
        Ok(self.file.read_exact_at(buf, offset)?)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check(offset, data.len() as u64, self.size)?;
        Ok(self.file.write_all_at(data, offset)?)
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(self.file.sync_data()?)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size)?;
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if !self.punch(mode, offset, len)? {
            self.write_zeroes(offset, len)?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size)?;
        let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if self.punch(mode, offset, len)? {
            return Ok(());
        }
        let zeroes = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
    fn id(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.chars().take(20).collect()
    }
}

/// An NBD export (for example a Tessera volume served by the local `tessera-store`).
pub struct NbdDisk {
    client: Mutex<Client>,
    size: u64,
    export: String,
}

impl NbdDisk {
    /// Connects to `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`.
    pub fn connect(uri: &str) -> Result<NbdDisk, DiskError> {
        let bad = |why: &str| DiskError::BadSpec(uri.to_string(), why.to_string());
        let (client, export) = if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket="))?;
            let socket = query
                .strip_prefix("socket=")
                .ok_or_else(|| bad("missing socket="))?;
            (
                Client::connect_unix(Path::new(socket), export)?,
                export.to_string(),
            )
        } else if let Some(rest) = uri.strip_prefix("nbd://") {
            let (addr, export) = rest.split_once('/').ok_or_else(|| bad("missing /EXPORT"))?;
            (Client::connect_tcp(addr, export)?, export.to_string())
        } else {
            return Err(bad(
                "expected nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            ));
        };
        Ok(NbdDisk {
            size: client.size(),
            client: Mutex::new(client),
            export,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, DiskError> {
        let mut c = self.client.lock().map_err(|_| {
            DiskError::Io(std::io::Error::other(
                "NBD client poisoned by an earlier panic",
            ))
        })?;
        Ok(f(&mut c)?)
    }
}

/// Largest single NBD request we send (the server's advertised maximum is larger).
const NBD_CHUNK: u64 = 16 << 20;

impl Disk for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check(offset, buf.len() as u64, self.size)?;
        self.with(|c| {
            for (i, chunk) in buf.chunks_mut(NBD_CHUNK as usize).enumerate() {
                c.read(offset + i as u64 * NBD_CHUNK, chunk)?;
            }
            Ok(())
        })
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check(offset, data.len() as u64, self.size)?;
        self.with(|c| {
            for (i, chunk) in data.chunks(NBD_CHUNK as usize).enumerate() {
                c.write(offset + i as u64 * NBD_CHUNK, chunk, false)?;
            }
            Ok(())
        })
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.with(|c| c.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size)?;
        self.with(|c| chunked(offset, len, |o, l| c.trim(o, l)))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size)?;
        self.with(|c| chunked(offset, len, |o, l| c.write_zeroes(o, l, false)))
    }
    fn id(&self) -> String {
        self.export.chars().take(20).collect()
    }
}

fn chunked(
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, u32) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(1 << 30);
        f(at, n as u32)?;
        at += n;
    }
    Ok(())
}

/// Opens a disk from a path or an NBD URI.
pub fn open(spec: &str) -> Result<Box<dyn Disk>, DiskError> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        Ok(Box::new(NbdDisk::connect(spec)?))
    } else {
        Ok(Box::new(RawFile::open(Path::new(spec))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_file_reads_writes_discards_and_refuses_out_of_range() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let d = RawFile::open(f.path()).unwrap();
        d.write_at(4096, &[7; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        d.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [7; 4096]);
        d.discard(4096, 4096).unwrap();
        d.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0; 4096]);
        d.write_at(0, &[1; 512]).unwrap();
        d.write_zeroes(0, 512).unwrap();
        d.read_at(0, &mut buf[..512]).unwrap();
        assert_eq!(buf[..512], [0; 512]);
        assert!(matches!(
            d.write_at((1 << 20) - 1, &[0; 2]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read_at(u64::MAX, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        d.flush().unwrap();
    }

    #[test]
    fn bad_specs_are_explained() {
        for spec in [
            "nbd+unix:///vol",
            "nbd://host-without-export",
            "nbd+unix:///v?sock=x",
        ] {
            assert!(matches!(open(spec), Err(DiskError::BadSpec(..))), "{spec}");
        }
    }
}
