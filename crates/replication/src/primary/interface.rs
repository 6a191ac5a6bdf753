//! What the primary and its shell exchange: identities, the cluster's configuration, the
//! timing, inputs, actions and errors.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::regions::Region;
use crate::replica::Op;
use crate::wire::{Generation, Message, ReplyError};

/// A store holding a copy of the volume (the cluster's node id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(pub u64);

/// The shell's handle of a client request, echoed in [`PrimaryAction::Complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Who holds the volume in sync, as decided by the cluster for one generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub generation: Generation,
    /// Copies the volume should have, the primary's included (1-3).
    pub replica_count: u8,
    /// Replicas (not the primary) that must acknowledge every request.
    pub in_sync: BTreeSet<ReplicaId>,
    /// Replicas that left the in-sync set and will catch up: the primary records what they miss.
    pub out_of_sync: BTreeSet<ReplicaId>,
    /// The operator allowed fewer than 2 copies in sync (an audited event in the cluster).
    pub operator_override: bool,
}

impl Config {
    /// Copies in sync, the primary's included.
    pub fn copies_in_sync(&self) -> usize {
        self.in_sync.len() + 1
    }

    /// The fewest copies in sync allowed without the override.
    pub fn minimum_in_sync(&self) -> usize {
        usize::from(self.replica_count).clamp(1, 2)
    }

    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if let Some(r) = self.in_sync.intersection(&self.out_of_sync).next() {
            return Err(ConfigError::BothInAndOutOfSync(*r));
        }
        if self.copies_in_sync() < self.minimum_in_sync() && !self.operator_override {
            return Err(ConfigError::BelowMinimum {
                copies: self.copies_in_sync(),
                minimum: self.minimum_in_sync(),
            });
        }
        Ok(())
    }
}

/// How long the primary waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Resend what a connected replica has not acknowledged after this long.
    pub retransmit_after: Duration,
    /// A replica that leaves a request unacknowledged this long is asked out of the in-sync set.
    pub replica_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            retransmit_after: Duration::from_millis(500),
            replica_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("generation {offered} is not newer than the current {current}")]
    NotNewer {
        current: Generation,
        offered: Generation,
    },
    #[error(
        "{copies} copies in sync is below the minimum of {minimum} without the operator override"
    )]
    BelowMinimum { copies: usize, minimum: usize },
    #[error("replica {0:?} is listed both in and out of sync")]
    BothInAndOutOfSync(ReplicaId),
    #[error("the primary is fenced or failed; it takes no configuration")]
    Stopped,
}

/// Why a client request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A newer generation exists: another primary may be writing.
    #[error("this primary is fenced: the volume is at generation {current} elsewhere")]
    Fenced { current: Generation },
    /// The local copy failed; this primary stops.
    #[error("the local copy failed: {0}")]
    LocalFailed(String),
    /// Offset or length not a positive multiple of 512.
    #[error("offset and length must be positive multiples of 512")]
    Misaligned,
    /// Past the end of the volume.
    #[error("past the end of the volume")]
    OutOfRange,
    /// A write larger than one frame carries ([`crate::wire::MAX_DATA`]): the shell splits it.
    #[error("a write of more than 4 MiB must be split")]
    TooLarge,
    /// A resize to fewer bytes than the volume has: volumes only grow.
    #[error("volumes only grow: {size} bytes is smaller than the current {current}")]
    Shrink { size: u64, current: u64 },
    /// A snapshot needs every copy in sync and no removal pending: these replicas are
    /// out of sync or failing, so their copies would lack it.
    #[error("a snapshot needs every copy in sync: replicas {0:?} are out of sync or failing")]
    NotAllInSync(Vec<ReplicaId>),
}

/// An input to [`Primary::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryInput {
    /// A client's request.
    Request { id: RequestId, op: Op },
    /// The shell performed [`PrimaryAction::ApplyLocal`] for `id`.
    LocalDone {
        id: RequestId,
        result: Result<(), ReplyError>,
    },
    /// A new stream to this replica is open.
    Connected(ReplicaId),
    /// The stream to this replica is gone (with whatever was in flight on it).
    Disconnected(ReplicaId),
    /// A message from a replica.
    Received { from: ReplicaId, msg: Message },
    /// Time passed (timeouts and resends are checked on every input; this is just the clock).
    Tick,
}

/// What the shell must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Add `region` to the durable missed-region record of `replica` before going on.
    RecordMissed { replica: ReplicaId, region: Region },
    /// The replica is back in sync (the cluster said so): drop its missed-region record.
    ForgetMissed { replica: ReplicaId },
    /// Perform `op` on the primary's copy, then report [`PrimaryInput::LocalDone`].
    ApplyLocal { id: RequestId, op: Op },
    /// Send `msg` on the replica's stream (drop it if there is no stream).
    Send { to: ReplicaId, msg: Message },
    /// The client request is done.
    Complete {
        id: RequestId,
        result: Result<(), RequestError>,
    },
    /// Ask the cluster for the next generation without `replica` in the in-sync set.
    RequestRemoval {
        replica: ReplicaId,
        generation: Generation,
    },
    /// The replica broke the protocol: close its stream.
    Disconnect {
        replica: ReplicaId,
        reason: &'static str,
    },
}
