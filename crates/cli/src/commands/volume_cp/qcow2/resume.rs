//! Opening an existing image to continue a copy into it (`--resume`). The image is read
//! and checked whole before anything is written, and refused in words unless the writer
//! can keep it valid: version 3, 64 KiB clusters, 16-bit refcounts, the source's size;
//! no backing file, internal snapshot, bitmap, encryption, external data file,
//! compressed or preallocated zero cluster; every cluster in use used once and counted
//! once. Ours meet that, and so do qemu-img's default images.
//!
//! The map (L1 and L2 tables) is what the image is; the refcounts are checked against
//! it: a cluster in use whose refcount is not 1 makes the image corrupt to qemu and is
//! refused, a counted cluster nothing uses (a killed copy's leak) is freed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::fcntl::FallocateFlags;

use super::meta::{empty_table, Meta, CLUSTER_BITS, CS, L2_SPAN, PER_BLOCK, REFCOUNT_ORDER};
use super::write::Writer;
use super::{
    be_u32, be_u64, Header, Qcow2Error, COMPRESSED, INCOMPAT_DIRTY, OFFSET_MASK, V3_HEADER_LEN,
    ZERO_FLAG,
};

/// Header extensions: the end, and qemu's feature name table (names only).
const EXT_END: u32 = 0;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

fn unsupported(what: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Unsupported(format!("resuming into {}", what.into()))
}

/// The name of a header extension this code does not take.
fn extension_name(t: u32) -> String {
    let name = match t {
        0xe279_2aca => "backing file format",
        0x2385_2875 => "persistent bitmaps",
        0x0537_be77 => "full disk encryption",
        0x4441_5441 => "external data file",
        _ => "unknown",
    };
    format!("an image with a header extension of type {t:#x} ({name})")
}

/// Who uses each cluster, so a cluster used twice is found.
struct Uses {
    refs: Vec<u8>,
}

impl Uses {
    fn mark(&mut self, at: u64, what: &str) -> Result<(), Qcow2Error> {
        let c = (at / CS) as usize;
        if self.refs.len() <= c {
            self.refs.resize(c + 1, 0);
        }
        if self.refs[c] != 0 {
            return Err(Qcow2Error::Corrupt(format!(
                "the cluster at {at} is used twice (the second time by {what})"
            )));
        }
        self.refs[c] = 1;
        Ok(())
    }
}

fn read(file: &File, at: u64, len: u64, what: &str) -> Result<Vec<u8>, Qcow2Error> {
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, at)
        .map_err(Qcow2Error::io(format!("reading {what}")))?;
    Ok(b)
}

