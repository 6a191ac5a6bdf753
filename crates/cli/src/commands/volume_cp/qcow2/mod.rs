//! qcow2 images as local ends of `tessera volume cp`: a reader for the images qemu-img
//! and Proxmox/oVirt make (versions 2 and 3, any cluster size, internal snapshots
//! ignored: the active image is read) and a writer of version-3 images that keeps the
//! file a valid image at every step, so an interrupted copy can be resumed into it.
//!
//! Written here rather than taken from crates.io (docs/volume-export.md says why): the
//! copy needs only the mapping of guest clusters to file offsets, which is a few
//! hundred lines, checked against qemu-img in tests/tests/volume_cp_qcow2.rs.
//!
//! What an image may not hold is refused when it is opened, before anything is
//! written anywhere: a backing file, encryption, compressed clusters, an external data
//! file, extended L2 entries, the corrupt bit, unknown incompatible features.

mod meta;
mod read;
mod resume;
mod write;

#[cfg(test)]
mod tests;

pub use read::Reader;
pub use write::Writer;

use thiserror::Error;

/// The first 4 bytes of a qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Bytes of a version 2 header; version 3 adds at least 32 more.
const V2_HEADER_LEN: usize = 72;
/// Bytes of the version 3 header this writer writes (up to `header_length`).
const V3_HEADER_LEN: u32 = 104;
/// Bits 9..56 of an L1 or L2 entry: a cluster's offset in the file.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry bit 63: the cluster's refcount is exactly 1.
const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: a compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0 (version 3): the cluster reads as zeros.
const ZERO_FLAG: u64 = 1;
/// Incompatible feature bits (version 3 header, byte 72).
const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Cluster sizes qemu accepts: 512 bytes to 2 MiB.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;

/// Why an image is refused or could not be read or written.
#[derive(Debug, Error)]
pub enum Qcow2Error {
    /// The file holds something this code does not read yet.
    #[error("{0}: not supported yet")]
    Unsupported(String),
    /// The file is not a valid qcow2 image (truncated, offsets out of the file, ...).
    #[error("not a valid qcow2 image: {0}")]
    Corrupt(String),
    /// A valid image that is not the one asked for (another size, for `--resume`).
    #[error("{0}")]
    Mismatch(String),
    /// The disk.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl Qcow2Error {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Qcow2Error {
        let what = what.into();
        move |source| Qcow2Error::Io { what, source }
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The fields of a header this code uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    version: u32,
    cluster_bits: u32,
    /// Guest (virtual) size in bytes.
    size: u64,
    l1_size: u32,
    l1_offset: u64,
}

impl Header {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        self.cluster_size() / 8 * self.cluster_size()
    }

    /// Parses and checks the first bytes of a file of `file_len` bytes.
    fn parse(b: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
        let corrupt = |m: String| Qcow2Error::Corrupt(m);
        if b.len() < V2_HEADER_LEN {
            return Err(corrupt(format!(
                "the file holds {} bytes, less than a qcow2 header ({V2_HEADER_LEN})",
                b.len()
            )));
        }
        if b[..4] != MAGIC {
            return Err(corrupt("no qcow2 magic".into()));
        }
        let version = be_u32(b, 4);
        if !(2..=3).contains(&version) {
            return Err(Qcow2Error::Unsupported(format!("qcow2 version {version}")));
        }
        if be_u64(b, 8) != 0 {
            return Err(Qcow2Error::Unsupported(
                "an image with a backing file (copy its full chain first: qemu-img convert \
                 -O qcow2 makes one standalone image)"
                    .into(),
            ));
        }
        let cluster_bits = be_u32(b, 20);
        if !CLUSTER_BITS.contains(&cluster_bits) {
            return Err(corrupt(format!("cluster_bits {cluster_bits} (9..=21)")));
        }
        if be_u32(b, 32) != 0 {
            return Err(Qcow2Error::Unsupported("an encrypted image".into()));
        }
        let h = Header {
            version,
            cluster_bits,
            size: be_u64(b, 24),
            l1_size: be_u32(b, 36),
            l1_offset: be_u64(b, 40),
        };
        if version == 3 {
            if b.len() < V3_HEADER_LEN as usize {
                return Err(corrupt("the version 3 header is cut short".into()));
            }
            let incompat = be_u64(b, 72);
            if incompat & INCOMPAT_CORRUPT != 0 {
                return Err(corrupt("qemu marked the image corrupt".into()));
            }
            if incompat & INCOMPAT_DATA_FILE != 0 {
                return Err(Qcow2Error::Unsupported("an external data file".into()));
            }
            if incompat & INCOMPAT_EXTL2 != 0 {
                return Err(Qcow2Error::Unsupported("extended L2 entries".into()));
            }
            // A dirty image's refcounts may be stale; its mapping, all this reads, is
            // not. The compression type matters only to compressed clusters, refused
            // one by one.
            let known = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION;
            if incompat & !known != 0 {
                return Err(Qcow2Error::Unsupported(format!(
                    "incompatible features {:#x}",
                    incompat & !known
                )));
            }
        }
        let need = h.size.div_ceil(h.l2_span());
        if u64::from(h.l1_size) < need {
            return Err(corrupt(format!(
                "its L1 table ({} entries) does not cover its size ({} bytes)",
                h.l1_size, h.size
            )));
        }
        let l1_end = h
            .l1_offset
            .checked_add(u64::from(h.l1_size) * 8)
            .filter(|e| *e <= file_len);
        if h.l1_offset % h.cluster_size() != 0 || (h.size > 0 && l1_end.is_none()) {
            return Err(corrupt(format!(
                "its L1 table at {} ({} entries) lies outside the file ({file_len} bytes)",
                h.l1_offset, h.l1_size
            )));
        }
        Ok(h)
    }
}

/// True when the file at `f` starts with the qcow2 magic.
pub fn is_qcow2(f: &std::fs::File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 4];
    f.read_at(&mut head, 0).ok() == Some(4) && head == MAGIC
}
