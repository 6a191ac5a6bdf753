//! One virtual machine: KVM VM and vCPU, guest memory, devices, and the run loop.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit};
use tessera_virtio::blk::Block;
use tessera_virtio::mmio::{self, MmioTransport, MMIO_WINDOW};
use tessera_virtio::net::Net;
use tessera_virtio::Interrupt;
use vmm_sys_util::eventfd::EventFd;

use std::os::unix::thread::JoinHandleExt;
use std::path::Path;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::acpi::AcpiError;
use crate::api;
use crate::config::VmConfig;
use crate::control::{Control, RunState, SerialTee};
use crate::devices::{PioAction, PioBus};
use crate::layout::*;
use crate::memory::{self, MemoryError};
use crate::power_button::PowerButton;
use crate::snapshot::{self, SnapshotError, VcpuState};
use crate::{boot, vcpu};

/// How long a snapshot waits for the disk's requests in flight to finish.
const QUIESCE_LIMIT: Duration = Duration::from_secs(10);

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
}

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
}

impl From<SnapshotError> for VmError {
    fn from(e: SnapshotError) -> VmError {
        VmError::Snapshot(e)
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |error| VmError::Kvm { what, error }
}

fn thread(name: &str) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |error| VmError::Thread {
        name: name.to_string(),
        error,
    }
}

struct IrqFd(EventFd);

impl Interrupt for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A virtio-mmio device as the vCPU sees it: where its registers are, the registers, and
/// the eventfd that wakes its I/O worker.
#[derive(Clone)]
struct Virtio {
    base: u64,
    transport: Arc<Mutex<MmioTransport>>,
    kick: Arc<EventFd>,
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the guest stopped.
    pub reason: StopReason,
    /// Time from VMM start to the guest's first boot-timer write.
    pub first_instruction: Option<Duration>,
}

