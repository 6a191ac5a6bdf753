//! A vCPU's thread: runs the guest, dispatches its port and MMIO exits, and parks it for
//! a pause (leaving its registers behind for a snapshot or a migration).

use std::sync::Mutex;

use kvm_ioctls::{Kvm, VcpuExit};

use super::error::VmError;
use super::mmio_devices::{lock, mmio_device, Virtio};
use super::StopReason;
use crate::control::{Control, Request};
use crate::devices::{PioAction, PioBus};
use crate::snapshot::{self, VcpuState};

pub(super) fn vcpu_loop(
    kvm_fd: &Kvm,
    vcpu: &mut kvm_ioctls::VcpuFd,
    pio: &Mutex<PioBus>,
    devices: &[Virtio],
    control: &Control,
    (saved, index): (&Mutex<Vec<Option<VcpuState>>>, usize),
) -> Result<StopReason, VmError> {
    let pio_lock = || pio.lock().map_err(|_| VmError::Poisoned("serial"));
    loop {
        if control.pending() {
            if control.pause_requested() {
                // Capture the vCPU now: only this thread may touch it, and a snapshot of a
                // paused VM needs it (an application processor still waiting for its SIPI
                // included: its MP state says so).
                let state = snapshot::save_vcpu(kvm_fd, vcpu)?;
                if let Some(slot) = saved
                    .lock()
                    .map_err(|_| VmError::Poisoned("vCPU state"))?
                    .get_mut(index)
                {
                    *slot = Some(state);
                }
            }
            if control.checkpoint() {
                return Ok(match control.stop_requested() {
                    Some(Request::Leave) => StopReason::Migrated,
                    _ => StopReason::PowerOff,
                });
            }
        }
        let input = control.take_serial_input();
        if !input.is_empty() {
            pio_lock()?.serial_input(&input);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if pio_lock()?.write(port, data) == PioAction::Reset {
                    return Ok(StopReason::Reset);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => pio_lock()?.read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => match mmio_device(devices, addr, data.len()) {
                Some((v, off)) => lock(&v.transport)?.read(off, data),
                None => data.fill(0xff),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((v, off)) = mmio_device(devices, addr, data.len()) {
                    // A notification that exited to us (the ioeventfd normally takes it)
                    // goes to the worker too: the vCPU never waits for the disk.
                    if lock(&v.transport)?.write(off, data).is_some() {
                        if let Err(e) = v.kick.write(1) {
                            tracing::error!(error = %e, "could not wake the virtio-blk worker");
                        }
                    }
                }
            }
            Ok(VcpuExit::Hlt) => {
                // With an in-kernel irqchip HLT stays in KVM; an exit means nothing can wake it.
                return Err(VmError::Halted);
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                tracing::warn!(rip = format_args!("{rip:#x}"), "guest triple-faulted");
                return Ok(StopReason::TripleFault);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                tracing::info!(kind, "guest system event");
                return Ok(StopReason::Shutdown);
            }
            Ok(VcpuExit::InternalError) => return Err(VmError::EmulationFailure),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(VmError::EntryFailed { reason, cpu })
            }
            Ok(other) => tracing::debug!(exit = ?other, "unhandled vCPU exit"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(error) => {
                return Err(VmError::Kvm {
                    what: "run vCPU",
                    error,
                })
            }
        }
    }
}
