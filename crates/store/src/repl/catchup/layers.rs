//! A bad block of the replica's copy met by a catch-up's comparison is repaired in the
//! layer holding it, a snapshot's layer included (issue #8).
//!
//! The replica answers `Digests` over a block failing its checksum with an all-zero
//! digest (no block's blake3), so the block differs and the pass writes this copy's bytes
//! there, as for any block that differs. That write lands in the replica's top layer: the
//! volume's head then reads well, but when the bad block sits in a snapshot's layer
//! (the head read through to it), that snapshot, and every clone of it, keeps failing on
//! the replica. So before the write, the primary gives the replica the bytes each view
//! reading the block should hold: its own copy of each snapshot both hold, newest first,
//! then the compared source (the head, or the snapshot being carried), each as a `Repair`
//! on the catch-up's stream, in its generation. The replica writes them only where its
//! block fails its checksum and only if they hash to the checksum its own table holds
//! (`Export::repair_block`, in the layer holding the block), so a view whose bytes
//! changed since (`Mismatch`) or that reads well (`NotNeeded`) writes nothing, and the
//! next is tried. A rewritten block is logged on both stores and counted in the
//! primary's `replication_status` (`repairs`, with `on` and `snapshot`), which its
//! tesserad turns into a `volume.repaired` event.
//!
//! A clone reads through its origin's layers (`volume@snapshot` of another volume, and
//! that volume's origin in turn): a bad block there, met by the clone's comparison, is
//! read well by none of the clone's own views once the clone was written there since
//! (the head holds the newer bytes, which the origin layer's checksum does not name).
//! So after them the origin snapshots are tried, nearest first, each sent as a `Repair`
//! of the clone's head (the replica's head reads the bad block through that layer, and
//! `repair_block` finds it there): the origin layer is rewritten, for the clone, the
//! origin volume and its snapshot on that copy at once.

use std::sync::Arc;

use tessera_blockstore::{Export, BLOCK, BLOCK_SIZE};
use tessera_replication::wire::{
    Digest, Generation, Message, RepairOutcome, ReplyError, VolumeName,
};

use super::{CatchUp, PassError, Stream};

/// The digest a replica reports for a block failing its checksum there
/// (`replica::repair::BAD_BLOCK_DIGEST`): no block's blake3.
const BAD: Digest = [0; 32];

impl CatchUp {
    /// Repairs, in the layer holding it, each block of the batch at `offset` whose
    /// digest in `remote` the replica marked bad (see the module doc).
    pub(super) async fn repair_bad_blocks(
        &self,
        s: &mut Stream,
        source: &Arc<Export>,
        offset: u64,
        remote: &[Digest],
    ) -> Result<(), PassError> {
        for (i, d) in remote.iter().enumerate() {
            if *d == BAD {
                self.repair_block(s, source, offset + i as u64 * BLOCK)
                    .await?;
            }
        }
        Ok(())
    }

