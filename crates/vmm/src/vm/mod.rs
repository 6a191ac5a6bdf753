//! One virtual machine: KVM VM and vCPUs, guest memory, devices, and the run loop.
//!
//! [`run`] builds the VM (`build`: booted from a kernel, or restored from a snapshot),
//! serves the control API, starts one thread per vCPU (`vcpu_loop`) and waits until the
//! guest stops. `capture` takes the state of a paused VM as one whole (snapshots,
//! migrations); `mmio_devices` sets up the virtio devices; `arrive` runs a VM that comes
//! by live migration (`crate::migration`).

mod arrive;
mod build;
pub mod capture;
mod error;
mod mmio_devices;
mod vcpu_loop;

use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::api;
use crate::config::VmConfig;
use crate::control::{Control, RunState, SerialTee};
use crate::memory::{self, MemoryError};
use crate::migration::outgoing::Source;
use crate::migration::wire::DiskInfo;
use crate::migration::Shared;
use crate::snapshot::{self, Snapshot, VcpuState};

use error::thread;
pub use error::VmError;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;

/// How to start: boot a kernel, or continue a snapshot.
pub enum Launch {
    /// Boot this spec.
    Boot(VmConfig),
    /// Restore the snapshot in `dir`, attaching `disk` (never the disk the snapshot
    /// names: whoever restores says what the VM may open).
    Restore {
        /// The snapshot directory.
        dir: std::path::PathBuf,
        /// The disk, required exactly when the snapshotted VM had one.
        disk: Option<String>,
        /// How an NBD disk connects.
        nbd: tessera_disk::NbdOptions,
        /// The NICs' taps, replacing the snapshot's (same count); empty: the snapshot's.
        nics: Vec<crate::net::NicConfig>,
    },
    /// Wait for a live migration's source and continue its VM here when told.
    Incoming(crate::migration::incoming::Args),
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset (i8042) — our power-off.
    Reset,
    /// The guest shut down (ACPI/system event).
    Shutdown,
    /// Triple fault.
    TripleFault,
    /// Powered off through the control API.
    PowerOff,
    /// A live migration completed: the VM runs on in the target's VMM.
    Migrated,
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the guest stopped.
    pub reason: StopReason,
    /// Time from VMM start to the guest's first boot-timer write.
    pub first_instruction: Option<Duration>,
}

/// The spec to run and, for a restore, the snapshot it continues.
fn prepare(launch: Launch) -> Result<(VmConfig, Option<(std::path::PathBuf, Snapshot)>), VmError> {
    match launch {
        Launch::Boot(cfg) => Ok((cfg, None)),
        Launch::Incoming(_) => Err(VmError::RestoreDisk(
            "an incoming migration is not a boot or a restore",
        )),
        Launch::Restore {
            dir,
            disk,
            nbd,
            nics,
        } => {
            let snap = snapshot::read_state(&dir)?;
            let mut spec = snap.spec.clone();
            spec.disk = match (&spec.disk, disk) {
                (Some(_), Some(d)) => Some(d),
                (None, None) => None,
                (Some(_), None) => return Err(VmError::RestoreDisk(
                    "the snapshotted VM had a disk: name it with --disk (a restore never opens the disk recorded in the snapshot)",
                )),
                (None, Some(_)) => return Err(VmError::RestoreDisk(
                    "the snapshotted VM had no disk; --disk cannot add one at restore",
                )),
            };
            spec.nbd = nbd;
            if !nics.is_empty() {
                if nics.len() != spec.nics.len() {
                    return Err(VmError::RestoreDisk(
                        "--net must name as many NICs as the snapshotted VM had",
                    ));
                }
                spec.nics = nics;
            }
            Ok((spec, Some((dir, snap))))
        }
    }
}

