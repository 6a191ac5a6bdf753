//! Who may write a volume while a VM runs from it (issue #8): only that VM's own VMM.
//! Another writer on the same node — `qemu-io` or `nbdcopy` on the store's `nbd.sock`, a
//! `tessera volume cp` over the QUIC export — would write under the guest's feet, as
//! qemu's image locking refuses ("Failed to get shared 'write' lock").
//!
//! The store does not know which VM uses a volume nor which process is its VMM:
//! `tesserad` does (the cluster's VM records, the `run.json` of the VMMs it started on
//! this node). So at a connection's first write the store asks it, giving the client's
//! process id when the client came on the Unix socket (the kernel's `SO_PEERCRED`, which
//! the client cannot choose), and keeps the answer for the connection's life. Reads,
//! flushes and snapshots are never asked about.

use std::sync::OnceLock;

use tessera_nbd::proto::Errno;
use tessera_nbd::{DeviceError, Peer};

use crate::claim::{self, ClusterAsk};

/// One connection's right to write its volume.
pub struct Writer {
    /// Whom to ask and the client's pid; `None`: not asked (see [`Writer::for_peer`]).
    ask: Option<(ClusterAsk, Option<u32>)>,
    /// The answer, once there is one: `tesserad`'s refusal in words, or leave to write.
    /// A failure to ask is not kept: the next write asks again.
    answer: OnceLock<Result<(), String>>,
}

impl Writer {
    /// The rule for a client connected from `peer` to a store that asks `cluster`:
    /// Unix-socket clients and the QUIC export's are asked about; NBD over TCP is not,
    /// because a VM's VMM on another node than its disk's primary writes that way (over
    /// TLS with its node's certificate) and nothing in the connection tells it apart
    /// from another client holding a certificate of the cluster CA (not supported yet:
    /// `docs/volume-export.md`). A store without `tesserad` (tests, a bare store) asks no
    /// one.
    pub fn for_peer(cluster: Option<&ClusterAsk>, peer: &Peer) -> Writer {
        let ask = match (cluster, peer) {
            (None, _) | (_, Peer::Tcp { .. }) => None,
            (Some(c), Peer::Unix { pid }) => Some((c.clone(), *pid)),
            (Some(c), Peer::Other { .. }) => Some((c.clone(), None)),
        };
        Writer {
            ask,
            answer: OnceLock::new(),
        }
    }

    /// Whether this connection may write `volume`: asked of `tesserad` at its first
    /// write only. Blocking.
    pub fn check(&self, volume: &str) -> Result<(), DeviceError> {
        let Some((cluster, pid)) = &self.ask else {
            return Ok(());
        };
        let answer = match self.answer.get() {
            Some(a) => a,
            None => {
                let asked = claim::blocking(|| cluster.may_write_here(volume, *pid))
                    .map_err(|why| DeviceError::new(Errno::Io, why))?;
                if let Err(why) = &asked {
                    tracing::warn!(volume, pid, reason = %why, "an export client's write refused");
                }
                self.answer.get_or_init(|| asked)
            }
        };
        answer
            .clone()
            .map_err(|why| DeviceError::new(Errno::Perm, why))
    }
}