/// Builds the VM described by `cfg` and runs it until the guest stops or is powered off
/// through the control API on `api_socket`.
pub fn run(
    launch: Launch,
    serial_out: Box<dyn Write + Send>,
    api_socket: Option<&Path>,
) -> Result<RunOutcome, VmError> {
    let start = Instant::now();
    let (cfg, restored) = match launch {
        Launch::Boot(cfg) => (cfg, None),
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
            (spec, Some((dir, snap)))
        }
    };
    let cfg = &cfg;
    let control = Control::new(start);
    let serial_out: Box<dyn Write + Send> = Box::new(SerialTee {
        out: serial_out,
        control: control.clone(),
    });
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount(cfg.vcpus));
    }
    control.set_vcpus(cfg.vcpus as usize);
    let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm = kvm_fd.create_vm().map_err(kvm("create VM"))?;
    vm.set_tss_address(KVM_TSS as usize)
        .map_err(kvm("set TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP)
        .map_err(kvm("set identity map"))?;
    vm.create_irq_chip().map_err(kvm("create irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm("create PIT"))?;

    let mem = memory::guest_memory(cfg.memory_mib)?;
    memory::register_memory(&vm, &mem, cfg.track_dirty_pages)?;
    if let Some((dir, snap)) = &restored {
        snapshot::restore_memory(&mem, &dir.join("memory"), &snap.memory)?;
        snapshot::restore_vm(&vm, &snap.vm)?;
    }

    let mut cmdline = cfg.cmdline.clone();
    let mut virtio: Option<Virtio> = None;
    if let Some(disk) = &cfg.disk {
        let disk = tessera_disk::open_with(disk, &cfg.nbd).map_err(VmError::Disk)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_irqfd(&irq, VIRTIO_IRQ)
            .map_err(kvm("register virtio irqfd"))?;
        let t = Arc::new(Mutex::new(MmioTransport::new(
            Box::new(Block::new(disk)),
            mem.clone(),
            Arc::new(IrqFd(irq)),
        )));
        // Queue notifications land in an eventfd (no exit to us); an I/O thread serves them.
        let notify = EventFd::new(0).map_err(VmError::EventFd)?;
        vm.register_ioevent(
            &notify,
            &IoEventAddress::Mmio(VIRTIO_MMIO_BASE + 0x50),
            NoDatamatch,
        )
        .map_err(kvm("register ioeventfd"))?;
        let kick = Arc::new(notify.try_clone().map_err(VmError::EventFd)?);
        let worker = t.clone();
        // The worker takes the transport's lock only around taking requests off the queue
        // and completing them, never across disk I/O: the vCPU's MMIO exits need that lock.
        std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || loop {
                if notify.read().is_err() {
                    return;
                }
                if let Err(e) = mmio::serve(&worker, 0) {
                    tracing::error!(error = %e, "virtio-blk worker stops");
                    return;
                }
            })
            .map_err(thread("virtio-blk"))?;
        // With one vCPU the guest finds the disk the way Linux parses it from the command
        // line; with more, the DSDT describes it.
        if cfg.vcpus == 1 {
            cmdline.push_str(&format!(
                " virtio_mmio.device=4K@{VIRTIO_MMIO_BASE:#x}:{VIRTIO_IRQ}"
            ));
        }
        if let Some(saved) = restored.as_ref().and_then(|(_, s)| s.virtio.as_ref()) {
            lock(&t)?.restore(saved).map_err(SnapshotError::Transport)?;
            // A notification the worker had not seen when the snapshot was taken is not in
            // it: look at the queue once, as if the driver had notified.
            kick.write(1).map_err(VmError::EventFd)?;
        }
        virtio = Some(Virtio {
            base: VIRTIO_MMIO_BASE,
            transport: t,
            kick,
        });
    }
    crate::net::check_all(&cfg.nics)?;
    let mut nics: Vec<Virtio> = Vec::with_capacity(cfg.nics.len());
    for (i, nic) in cfg.nics.iter().enumerate() {
        let (base, irq) = (nic_mmio_base(i), NIC_IRQS[i]);
        let v = start_nic(&vm, &mem, nic, base, irq)?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        if let Some(saved) = restored.as_ref().and_then(|(_, s)| s.nics.get(i)) {
            lock(&v.transport)?
                .restore(saved)
                .map_err(SnapshotError::Transport)?;
            v.kick.write(1).map_err(VmError::EventFd)?;
        }
        nics.push(v);
    }
    let devices: Arc<Vec<Virtio>> = Arc::new(virtio.iter().chain(&nics).cloned().collect());

    // Every booted VM gets ACPI tables, if only for the power button; with one vCPU the
    // command line announces the disk (above), so the DSDT does not describe it twice.
    if restored.is_none() {
        crate::acpi::write_tables(&mem, cfg.vcpus, cfg.vcpus > 1 && cfg.disk.is_some())?;
    }
    let entry_rip = match &restored {
        Some(_) => 0,
        None => {
            let entry = boot::load(
                &mem,
                &cfg.kernel,
                cfg.initrd.as_deref(),
                cmdline.trim(),
                cfg.memory_mib << 20,
            )?;
            entry.rip
        }
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm("register serial irqfd"))?;
    let pio = match &restored {
        Some((_, snap)) => PioBus::restored(serial_out, serial_irq, start, &snap.serial)
            .map_err(SnapshotError::Device)?,
        None => PioBus::new(serial_out, serial_irq, start),
    };
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&ged_irq, GED_IRQ)
        .map_err(kvm("register GED irqfd"))?;
    let power_button = Arc::new(PowerButton::new(ged_irq));
    let mut pio = pio;
    pio.attach_power_button(power_button.clone());
    let pio = Arc::new(Mutex::new(pio));

    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for i in 0..cfg.vcpus {
        let vcpu = vm.create_vcpu(u64::from(i)).map_err(kvm("create vCPU"))?;
        let rip = (i == 0).then_some(entry_rip);
        vcpu::setup(&kvm_fd, &vcpu, i, rip).map_err(kvm("set up vCPU"))?;
        vcpus.push(vcpu);
    }
    if let Some((_, snap)) = &restored {
        // read_state checked there is one state per vCPU.
        for (vcpu, state) in vcpus
            .iter()
            .zip(std::iter::once(&snap.vcpu).chain(&snap.aps))
        {
            snapshot::restore_vcpu(vcpu, state)?;
        }
        tracing::info!("restored vCPU, VM and device state from the snapshot");
    }
    let kvm_fd = Arc::new(kvm_fd);
    let vm = Arc::new(vm);
    // Every vCPU leaves its state here when it parks for a pause (only its own thread may
    // read it); a snapshot of the paused VM saves them all.
    let saved_vcpu: Arc<Mutex<Vec<Option<VcpuState>>>> =
        Arc::new(Mutex::new((0..cfg.vcpus).map(|_| None).collect()));
    // A no-op handler: the signal's only job is to make KVM_RUN return EINTR.
    extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VmError::SignalHandler)?;

    // The API comes up before the vCPU so a failure to bind it stops nothing half-started.
    let vcpu_pthreads: Arc<std::sync::OnceLock<Vec<libc::pthread_t>>> =
        Arc::new(std::sync::OnceLock::new());
    let kick_ctl = control.clone();
    let kick_target = vcpu_pthreads.clone();
    let kick: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
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
    });
    let take_snapshot: api::SnapshotFn = {
        let (control, vm, mem, virtio, nics, pio, saved, spec) = (
            control.clone(),
            vm.clone(),
            mem.clone(),
            virtio.clone(),
            nics.clone(),
            pio.clone(),
            saved_vcpu.clone(),
            cfg.clone(),
        );
        Arc::new(move |dir: &Path| {
            if control.state() != RunState::Paused {
                return Err(SnapshotError::NotPaused);
            }
            let started = Instant::now();
            std::fs::create_dir_all(dir).map_err(|error| SnapshotError::Io {
                path: dir.to_path_buf(),
                error,
            })?;
            let saved = saved
                .lock()
                .map_err(|_| SnapshotError::Poisoned("vCPU state"))?;
            let states = saved
                .iter()
                .map(|s| s.as_ref().ok_or(SnapshotError::VcpuNotCaptured))
                .collect::<Result<Vec<_>, _>>()?;
            let (vcpu, aps) = states.split_first().ok_or(SnapshotError::VcpuNotCaptured)?;
            let write = || -> Result<(), SnapshotError> {
                let memory = snapshot::save_memory(&mem, &dir.join("memory"))?;
                let vm_state = snapshot::save_vm(&vm)?;
                let serial = pio
                    .lock()
                    .map_err(|_| SnapshotError::Poisoned("serial"))?
                    .save();
                let virtio = match &virtio {
                    Some(v) => Some(
                        v.transport
                            .lock()
                            .map_err(|_| SnapshotError::Poisoned("virtio"))?
                            .save(),
                    ),
                    None => None,
                };
                // A NIC's frames move only under its transport's lock: holding it is quiet.
                let nics = nics
                    .iter()
                    .map(|n| {
                        n.transport
                            .lock()
                            .map(|t| t.save())
                            .map_err(|_| SnapshotError::Poisoned("virtio-net"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                snapshot::write_state(
                    dir,
                    &snapshot::SnapshotOut {
                        version: snapshot::SNAPSHOT_VERSION,
                        spec: &spec,
                        memory,
                        vcpu,
                        aps: aps.to_vec(),
                        vm: vm_state,
                        serial,
                        virtio,
                        nics,
                    },
                )
            };
            // The disk's worker may still be completing requests of the paused guest: hold it
            // off (after its batch in flight) so memory and the queues are saved as one state.
            match &virtio {
                Some(v) => match mmio::quiesced_within(&v.transport, QUIESCE_LIMIT, write) {
                    Ok(r) => r?,
                    Err(mmio::QuiesceError::TimedOut(d)) => return Err(SnapshotError::DiskBusy(d)),
                    Err(mmio::QuiesceError::Poisoned(_)) => {
                        return Err(SnapshotError::Poisoned("virtio"))
                    }
                },
                None => write()?,
            }
            tracing::info!(dir = %dir.display(), millis = started.elapsed().as_millis() as u64, "snapshot written");
            Ok(())
        })
    };
    if let Some(path) = api_socket {
        let dirty: api::DirtyFn = {
            let (vm, mem, tracking) = (vm.clone(), mem.clone(), cfg.track_dirty_pages);
            Arc::new(move || {
                if !tracking {
                    return Err(MemoryError::TrackingOff);
                }
                memory::dirty_pages(&vm, &mem)
            })
        };
        let ops = api::VmOps {
            kick,
            snapshot: take_snapshot,
            dirty,
            power_button,
        };
        api::serve(path, control.clone(), cfg.clone(), ops).map_err(|error| {
            VmError::ApiSocket {
                path: path.to_path_buf(),
                error,
            }
        })?;
    }

    tracing::info!(
        entry = entry_rip,
        memory_mib = cfg.memory_mib,
        "starting guest"
    );
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let restored_run = restored.is_some();
    control.event(if restored_run { "restored" } else { "started" }, None);
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
                let res = vcpu_loop(&kvm_fd, &mut vcpu, &pio, &devices, &ctl, (&saved, index));
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

fn vcpu_loop(
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
                return Ok(StopReason::PowerOff);
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

fn lock(
    t: &Arc<Mutex<MmioTransport>>,
) -> Result<std::sync::MutexGuard<'_, MmioTransport>, VmError> {
    t.lock().map_err(|_| VmError::Poisoned("virtio device"))
}

/// The device whose register window holds the whole access, and the offset in it.
fn mmio_device(devices: &[Virtio], addr: u64, len: usize) -> Option<(&Virtio, u64)> {
    let end = addr.checked_add(len as u64)?;
    devices
        .iter()
        .find(|v| addr >= v.base && end <= v.base + MMIO_WINDOW)
        .map(|v| (v, addr - v.base))
}

/// Sets up NIC `nic` at `base` with interrupt `irq`: its tap, the virtio-net device, the
/// irqfd and ioeventfd, and the I/O thread that moves its frames.
fn start_nic(
    vm: &kvm_ioctls::VmFd,
    mem: &tessera_virtio::GuestMem,
    nic: &crate::net::NicConfig,
    base: u64,
    irq: u32,
) -> Result<Virtio, VmError> {
    let mac = nic.check()?;
    let tap = Arc::new(crate::net::Tap::open(nic)?);
    let (dev, worker) = Net::new(mac, tap.clone());
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&irqfd, irq)
        .map_err(kvm("register virtio-net irqfd"))?;
    let t = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(dev),
        mem.clone(),
        Arc::new(IrqFd(irqfd)),
    )));
    let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_ioevent(&notify, &IoEventAddress::Mmio(base + 0x50), NoDatamatch)
        .map_err(kvm("register virtio-net ioeventfd"))?;
    let kick = Arc::new(notify.try_clone().map_err(VmError::EventFd)?);
    let worker_t = t.clone();
    let name = format!("virtio-net-{}", tap.name());
    tracing::info!(tap = %tap.name(), mac = %nic.mac, base = format_args!("{base:#x}"), irq, "NIC attached");
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let Err(e) = crate::net::io_loop(worker_t, worker, notify, tap) {
                tracing::error!(error = %e, "virtio-net I/O thread stops");
            }
        })
        .map_err(thread(&name))?;
    Ok(Virtio {
        base,
        transport: t,
        kick,
    })
}