/// Builds the VM described by `cfg` and runs it until the guest stops or is powered off
/// through the control API on `api_socket`.
pub fn run(
    launch: Launch,
    serial_out: Box<dyn Write + Send>,
    api_socket: Option<&Path>,
) -> Result<RunOutcome, VmError> {
    let start = Instant::now();
    let control = Control::new(start);
    let serial_out: Box<dyn Write + Send> = Box::new(SerialTee {
        out: serial_out,
        control: control.clone(),
    });
    let migration = Arc::new(Shared::default());
    if let Launch::Incoming(args) = launch {
        return arrive::run(args, control, serial_out, migration, api_socket, start);
    }
    let (cfg, restored) = prepare(launch)?;
    let cfg = &cfg;
    check_vcpus(cfg, &control)?;
    let mem = memory::guest_memory(cfg.memory_mib)?;
    if let Some((dir, snap)) = &restored {
        snapshot::restore_memory(&mem, &dir.join("memory"), &snap.memory)?;
    }
    let (disk, disk_info) = match &cfg.disk {
        Some(d) => {
            let disk = tessera_disk::open_with(d, &cfg.nbd).map_err(VmError::Disk)?;
            let info = DiskInfo {
                size: disk.size(),
                read_only: disk.read_only(),
            };
            (Some(disk), Some(info))
        }
        None => (None, None),
    };
    let built = build::build(
        build::Shell::new(cfg, &mem)?,
        cfg,
        restored.as_ref().map(|(_, s)| s),
        mem,
        disk,
        serial_out,
        start,
    )?;
    // A notification the worker had not seen when the snapshot was taken is not in it:
    // look at every queue once, as if the driver had notified.
    built.kick_devices()?;
    if restored.is_some() {
        tracing::info!("restored vCPU, VM and device state from the snapshot");
    }
    let ctx = api::Ctx::new(control, cfg.clone(), migration);
    let event = if restored.is_some() {
        "restored"
    } else {
        "started"
    };
    // The API comes up before the vCPUs so a failure to bind it stops nothing half-started.
    run_built(cfg, built, &ctx, disk_info, api_socket, event)
}

fn check_vcpus(cfg: &VmConfig, control: &Control) -> Result<(), VmError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount(cfg.vcpus));
    }
    control.set_vcpus(cfg.vcpus as usize);
    Ok(())
}

/// Runs a built VM: its control API's operations (and the API itself on `serve`, unless
/// it is up already), then the vCPUs, until the guest stops.
fn run_built(
    cfg: &VmConfig,
    built: build::Built,
    ctx: &Arc<api::Ctx>,
    disk: Option<DiskInfo>,
    serve: Option<&Path>,
    event: &str,
) -> Result<RunOutcome, VmError> {
    let control = &ctx.control;
    // A no-op handler: the signal's only job is to make KVM_RUN return EINTR.
    extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VmError::SignalHandler)?;

    // Every vCPU leaves its state here when it parks for a pause (only its own thread may
    // read it); a snapshot or a migration of the paused VM reads them all.
    let saved_vcpu: Arc<Mutex<Vec<Option<VcpuState>>>> =
        Arc::new(Mutex::new((0..cfg.vcpus).map(|_| None).collect()));
    let vcpu_pthreads: Arc<std::sync::OnceLock<Vec<libc::pthread_t>>> =
        Arc::new(std::sync::OnceLock::new());
    let kick = vcpu_kick(control, &vcpu_pthreads);
    let parts = capture::Parts {
        control: control.clone(),
        vm: built.vm.clone(),
        mem: built.mem.clone(),
        disk: built.disk.clone(),
        nics: built.nics.clone(),
        pio: built.pio.clone(),
        saved: saved_vcpu.clone(),
        spec: cfg.clone(),
    };
    let snapshot_parts = parts.clone();
    let dirty: api::DirtyFn = {
        let (vm, mem, tracking) = (built.vm.clone(), built.mem.clone(), cfg.track_dirty_pages);
        Arc::new(move || {
            if !tracking {
                return Err(MemoryError::TrackingOff);
            }
            memory::dirty_pages(&vm, &mem)
        })
    };
    let source = Arc::new(Source {
        parts,
        kick: kick.clone(),
        disk,
        track_always: cfg.track_dirty_pages,
        shared: ctx.migration.clone(),
    });
    let ops = api::VmOps {
        kick,
        snapshot: Arc::new(move |dir: &Path| snapshot_parts.snapshot(dir)),
        dirty,
        power_button: built.power_button.clone(),
        source,
    };
    let _ = ctx.ops.set(ops);
    if let Some(path) = serve {
        api::serve(path, ctx.clone()).map_err(|error| VmError::ApiSocket {
            path: path.to_path_buf(),
            error,
        })?;
    }
    tracing::info!(
        entry = built.entry_rip,
        memory_mib = cfg.memory_mib,
        "starting guest"
    );
    control.event(event, None);
    run_vcpus(built, control, saved_vcpu, &vcpu_pthreads)
}

