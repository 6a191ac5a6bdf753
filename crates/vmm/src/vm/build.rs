//! Building the VM: the KVM VM with its irqchip and PIT, guest memory registered, the
//! devices (the disk, the NICs, the serial port, the power button), the kernel loaded or
//! a snapshot's state put back, and the vCPUs created — everything but running them.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use tessera_virtio::GuestMem;
use vmm_sys_util::eventfd::EventFd;

use super::error::{kvm, VmError};
use super::mmio_devices::{lock, start_disk, start_nic, Virtio};
use crate::config::VmConfig;
use crate::devices::PioBus;
use crate::layout::*;
use crate::memory;
use crate::power_button::PowerButton;
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::{boot, vcpu};

/// A VM ready to run.
pub(crate) struct Built {
    pub kvm_fd: Arc<Kvm>,
    pub vm: Arc<VmFd>,
    pub mem: GuestMem,
    pub disk: Option<Virtio>,
    pub nics: Vec<Virtio>,
    pub pio: Arc<Mutex<PioBus>>,
    pub power_button: Arc<PowerButton>,
    /// The vCPUs, the boot processor first.
    pub vcpus: Vec<VcpuFd>,
    /// Where the boot vCPU starts (0 for a restored VM: its registers say).
    pub entry_rip: u64,
    /// Whether the devices' queues were restored (and must be looked at once).
    restored: bool,
}

impl Built {
    /// Wakes every device's I/O thread once: a restored queue may hold requests whose
    /// notification the snapshot did not keep. Nothing to do for a booted VM.
    pub fn kick_devices(&self) -> Result<(), VmError> {
        if !self.restored {
            return Ok(());
        }
        for d in self.disk.iter().chain(&self.nics) {
            d.kick.write(1).map_err(VmError::EventFd)?;
        }
        Ok(())
    }
}

/// The KVM objects of a VM that do not depend on its state: the VM with its irqchip and
/// PIT, guest memory registered, and (for a VM whose state comes later) its vCPUs. An
/// incoming migration makes them while the memory is still being copied, so that once
/// the source paused the guest only the state is left to load ([`build`]).
pub(crate) struct Shell {
    kvm_fd: Kvm,
    vm: VmFd,
    /// Empty until the vCPUs are made (a booted VM's need the kernel's entry first).
    vcpus: Vec<VcpuFd>,
}

impl Shell {
    /// The VM of `cfg` over guest memory `mem`, without vCPUs.
    pub(crate) fn new(cfg: &VmConfig, mem: &GuestMem) -> Result<Shell, VmError> {
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
        memory::register_memory(&vm, mem, cfg.track_dirty_pages)?;
        Ok(Shell {
            kvm_fd,
            vm,
            vcpus: Vec::new(),
        })
    }

    /// The VM of `cfg` over `mem` with its vCPUs, for a state to be put back later (the
    /// saved registers replace the boot processor's start at 0).
    pub(crate) fn for_restore(cfg: &VmConfig, mem: &GuestMem) -> Result<Shell, VmError> {
        let mut shell = Shell::new(cfg, mem)?;
        shell.vcpus = create_vcpus(&shell.kvm_fd, &shell.vm, cfg.vcpus, 0)?;
        Ok(shell)
    }
}