    async fn repair_block(
        &self,
        s: &mut Stream,
        source: &Arc<Export>,
        offset: u64,
    ) -> Result<(), PassError> {
        // The views that may read the bad block, newest first: a snapshot's bytes fit the
        // layer it froze or one below, the source's the layer the replica's head reads,
        // an origin's a layer under the clone's own (module doc).
        let mut views: Vec<(Option<&str>, Arc<Export>)> = Vec::new();
        let held = s.held.clone();
        for name in held.iter().rev() {
            match self.store.open_export(&format!("{}@{name}", self.volume)) {
                Ok(e) if offset < e.size() => views.push((Some(name.as_str()), Arc::new(e))),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume = %self.volume, snapshot = %name, error = %e,
                        "opening a snapshot to repair a replica's block with it")
                }
            }
        }
        views.push((None, source.clone()));
        views.extend(self.origins(offset).into_iter().map(|o| (None, o)));
        for (snapshot, view) in views {
            let Some(data) = read_block(&view, offset).await else {
                continue;
            };
            let target = snapshot
                .map(VolumeName::new)
                .transpose()
                .map_err(|e| PassError::Retry(format!("snapshot name: {e}")))?;
            s.repairs += 1;
            let request = s.repairs;
            s.send(&Message::Repair {
                volume: self.volume.clone(),
                generation: Generation(self.generation),
                request,
                snapshot: target,
                offset,
                data,
            })
            .await?;
            let outcome = match s.recv().await? {
                Message::RepairReply { request: r, result } if r == request => result,
                other => {
                    return Err(PassError::Retry(format!(
                        "unexpected answer to a repair: {other:?}"
                    )))
                }
            };
            match outcome {
                Ok(RepairOutcome::Rewritten) => {
                    tracing::warn!(volume = %self.volume, node = %self.peer.node, offset,
                        len = BLOCK, snapshot = snapshot.unwrap_or("-"), from = view.name(),
                        "catch-up met a block of the replica's copy failing its checksum: repaired in its layer with this copy's bytes");
                    self.shared.repairs.note(
                        offset,
                        1,
                        "primary",
                        Some(self.peer.node.as_str()),
                        snapshot,
                    );
                    return Ok(());
                }
                Ok(RepairOutcome::NotNeeded | RepairOutcome::Mismatch) => {}
                Err(e @ ReplyError::StaleGeneration { .. }) => return Err(super::refused(e)),
                Err(e) => {
                    tracing::warn!(volume = %self.volume, node = %self.peer.node, offset,
                        snapshot = snapshot.unwrap_or("-"), error = %e,
                        "the replica refused a repair of its block");
                }
            }
        }
        tracing::warn!(volume = %self.volume, node = %self.peer.node, offset,
            "a block of the replica's copy failing its checksum matched none of this copy's views \
             (its volume's, its snapshots', its origins'): the catch-up's write repairs the volume's head only");
        Ok(())
    }

    /// The origin snapshots the volume reads through that reach `offset`, nearest first
    /// (its own origin, then that volume's, ...), opened on this store.
    fn origins(&self, offset: u64) -> Vec<Arc<Export>> {
        let mut out = Vec::new();
        let mut volume = self.volume.as_str().to_string();
        // A clone's chain of origins is short; the bound only guards a broken catalog.
        for _ in 0..MAX_ORIGINS {
            let origin = match self.store.volume_info(&volume) {
                Ok(info) => info.origin,
                Err(e) => {
                    tracing::warn!(volume = %volume, error = %e,
                        "looking up a clone's origin to repair a replica's block with it");
                    None
                }
            };
            let Some(origin) = origin else { break };
            match self.store.open_export(&origin) {
                Ok(e) if offset < e.size() => out.push(Arc::new(e)),
                // Past the origin's size: no layer of it or below holds the block.
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(volume = %self.volume, origin = %origin, error = %e,
                        "opening a clone's origin to repair a replica's block with it");
                    break;
                }
            }
            volume = origin
                .split_once('@')
                .map_or(origin.clone(), |(v, _)| v.to_string());
        }
        out
    }
}

/// Most origins looked through (a clone of a clone of ...).
const MAX_ORIGINS: usize = 16;

/// The block at `offset` of `view`, or `None` (logged) when it does not read here.
async fn read_block(view: &Arc<Export>, offset: u64) -> Option<Vec<u8>> {
    let export = view.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; BLOCK_SIZE];
        export.read_at(offset, &mut buf).map(|()| buf)
    })
    .await;
    match read {
        Ok(Ok(b)) => Some(b),
        Ok(Err(e)) => {
            tracing::warn!(export = view.name(), offset, error = %e,
                "a block to repair a replica's copy with does not read here");
            None
        }
        Err(e) => {
            tracing::warn!(export = view.name(), offset, error = %e, "reading a block");
            None
        }
    }
}