/// What forces every vCPU out of the guest (to see a pause or power-off request): a
/// signal to each vCPU thread, once they exist and while the VM has not stopped.
fn vcpu_kick(
    control: &Arc<Control>,
    vcpu_pthreads: &Arc<std::sync::OnceLock<Vec<libc::pthread_t>>>,
) -> Arc<dyn Fn() + Send + Sync> {
    let (kick_ctl, kick_target) = (control.clone(), vcpu_pthreads.clone());
    Arc::new(move || {
        if let (Some(threads), false) = (
            kick_target.get(),
            matches!(kick_ctl.state(), RunState::Stopped(_)),
        ) {
            for t in threads {
                // SAFETY: `t` names a vCPU thread, which is never joined or detached, so
                // the id stays valid for the life of the process; the signal has a
                // registered no-op handler, so delivery only interrupts KVM_RUN.
                unsafe {
                    libc::pthread_kill(*t, SIGRTMIN());
                }
            }
        }
    })
}

/// Starts a thread per vCPU and waits until the first one ends (the VM stopped).
fn run_vcpus(
    built: build::Built,
    control: &Arc<Control>,
    saved_vcpu: Arc<Mutex<Vec<Option<VcpuState>>>>,
    vcpu_pthreads: &std::sync::OnceLock<Vec<libc::pthread_t>>,
) -> Result<RunOutcome, VmError> {
    let build::Built {
        kvm_fd,
        vm,
        mem,
        disk,
        nics,
        pio,
        vcpus,
        ..
    } = built;
    let devices: Arc<Vec<mmio_devices::Virtio>> =
        Arc::new(disk.iter().chain(&nics).cloned().collect());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut pthreads = Vec::with_capacity(vcpus.len());
    for (index, mut vcpu) in vcpus.into_iter().enumerate() {
        let (pio, devices, ctl, saved, kvm_fd, done_tx) = (
            pio.clone(),
            devices.clone(),
            control.clone(),
            saved_vcpu.clone(),
            kvm_fd.clone(),
            done_tx.clone(),
        );
        let name = format!("vcpu{index}");
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let res =
                    vcpu_loop::vcpu_loop(&kvm_fd, &mut vcpu, &pio, &devices, &ctl, (&saved, index));
                let reason = match &res {
                    Ok(r) => format!("{r:?}"),
                    Err(e) => format!("error: {e}"),
                };
                ctl.stopped(&reason);
                let first = pio.lock().ok().and_then(|p| p.first_instruction);
                let _ = done_tx.send((res, first));
            })
            .map_err(thread(&name))?;
        pthreads.push(thread.as_pthread_t());
        // Never join or detach a vCPU thread: its pthread id must stay valid for kicks
        // that race with its exit. The handles are deliberately leaked (one per vCPU).
        std::mem::forget(thread);
    }
    let _ = vcpu_pthreads.set(pthreads);
    let (res, first_instruction) = done_rx.recv().map_err(|_| VmError::VcpuThreadDied)?;
    let reason = res?;
    if reason == StopReason::PowerOff {
        control.wait_power_off_answered(Duration::from_secs(2));
    }
    tracing::info!(?reason, "guest stopped");
    // Other vCPU threads (never joined, see above) may still be in KVM_RUN until the
    // process exits: keep guest memory mapped for the life of the process so KVM never
    // finds it unmapped. One mapping per VMM process, released at exit.
    drop(vm);
    std::mem::forget(mem);
    Ok(RunOutcome {
        reason,
        first_instruction,
    })
}
