//! The state of a paused VM taken as one consistent whole: every vCPU's registers (left
//! by each vCPU thread as it parked), the in-kernel irqchip, PIT and clock, the serial
//! port and the virtio transports, while the disk's worker is held off and the NICs'
//! transports are locked, so guest memory read at the same time agrees with the queues.
//! A snapshot writes it to a directory; a migration sends it to the target.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use tessera_virtio::mmio::{self, MmioTransport};
use tessera_virtio::GuestMem;

use super::mmio_devices::Virtio;
use crate::config::VmConfig;
use crate::control::{Control, RunState};
use crate::devices::PioBus;
use crate::snapshot::{self, SnapshotError, SnapshotOut, VcpuState};

/// How long a capture waits for the disk's requests in flight to finish.
const QUIESCE_LIMIT: Duration = Duration::from_secs(10);

/// What a capture reads: handles on the VM's parts, shared with the threads that run them.
#[derive(Clone)]
pub struct Parts {
    /// The run state.
    pub control: Arc<Control>,
    /// The KVM VM.
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub mem: GuestMem,
    pub(crate) disk: Option<Virtio>,
    pub(crate) nics: Vec<Virtio>,
    pub(crate) pio: Arc<Mutex<PioBus>>,
    /// Each vCPU's state as it parked for the pause, in vCPU order.
    pub(crate) saved: Arc<Mutex<Vec<Option<VcpuState>>>>,
    /// The VM spec.
    pub spec: VmConfig,
}

impl Parts {
    /// Calls `f` with the paused VM's state (its `memory` layout left empty: guest memory
    /// is the caller's to read, in `f`, while nothing else writes it). Refuses a VM that is
    /// not paused, and gives up (no state) when a disk request stays in flight for
    /// [`QUIESCE_LIMIT`].
    pub(crate) fn with_state<T, E: From<SnapshotError>>(
        &self,
        f: impl FnOnce(&mut SnapshotOut<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        if self.control.state() != RunState::Paused {
            return Err(SnapshotError::NotPaused.into());
        }
        let saved = self
            .saved
            .lock()
            .map_err(|_| E::from(SnapshotError::Poisoned("vCPU state")))?;
        let states = saved
            .iter()
            .map(|s| s.as_ref().ok_or(SnapshotError::VcpuNotCaptured))
            .collect::<Result<Vec<_>, _>>()?;
        let (vcpu, aps) = states.split_first().ok_or(SnapshotError::VcpuNotCaptured)?;
        let take = || -> Result<T, E> {
            // A NIC's frames move only under its transport's lock: holding them all keeps
            // every NIC quiet until the state and memory are read.
            let nic_locks: Vec<MutexGuard<'_, MmioTransport>> = self
                .nics
                .iter()
                .map(|n| {
                    n.transport
                        .lock()
                        .map_err(|_| SnapshotError::Poisoned("virtio-net"))
                })
                .collect::<Result<_, _>>()?;
            let serial = self
                .pio
                .lock()
                .map_err(|_| SnapshotError::Poisoned("serial"))?
                .save();
            let vm = snapshot::save_vm(&self.vm)?;
            let virtio = match &self.disk {
                Some(v) => Some(
                    v.transport
                        .lock()
                        .map_err(|_| SnapshotError::Poisoned("virtio"))?
                        .save(),
                ),
                None => None,
            };
            let mut out = SnapshotOut {
                version: snapshot::SNAPSHOT_VERSION,
                spec: &self.spec,
                memory: Vec::new(),
                vcpu,
                aps: aps.to_vec(),
                vm,
                serial,
                virtio,
                nics: nic_locks.iter().map(|t| t.save()).collect(),
            };
            f(&mut out)
        };
        // The disk's worker may still be completing requests of the paused guest: hold it
        // off (after its batch in flight) so memory and the queues are one state.
        match &self.disk {
            Some(v) => match mmio::quiesced_within(&v.transport, QUIESCE_LIMIT, take) {
                Ok(r) => r,
                Err(mmio::QuiesceError::TimedOut(d)) => Err(SnapshotError::DiskBusy(d).into()),
                Err(mmio::QuiesceError::Poisoned(_)) => {
                    Err(SnapshotError::Poisoned("virtio").into())
                }
            },
            None => take(),
        }
    }

    /// Writes a snapshot of the paused VM into `dir`: `state.json` and the memory file.
    pub fn snapshot(&self, dir: &Path) -> Result<(), SnapshotError> {
        let started = Instant::now();
        if self.control.state() != RunState::Paused {
            return Err(SnapshotError::NotPaused);
        }
        std::fs::create_dir_all(dir).map_err(|error| SnapshotError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        self.with_state(|out| {
            out.memory = snapshot::save_memory(&self.mem, &dir.join("memory"))?;
            snapshot::write_state(dir, out)
        })?;
        tracing::info!(dir = %dir.display(), millis = started.elapsed().as_millis() as u64, "snapshot written");
        Ok(())
    }
}
