//! A replica repairs a block of its own copy that fails its checksum with its primary's
//! bytes (issue #8: "a scrub finds and repairs bit rot from a good replica", on a
//! replica's store). The replica is never told where its primary is; it opens a stream
//! on the connection the primary fenced it through (`primary_conns.rs`) and asks
//! `Read` (or `SnapshotRead`) of the block in its own current generation. The primary
//! answers only in that very generation (`primary/serve_replica.rs`): a replica behind
//! or ahead of it is refused, and so is a store that is no longer the primary.
//!
//! The bytes are kept only through `Export::repair_block`: written only when this
//! copy's block still fails its checksum and the bytes hash to the checksum this copy's
//! own table holds for it, compared and written under the lock that keeps layer files
//! still. So a replicated write to the block that lands while the primary answers wins
//! either way: landed before the comparison, the block reads well (or holds another
//! checksum) and nothing is written; not yet landed, the primary's bytes (older or
//! newer) either match the old checksum exactly or are refused, and the write then
//! replaces the block. Stale or wrong bytes change nothing.
//!
//! What was done is told to the primary on the same stream (`RepairReply`), which lists
//! a rewritten block among its repairs: `tesserad` makes it a `volume.repaired` event
//! naming the node whose copy was repaired.

use std::time::Duration;

use tessera_blockstore::{BlockRepair, StoreError, BLOCK, BLOCK_SIZE};
use tessera_replication::wire::{Generation, Message, RepairOutcome, VolumeName};

use super::super::primary::{check_reply, Asker};
use super::ReplicaService;

/// The request number of the one `Read` a repair stream carries.
const REQUEST: u64 = 1;

/// A block of a replica's copy repaired (or found well) with its primary's bytes.
#[derive(Debug)]
pub struct FromPrimary {
    /// The primary's node id (its certificate's name).
    pub node: String,
    /// What the block store did with the bytes.
    pub outcome: RepairOutcome,
}

/// Why a replica's block could not be repaired from its primary.
#[derive(Debug, thiserror::Error)]
pub enum FromPrimaryError {
    /// The volume is not a replica on this store.
    #[error("{0} is not a replica on this store")]
    NotReplica(String),
    /// The copy is being caught up: its catch-up rewrites every block that fails its
    /// checksum (reported as differing), and its checksums may be older than the
    /// primary's bytes.
    #[error("volume {0}: this copy must be caught up first; its catch-up rewrites the block")]
    CatchingUp(String),
    /// No primary of the replica's generation is connected.
    #[error("no connection from a primary of {volume} in generation {generation} (the primary connects to this store; none has yet)")]
    NoPrimary {
        /// The volume.
        volume: String,
        /// The replica's generation.
        generation: u64,
    },
    /// Every primary connection asked refused or failed.
    #[error("its primary could not give the block: {0}")]
    Refused(String),
    /// The local copy failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReplicaService {
    /// Repairs the block at `offset` of `export` (a replica volume here, or
    /// `volume@snapshot`) with its primary's bytes, asking each connection a primary of
    /// this copy's generation fenced it through, at most `wait` each (see the module
    /// comment). Blocking: runs the asking on `rt`.
    pub fn repair_from_primary(
        &self,
        rt: &tokio::runtime::Handle,
        export: &str,
        offset: u64,
        wait: Duration,
    ) -> Result<FromPrimary, FromPrimaryError> {
        let (volume, snapshot) = match export.split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (export, None),
        };
        let vr = self
            .enabled(volume)
            .ok_or_else(|| FromPrimaryError::NotReplica(volume.to_string()))?;
        let (generation, head) = {
            let vr = vr.lock();
            if vr.machine.must_catch_up() {
                return Err(FromPrimaryError::CatchingUp(volume.to_string()));
            }
            (vr.machine.generation(), vr.export.clone())
        };
        let opened;
        let local = match snapshot {
            None => &*head,
            Some(_) => {
                opened = self.store.open_export(export)?;
                &opened
            }
        };
        let offset = offset / BLOCK * BLOCK;
        let ask = read_message(volume, snapshot, generation, offset)?;
        let candidates = self.primary_conns.candidates(volume, generation.0);
        if candidates.is_empty() {
            return Err(FromPrimaryError::NoPrimary {
                volume: volume.to_string(),
                generation: generation.0,
            });
        }
        let mut reasons = Vec::new();
        for (node, conn) in candidates {
            let asked = rt.block_on(async {
                tokio::time::timeout(wait, async {
                    let mut a = Asker::over(conn).await?;
                    let reply = a.ask(&ask).await?;
                    check_reply(reply, REQUEST, BLOCK).map(|data| (a, data))
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {wait:?}")))
            });
            let (mut asker, data) = match asked {
                Ok(a) => a,
                Err(why) => {
                    tracing::warn!(volume = export, offset, node = %node, reason = %why,
                        "the primary could not give a block that failed its checksum on this replica");
                    reasons.push(format!("{node}: {why}"));
                    continue;
                }
            };
            let outcome = match local.repair_block(offset, &data)? {
                BlockRepair::Rewritten => {
                    tracing::warn!(volume = export, offset, len = BLOCK, from = %node,
                        "a block of this replica's copy failed its checksum: repaired with the primary's bytes");
                    RepairOutcome::Rewritten
                }
                BlockRepair::NotNeeded => {
                    tracing::info!(volume = export, offset,
                        "a block of this replica's copy that failed its checksum reads well now (written meanwhile): nothing repaired");
                    RepairOutcome::NotNeeded
                }
                BlockRepair::Mismatch => {
                    tracing::warn!(volume = export, offset, from = %node,
                        "the primary's bytes for a block do not match this copy's checksum (the block changed meanwhile, or a copy is stale): nothing written");
                    RepairOutcome::Mismatch
                }
            };
            // Told so the primary lists the repair (the cluster's event); the repair
            // itself stands whether or not this arrives.
            let told = rt.block_on(async {
                tokio::time::timeout(
                    wait,
                    asker.tell_last(&Message::RepairReply {
                        request: REQUEST,
                        result: Ok(outcome),
                    }),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no end of stream within {wait:?}")))
            });
            if let Err(why) = told {
                tracing::warn!(volume = export, offset, node = %node, reason = %why,
                    "the primary was not told of a replica's repair: no event for it");
            }
            return Ok(FromPrimary { node, outcome });
        }
        Err(FromPrimaryError::Refused(reasons.join("; ")))
    }
}

/// The `Read` (or `SnapshotRead`) of the one block at `offset` in `generation`.
fn read_message(
    volume: &str,
    snapshot: Option<&str>,
    generation: Generation,
    offset: u64,
) -> Result<Message, StoreError> {
    let name = |n: &str| {
        VolumeName::new(n).map_err(|e| StoreError::Invalid {
            field: "volume",
            reason: e.to_string(),
        })
    };
    let volume = name(volume)?;
    let len = BLOCK_SIZE as u32;
    Ok(match snapshot {
        None => Message::Read {
            volume,
            generation,
            request: REQUEST,
            offset,
            len,
        },
        Some(s) => Message::SnapshotRead {
            volume,
            generation,
            request: REQUEST,
            snapshot: name(s)?,
            offset,
            len,
        },
    })
}