/// Creates `n` vCPUs, the boot processor starting at `entry_rip`.
fn create_vcpus(kvm_fd: &Kvm, vm: &VmFd, n: u8, entry_rip: u64) -> Result<Vec<VcpuFd>, VmError> {
    let mut vcpus = Vec::with_capacity(n as usize);
    for i in 0..n {
        let vcpu = vm.create_vcpu(u64::from(i)).map_err(kvm("create vCPU"))?;
        let rip = (i == 0).then_some(entry_rip);
        vcpu::setup(kvm_fd, &vcpu, i, rip).map_err(kvm("set up vCPU"))?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Builds the VM of `cfg` in `shell` (made for it over `mem`: with its vCPUs by
/// [`Shell::for_restore`] only when `restored` is given) over guest memory `mem` (for a
/// restore, already holding the snapshot's memory) and the opened `disk`; `restored` is
/// the snapshot it continues.
pub(crate) fn build(
    shell: Shell,
    cfg: &VmConfig,
    restored: Option<&Snapshot>,
    mem: GuestMem,
    disk: Option<Box<dyn tessera_disk::Disk>>,
    serial_out: Box<dyn Write + Send>,
    start: Instant,
) -> Result<Built, VmError> {
    let Shell {
        kvm_fd,
        vm,
        vcpus: made,
    } = shell;
    if let Some(snap) = restored {
        // After the vCPUs were made, as QEMU does too: the irqchip, PIT and clock are the
        // VM's, the vCPUs' own state (LAPIC included) is put back below.
        snapshot::restore_vm(&vm, &snap.vm)?;
    }

    let mut cmdline = cfg.cmdline.clone();
    let disk = match disk {
        Some(d) => {
            let v = start_disk(&vm, &mem, d)?;
            // With one vCPU the guest finds the disk the way Linux parses it from the
            // command line; with more, the DSDT describes it.
            if cfg.vcpus == 1 {
                cmdline.push_str(&format!(
                    " virtio_mmio.device=4K@{VIRTIO_MMIO_BASE:#x}:{VIRTIO_IRQ}"
                ));
            }
            if let Some(saved) = restored.and_then(|s| s.virtio.as_ref()) {
                lock(&v.transport)?
                    .restore(saved)
                    .map_err(SnapshotError::Transport)?;
            }
            Some(v)
        }
        None => None,
    };
    crate::net::check_all(&cfg.nics)?;
    let mut nics: Vec<Virtio> = Vec::with_capacity(cfg.nics.len());
    for (i, nic) in cfg.nics.iter().enumerate() {
        let (base, irq) = (nic_mmio_base(i), NIC_IRQS[i]);
        let v = start_nic(&vm, &mem, nic, base, irq)?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        if let Some(saved) = restored.and_then(|s| s.nics.get(i)) {
            lock(&v.transport)?
                .restore(saved)
                .map_err(SnapshotError::Transport)?;
        }
        nics.push(v);
    }

    // Every booted VM gets ACPI tables, if only for the power button; with one vCPU the
    // command line announces the disk (above), so the DSDT does not describe it twice.
    if restored.is_none() {
        crate::acpi::write_tables(&mem, cfg.vcpus, cfg.vcpus > 1 && cfg.disk.is_some())?;
    }
    let entry_rip = match restored {
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
    let mut pio = match restored {
        Some(snap) => PioBus::restored(serial_out, serial_irq, start, &snap.serial)
            .map_err(SnapshotError::Device)?,
        None => PioBus::new(serial_out, serial_irq, start),
    };
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&ged_irq, GED_IRQ)
        .map_err(kvm("register GED irqfd"))?;
    let power_button = Arc::new(PowerButton::new(ged_irq));
    pio.attach_power_button(power_button.clone());

    let vcpus = if made.is_empty() {
        create_vcpus(&kvm_fd, &vm, cfg.vcpus, entry_rip)?
    } else if made.len() != cfg.vcpus as usize {
        return Err(VmError::VcpusMade {
            made: made.len(),
            state: cfg.vcpus,
        });
    } else {
        made
    };
    if let Some(snap) = restored {
        // read_state checked there is one state per vCPU.
        for (vcpu, state) in vcpus
            .iter()
            .zip(std::iter::once(&snap.vcpu).chain(&snap.aps))
        {
            snapshot::restore_vcpu(vcpu, state)?;
        }
    }
    Ok(Built {
        kvm_fd: Arc::new(kvm_fd),
        vm: Arc::new(vm),
        mem,
        disk,
        nics,
        pio: Arc::new(Mutex::new(pio)),
        power_button,
        vcpus,
        entry_rip,
        restored: restored.is_some(),
    })
}
