//! A replica's side of repairs (issue #8): reading a snapshot for the primary's repair of
//! that snapshot's block, and rewriting a block of its own copy that fails its checksum
//! with the primary's bytes.
//!
//! A `Repair` arrives through the replica's state machine, so in the primary's
//! generation (an older one is refused before anything is read). Its bytes are written
//! only where they hash to the checksum this copy's own table holds for the block
//! (`Export::repair_block`): bytes that are stale, from another block or simply wrong
//! change nothing and are answered `Mismatch`; a block that reads well is left alone.

use tessera_blockstore::{BlockRepair, Export, Store, StoreError, BLOCK};
use tessera_replication::wire::{Digest, RepairOutcome, ReplyError, VolumeName};

use super::reply_error;

/// The digest a replica reports for a block that fails its checksum: no block's blake3,
/// so the primary's comparison finds the block different and its catch-up rewrites it.
pub const BAD_BLOCK_DIGEST: Digest = [0; 32];

/// `len` bytes at `offset` of snapshot `snapshot` of `volume`, as a `ReadReply` carries.
pub(super) fn read_snapshot(
    store: &Store,
    volume: &str,
    snapshot: &VolumeName,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, ReplyError> {
    let export = store
        .open_export(&format!("{volume}@{snapshot}"))
        .map_err(|e| reply_error(&e))?;
    let mut buf = vec![0u8; len as usize];
    export
        .read_at(offset, &mut buf)
        .map(|()| buf)
        .map_err(|e| reply_error(&e))
}

/// Rewrites the block at `offset` of `head` (or of its snapshot `snapshot`) with `data`
/// if it fails its checksum here and `data` matches that checksum (module comment).
pub(super) fn repair(
    store: &Store,
    head: &Export,
    snapshot: Option<&VolumeName>,
    offset: u64,
    data: &[u8],
) -> Result<RepairOutcome, ReplyError> {
    let volume = head.name();
    let opened;
    let export = match snapshot {
        None => head,
        Some(s) => {
            opened = store
                .open_export(&format!("{volume}@{s}"))
                .map_err(|e| reply_error(&e))?;
            &opened
        }
    };
    let what = match snapshot {
        Some(s) => format!("{volume}@{s}"),
        None => volume.to_string(),
    };
    match export.repair_block(offset, data) {
        Ok(BlockRepair::Rewritten) => {
            tracing::warn!(volume = %what, offset, len = BLOCK,
                "a block of this replica's copy failed its checksum: repaired with the primary's bytes");
            Ok(RepairOutcome::Rewritten)
        }
        Ok(BlockRepair::NotNeeded) => Ok(RepairOutcome::NotNeeded),
        Ok(BlockRepair::Mismatch) => {
            tracing::warn!(volume = %what, offset,
                "the primary's bytes for a block do not match this copy's checksum: nothing written");
            Ok(RepairOutcome::Mismatch)
        }
        Err(e) => Err(reply_error(&e)),
    }
}

/// The digests of `blocks` blocks from `offset`, as [`super::digests`], but a block that
/// fails its checksum here gets [`BAD_BLOCK_DIGEST`] instead of failing the whole answer:
/// a catch-up then rewrites it like any block that differs.
pub(super) fn digests_marking_bad(
    export: &Export,
    offset: u64,
    blocks: u32,
) -> Result<Vec<Digest>, StoreError> {
    match super::digests(export, offset, blocks) {
        Err(StoreError::Corrupt { .. }) => {}
        other => return other,
    }
    let mut out = Vec::with_capacity(blocks as usize);
    let mut one = vec![0u8; BLOCK as usize];
    for b in 0..u64::from(blocks) {
        let at = offset + b * BLOCK;
        match export.read_at(at, &mut one) {
            Ok(()) => out.push(*blake3::hash(&one).as_bytes()),
            Err(StoreError::Corrupt { .. }) => {
                tracing::warn!(volume = export.name(), offset = at,
                    "a block of this replica's copy failed its checksum: reported as differing, so the catch-up rewrites it");
                out.push(BAD_BLOCK_DIGEST);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
