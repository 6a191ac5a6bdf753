//! Catch-up carries snapshots: a copy out of the in-sync set when a snapshot was taken
//! (it failed during it, or it is a new copy made by a rebuild) gets it when it is caught
//! up, holding exactly what the primary's snapshot holds.
//!
//! On each new stream the primary asks the replica which snapshots it holds
//! (`SnapshotList`). For each of the primary's snapshots it lacks, oldest first: the
//! replica's copy is made equal to the primary's snapshot (digests compared over the
//! snapshot's whole size, only differing blocks sent, as for the head), flushed, and the
//! snapshot taken there (`Snapshot`, sequenced like a write). Its copy then differs from
//! the primary's head anywhere, so the whole volume is recorded as missed (durably, before
//! the first block is sent) and the passes that follow bring the head back.
//!
//! A snapshot taken before the volume grew is carried to a copy that is larger already
//! (made by hand, or by an earlier version) at its own size: the snapshot's bytes are
//! sent over its size as always, and it is taken with that size (`Snapshot` with `size`,
//! kind 20): the replica trims its copy past that size first, so the snapshot holds
//! nothing past its end (a clone of it grown later reads zeroes there, as the primary's
//! does), and takes it with the block store's `create_snapshot_sized`. The trimmed head
//! comes back with the passes that follow, like the rest of the volume. Kind 20 is
//! protocol version 2: a replica whose store speaks only version 1 (an older release) is
//! not sent it; that carry fails, saying so, and is tried again each pass until the
//! store is upgraded (the connection then settles on version 2).

use std::sync::Arc;

use tessera_blockstore::SnapshotInfo;
use tessera_replication::catchup::CatchUpPlan;
use tessera_replication::regions::{Region, RegionSet};
use tessera_replication::wire::{Generation, Message, VolumeName};
use tessera_store_admin::ReplicaState;

use super::{refused, CatchUp, PassError, Stream};

/// The request number of the snapshot list on a stream (its only one).
const LIST_REQUEST: u64 = 1;
/// The protocol version that brought a `Snapshot` with a size (kind 20).
const SNAPSHOT_AT_VERSION: u8 = 2;

impl CatchUp {
    /// Brings the replica the primary's snapshots it lacks (see the module doc).
    pub(super) async fn carry_snapshots(
        &self,
        s: &mut Stream,
        seq: &mut u64,
    ) -> Result<(), PassError> {
        let mut mine = self
            .store
            .volume_info(self.volume.as_str())
            .map_err(|e| PassError::Retry(format!("listing the primary's snapshots: {e}")))?
            .snapshots;
        if mine.is_empty() {
            return Ok(());
        }
        s.send(&Message::SnapshotList {
            volume: self.volume.clone(),
            generation: Generation(self.generation),
            request: LIST_REQUEST,
        })
        .await?;
        let theirs = match s.recv().await? {
            Message::SnapshotListReply {
                request: LIST_REQUEST,
                result,
            } => result.map_err(refused)?,
            other => {
                return Err(PassError::Retry(format!(
                    "unexpected answer to the snapshot list: {other:?}"
                )))
            }
        };
        // Taken in the order they were taken here: by size first (a volume only grows, so
        // the copy grows through the snapshots' sizes in order and each is taken at its
        // own size without trimming, unless the copy was larger to begin with; `created`
        // counts seconds, so two snapshots a resize apart may tie there), then by time
        // and name.
        mine.sort_by(|a, b| (a.size, a.created, &a.name).cmp(&(b.size, b.created, &b.name)));
        let mut held: Vec<bool> = mine
            .iter()
            .map(|m| theirs.iter().any(|t| t.as_str() == m.name))
            .collect();
        let keep = |s: &mut Stream, held: &[bool]| {
            s.held = mine
                .iter()
                .zip(held)
                .filter(|(_, h)| **h)
                .map(|(m, _)| m.name.clone())
                .collect();
        };
        keep(s, &held);
        if held.iter().all(|h| *h) {
            return Ok(());
        }
        self.record_whole().await?;
        for (i, snap) in mine.iter().enumerate() {
            if !held[i] {
                self.carry(s, seq, snap).await?;
                held[i] = true;
                keep(s, &held);
            }
        }
        Ok(())
    }

