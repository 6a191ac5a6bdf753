//! Why a VM could not be built or run.

use crate::acpi::AcpiError;
use crate::boot;
use crate::memory::MemoryError;
use crate::snapshot::SnapshotError;

use super::MAX_VCPUS;

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM call failed.
    #[error("KVM {what}: {error}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        error: kvm_ioctls::Error,
    },
    /// The spec asks for a vCPU count we do not run.
    #[error("vcpus must be 1 to {MAX_VCPUS}, not {0}")]
    VcpuCount(u8),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Booting failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// A restore was not given the disk it needs, or given one it cannot take.
    #[error("restore: {0}")]
    RestoreDisk(&'static str),
    /// The disk could not be opened.
    #[error("disk: {0}")]
    Disk(tessera_disk::DiskError),
    /// A NIC could not be set up.
    #[error("NIC: {0}")]
    Nic(#[from] crate::net::NicError),
    /// An eventfd for an interrupt or queue notification could not be made.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The vCPU kick signal's handler could not be installed.
    #[error("signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    /// The control API socket could not be bound.
    #[error("control API socket {}: {error}", .path.display())]
    ApiSocket {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A vCPU or I/O thread could not be started.
    #[error("starting thread {name}: {error}")]
    Thread {
        /// The thread's name.
        name: String,
        /// Why.
        error: std::io::Error,
    },
    /// The VM made before its state came has another number of vCPUs than the state.
    #[error("the VM was made with {made} vCPUs, its state has {state}")]
    VcpusMade {
        /// How many were made.
        made: usize,
        /// How many the state has.
        state: u8,
    },
    /// The vCPU threads ended without reporting why.
    #[error("the vCPU thread died")]
    VcpuThreadDied,
    /// A thread panicked while holding a device's lock.
    #[error("{0} lock poisoned")]
    Poisoned(&'static str),
    /// The guest halted with interrupts off: nothing can ever wake it.
    #[error("guest failed: halted with no way to wake up")]
    Halted,
    /// KVM could not emulate an instruction of the guest.
    #[error("guest failed: KVM internal error (emulation failure)")]
    EmulationFailure,
    /// The hardware refused to enter the guest (bad vCPU state).
    #[error("guest failed: VM entry failed: reason {reason:#x} on cpu {cpu}")]
    EntryFailed {
        /// The hardware's entry failure reason.
        reason: u64,
        /// The physical CPU.
        cpu: u32,
    },
    /// Snapshot or restore failed.
    #[error("snapshot: {0}")]
    Snapshot(SnapshotError),
    /// An incoming migration failed before the VM could be built.
    #[error("incoming migration: {0}")]
    Incoming(crate::migration::incoming::IncomingError),
    /// A loaded incoming VM was not told to run in time.
    #[error("incoming migration: loaded, but not told to run within {0:?}")]
    NotToldToRun(std::time::Duration),
    /// The incoming VM's disk is not the one the guest had.
    #[error("incoming migration: {0}")]
    Attach(crate::migration::deferred_disk::AttachError),
}

impl From<SnapshotError> for VmError {
    fn from(e: SnapshotError) -> VmError {
        VmError::Snapshot(e)
    }
}

pub(super) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |error| VmError::Kvm { what, error }
}

pub(super) fn thread(name: &str) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |error| VmError::Thread {
        name: name.to_string(),
        error,
    }
}