impl Writer {
    /// Opens `file`, an image of `size` guest bytes a copy wrote part or all of, to
    /// write into it again. Nothing is written unless every check passes.
    pub fn resume(file: File, size: u64) -> Result<Writer, Qcow2Error> {
        let file_len = file
            .metadata()
            .map_err(Qcow2Error::io("reading the image's size"))?
            .len();
        let head = read(&file, 0, CS.min(file_len), "the qcow2 header")?;
        let h = Header::parse(&head, file_len)?;
        check_header(&head, &h, size)?;
        let corrupt = Qcow2Error::Corrupt;
        let mut uses = Uses { refs: Vec::new() };
        uses.mark(0, "the header")?;

        // The refcount table and its blocks.
        let rt_offset = be_u64(&head, 48);
        let rt_clusters = u64::from(be_u32(&head, 56));
        let rt_end = rt_offset.checked_add(rt_clusters * CS);
        if rt_offset % CS != 0 || rt_clusters == 0 || rt_end.is_none_or(|e| e > file_len) {
            return Err(corrupt(format!(
                "its refcount table at {rt_offset} ({rt_clusters} clusters) lies outside the \
                 file ({file_len} bytes)"
            )));
        }
        for k in 0..rt_clusters {
            uses.mark(rt_offset + k * CS, "the refcount table")?;
        }
        let table = read(&file, rt_offset, rt_clusters * CS, "the refcount table")?;
        let mut rt = Vec::with_capacity(table.len() / 8);
        let mut on_disk: Vec<u16> = Vec::new();
        for (b, raw) in table.chunks_exact(8).enumerate() {
            let at = be_u64(raw, 0) & OFFSET_MASK;
            rt.push(at);
            if at == 0 {
                continue;
            }
            if at % CS != 0 || at + CS > file_len {
                return Err(corrupt(format!(
                    "refcount block {b} at {at} lies outside the file or is not cluster-aligned"
                )));
            }
            uses.mark(at, "a refcount block")?;
            let first = b * PER_BLOCK as usize;
            if on_disk.len() < first + PER_BLOCK as usize {
                on_disk.resize(first + PER_BLOCK as usize, 0);
            }
            let block = read(&file, at, CS, "a refcount block")?;
            for (i, n) in block.chunks_exact(2).enumerate() {
                on_disk[first + i] = u16::from_be_bytes([n[0], n[1]]);
            }
        }

        // The L1 table, the L2 tables and the data clusters they map.
        let needed = size.div_ceil(L2_SPAN);
        let l1_bytes = u64::from(h.l1_size) * 8;
        for k in 0..l1_bytes.div_ceil(CS) {
            uses.mark(h.l1_offset + k * CS, "the L1 table")?;
        }
        let raw_l1 = read(&file, h.l1_offset, l1_bytes, "the L1 table")?;
        let mut l1 = Vec::with_capacity(h.l1_size as usize);
        let mut l2 = std::collections::HashMap::new();
        for (i, raw) in raw_l1.chunks_exact(8).enumerate() {
            let i = i as u64;
            let at = be_u64(raw, 0) & OFFSET_MASK;
            l1.push(at);
            if at == 0 {
                continue;
            }
            if i >= needed {
                return Err(corrupt(format!(
                    "L1 entry {i}, past the image's size, is set"
                )));
            }
            if at % CS != 0 || at + CS > file_len {
                return Err(corrupt(format!(
                    "L2 table {i} at {at} lies outside the file ({file_len} bytes) or is not \
                     cluster-aligned"
                )));
            }
            uses.mark(at, &format!("L2 table {i}"))?;
            let raw_table = read(&file, at, CS, &format!("L2 table {i}"))?;
            let mut map = empty_table();
            for (j, e) in raw_table.chunks_exact(8).enumerate() {
                let e = be_u64(e, 0);
                let guest = i * L2_SPAN + j as u64 * CS;
                let host = e & OFFSET_MASK;
                if e & COMPRESSED != 0 {
                    return Err(unsupported(format!(
                        "an image with a compressed cluster (at guest offset {guest})"
                    )));
                }
                if e & ZERO_FLAG != 0 && host != 0 {
                    return Err(unsupported(format!(
                        "an image with a preallocated zero cluster (at guest offset {guest})"
                    )));
                }
                if host == 0 || e & ZERO_FLAG != 0 {
                    continue;
                }
                if guest >= size || host % CS != 0 || host >= file_len {
                    return Err(corrupt(format!(
                        "the cluster at guest offset {guest} points to {host}, outside the \
                         file ({file_len} bytes) or the image, or not cluster-aligned"
                    )));
                }
                uses.mark(host, &format!("guest offset {guest}"))?;
                map[j] = host;
            }
            l2.insert(i, map);
        }

        // Every cluster in use must be counted once, as qemu-img check wants it; a
        // counted cluster nothing uses is a leak, freed below.
        let mut leaks = Vec::new();
        let clusters = uses.refs.len().max(on_disk.len());
        for c in 0..clusters {
            let used = uses.refs.get(c).copied().unwrap_or(0);
            let counted = on_disk.get(c).copied().unwrap_or(0);
            let at = c as u64 * CS;
            if used == 1 && counted != 1 {
                return Err(corrupt(format!(
                    "the cluster at {at} is in use but its refcount is {counted} (qemu-img \
                     check -r all repairs the refcounts)"
                )));
            }
            if used == 0 && counted != 0 && at < file_len {
                leaks.push(at);
            }
        }

        // Room in the refcount table for the most this copy can add.
        let next = file_len.div_ceil(CS) * CS;
        let worst = next / CS + size.div_ceil(CS) + needed;
        if (rt.len() as u64) * PER_BLOCK < worst + worst.div_ceil(PER_BLOCK) {
            return Err(unsupported(format!(
                "an image whose refcount table ({rt_clusters} clusters) cannot count the \
                 {} bytes this copy may grow its file to",
                (worst + worst.div_ceil(PER_BLOCK)) * CS
            )));
        }

        // Checked: from here on the file is written.
        for at in leaks {
            // Only saves space: the cluster is free (refcount 0 at the finish).
            let _ = nix::fcntl::fallocate(
                file.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                at as i64,
                CS as i64,
            );
        }
        let meta = Meta {
            next,
            l1_offset: h.l1_offset,
            l1,
            l2,
            rt_offset,
            rt,
            refs: uses.refs,
        };
        Ok(Writer::from_parts(file, size, meta))
    }
}

/// What the writer needs of a header beyond what [`Header::parse`] checks.
fn check_header(head: &[u8], h: &Header, size: u64) -> Result<(), Qcow2Error> {
    if h.version != 3 {
        return Err(unsupported(format!(
            "a version {} (compat=0.10) image",
            h.version
        )));
    }
    if h.cluster_bits != CLUSTER_BITS {
        return Err(unsupported(format!(
            "an image of {}-byte clusters (only 64 KiB ones, qemu-img's default and ours)",
            h.cluster_size()
        )));
    }
    if h.size != size {
        return Err(Qcow2Error::Mismatch(format!(
            "the image's virtual size is {} bytes, the source's {size} bytes: --resume \
             continues a copy of the same source (copy again without --resume to replace \
             the image)",
            h.size
        )));
    }
    let order = be_u32(head, 96);
    if order != REFCOUNT_ORDER {
        return Err(unsupported(format!(
            "an image of {}-bit refcounts (only 16-bit ones)",
            1u32 << order.min(31)
        )));
    }
    let snapshots = be_u32(head, 60);
    if snapshots != 0 {
        return Err(unsupported(format!(
            "an image with internal snapshots ({snapshots})"
        )));
    }
    if be_u64(head, 72) & INCOMPAT_DIRTY != 0 {
        return Err(Qcow2Error::Mismatch(
            "qemu left the image dirty (lazy refcounts): qemu-img check -r all repairs it".into(),
        ));
    }
    let autoclear = be_u64(head, 88);
    if autoclear != 0 {
        return Err(unsupported(format!(
            "an image with autoclear features {autoclear:#x} (persistent bitmaps, a raw \
             external data file)"
        )));
    }
    let header_len = be_u32(head, 100) as usize;
    if header_len < V3_HEADER_LEN as usize || header_len % 8 != 0 || header_len > head.len() {
        return Err(Qcow2Error::Corrupt(format!(
            "its header length {header_len}"
        )));
    }
    let mut at = header_len;
    loop {
        if at + 8 > head.len() {
            return Err(Qcow2Error::Corrupt(
                "its header extensions run past the header's cluster".into(),
            ));
        }
        let (t, len) = (be_u32(head, at), be_u32(head, at + 4) as usize);
        match t {
            EXT_END => return Ok(()),
            EXT_FEATURE_NAMES => {}
            _ => return Err(unsupported(extension_name(t))),
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}