    /// Records the whole volume as missed by the replica, durably first: from the first
    /// block of a snapshot sent, its copy differs from the head anywhere, and a restart of
    /// this primary must compare everything.
    async fn record_whole(&self) -> Result<(), PassError> {
        let size = self.export.size();
        let (dir, file) = self.record.clone();
        let line = format!("0 {size}\n");
        tokio::task::spawn_blocking(move || {
            crate::repl::primary::append_missed(&dir, &file, &line)
        })
        .await
        .map_err(|e| PassError::Retry(e.to_string()))?
        .map_err(|e| PassError::Retry(format!("recording the whole volume as missed: {e}")))?;
        let mut whole = RegionSet::new();
        whole.insert(Region {
            offset: 0,
            len: size,
        });
        let mut missed = self.shared.missed.lock();
        let m = missed.entry(self.replica).or_default();
        for r in whole.iter() {
            m.recorded.insert(r);
        }
        Ok(())
    }

    /// Makes the replica's copy what snapshot `snap` holds, then takes it there.
    async fn carry(
        &self,
        s: &mut Stream,
        seq: &mut u64,
        snap: &SnapshotInfo,
    ) -> Result<(), PassError> {
        let name = VolumeName::new(snap.name.as_str())
            .map_err(|e| PassError::Retry(format!("snapshot {}: {e}", snap.name)))?;
        // A copy larger than the snapshot already takes it at the snapshot's size, the
        // rest of its copy trimmed first (see the module doc); a digest request past the
        // snapshot's end answers for such a copy only. A copy no larger takes it as
        // always (an older replica knows only that kind).
        let larger = self.larger_than(s, snap.size).await?;
        if larger && s.version < SNAPSHOT_AT_VERSION {
            // Checked before anything is sent: the copy is left as it is until its store
            // speaks a version that can take the snapshot, and each pass says why.
            return Err(PassError::Retry(format!(
                "the replica's store speaks replication protocol version {} (an older release): it cannot take snapshot {} at {} bytes, smaller than its copy; the copy catches up once that store is upgraded",
                s.version, snap.name, snap.size
            )));
        }
        if larger {
            tracing::info!(volume = %self.volume, node = %self.peer.node, snapshot = %snap.name,
                size = snap.size,
                "the copy is larger than the volume was when this snapshot was taken: it takes it at that size, its bytes past it trimmed");
        }
        self.send_resize(s, seq, snap.size).await?;
        let source = Arc::new(
            self.store
                .open_export(&format!("{}@{}", self.volume, snap.name))
                .map_err(|e| PassError::Retry(format!("opening snapshot {}: {e}", snap.name)))?,
        );
        let mut whole = RegionSet::new();
        whole.insert(Region {
            offset: 0,
            len: snap.size,
        });
        let mut plan = CatchUpPlan::new(&whole, snap.size);
        let progress = |plan: &CatchUpPlan| {
            let p = plan.progress();
            self.set_state(ReplicaState::CatchingUp {
                done_bytes: p.done_bytes,
                total_bytes: p.total_bytes,
            });
        };
        self.send_differences(s, seq, &source, &mut plan, &progress)
            .await?;
        // The replica flushes before it takes a snapshot from the stream.
        self.send_sequenced(s, seq, |volume, generation, seq| Message::Snapshot {
            volume,
            generation,
            seq,
            name,
            size: larger.then_some(snap.size),
        })
        .await?;
        tracing::info!(volume = %self.volume, node = %self.peer.node, snapshot = %snap.name,
            "catch-up brought a snapshot the copy lacked");
        Ok(())
    }

    /// Whether the replica's copy is larger than `size` bytes.
    async fn larger_than(&self, s: &mut Stream, size: u64) -> Result<bool, PassError> {
        const PROBE: u64 = LIST_REQUEST + 1;
        s.send(&Message::Digests {
            volume: self.volume.clone(),
            generation: Generation(self.generation),
            request: PROBE,
            offset: size,
            blocks: 1,
        })
        .await?;
        match s.recv().await? {
            Message::DigestsReply {
                request: PROBE,
                result,
            } => match result {
                Ok(_) => Ok(true),
                Err(tessera_replication::wire::ReplyError::OutOfRange) => Ok(false),
                Err(e) => Err(refused(e)),
            },
            other => Err(PassError::Retry(format!(
                "unexpected answer to the size probe: {other:?}"
            ))),
        }
    }
}
