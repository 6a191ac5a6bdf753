//! Snapshot and restore: vCPU, VM (irqchip, PIT, clock) and device state as plain serde
//! structs in `state.json`, guest memory in a separate sparse file `memory` (pages of
//! zeroes are holes).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use tessera_virtio::mmio::{RestoreError, TransportSnapshot};
use tessera_virtio::GuestMem;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::devices::DeviceError;

/// Version of the snapshot format.
pub const SNAPSHOT_VERSION: u32 = 1;

/// One vCPU.
#[derive(Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

/// VM-wide KVM state.
#[derive(Clone, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The 16550's registers (mirrors `vm_superio::SerialState`).
#[derive(Clone, Serialize, Deserialize, Default)]
#[allow(missing_docs)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// Format version.
    pub version: u32,
    /// The VM spec it was started with.
    pub spec: VmConfig,
    /// Guest memory regions (guest-physical start, length), in file order.
    pub memory: Vec<(u64, u64)>,
    /// The boot vCPU.
    pub vcpu: VcpuState,
    /// The application processors (vCPUs 1..N), in order; empty for one vCPU.
    #[serde(default)]
    pub aps: Vec<VcpuState>,
    /// KVM VM state.
    pub vm: VmState,
    /// The serial port.
    pub serial: SerialSnapshot,
    /// The virtio-blk transport and device, if there is a disk.
    pub virtio: Option<TransportSnapshot>,
    /// Each NIC's virtio-net transport (queues, features), in NIC order; the MAC is in
    /// the spec.
    #[serde(default)]
    pub nics: Vec<TransportSnapshot>,
}

/// Why a snapshot could not be taken or restored. A snapshot directory is untrusted
/// input: everything read from it is checked, and a mismatch is `invalid snapshot`.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// KVM refused.
    #[error("KVM {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// A file or directory of the snapshot.
    #[error("{}: {error}", .path.display())]
    Io {
        /// Which file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The saved MSRs do not fit KVM's MSR list.
    #[error("invalid snapshot: MSRs: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
    /// KVM did not take a saved MSR.
    #[error("invalid snapshot: KVM refused MSR {0:#x}")]
    MsrRefused(u32),
    /// Guest memory could not be read while saving it.
    #[error("reading guest memory: {0}")]
    ReadGuestMemory(vm_memory::GuestMemoryError),
    /// The memory file is not as long as its layout says.
    #[error("invalid snapshot: memory file size does not match its layout")]
    MemoryFileSize,
    /// The memory layout names addresses this VM's memory does not have.
    #[error("invalid snapshot: snapshot memory does not fit the guest: {0}")]
    MemoryDoesNotFit(vm_memory::GuestMemoryError),
    /// `state.json` could not be encoded.
    #[error("encoding the snapshot state: {0}")]
    Encode(serde_json::Error),
    /// `state.json` is not a snapshot state.
    #[error("invalid snapshot: {0}")]
    Decode(serde_json::Error),
    /// A format version this VMM does not read.
    #[error("invalid snapshot: snapshot version {0} (this VMM reads {SNAPSHOT_VERSION})")]
    Version(u32),
    /// The saved virtio transport does not fit the device.
    #[error("invalid snapshot: {0}")]
    Transport(RestoreError),
    /// The saved serial port state is not one the UART accepts.
    #[error("invalid snapshot: {0}")]
    Device(DeviceError),
    /// The snapshot's vCPU states do not match its spec's vCPU count.
    #[error("invalid snapshot: {states} vCPU states for {vcpus} vCPUs")]
    VcpuCount {
        /// States saved.
        states: usize,
        /// vCPUs in the spec.
        vcpus: usize,
    },
    /// The snapshot's NIC states do not match its spec's NICs.
    #[error("invalid snapshot: {states} NIC states for {nics} NICs")]
    NicCount {
        /// States saved.
        states: usize,
        /// NICs in the spec.
        nics: usize,
    },
    /// Disk requests were still in flight when the snapshot gave up waiting for them.
    #[error("disk requests still in flight after {0:?} (a hung disk?); no snapshot taken")]
    DiskBusy(std::time::Duration),
    /// A running VM has no consistent state to save.
    #[error("pause the VM before taking a snapshot")]
    NotPaused,
    /// The vCPU parked without leaving its registers behind.
    #[error("the vCPU state was not captured at pause")]
    VcpuNotCaptured,
    /// A thread panicked while holding a device's lock.
    #[error("{0} lock poisoned")]
    Poisoned(&'static str),
}

fn k(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm(what, e)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |error| SnapshotError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Captures a (stopped) vCPU.
pub fn save_vcpu(kvm: &Kvm, vcpu: &VcpuFd) -> Result<VcpuState, SnapshotError> {
    let mut msrs = Vec::new();
    for index in kvm.get_msr_index_list().map_err(k("list MSRs"))?.as_slice() {
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index: *index,
            ..Default::default()
        }]) else {
            continue;
        };
        // Some listed MSRs are not readable on every host; those are not state we need.
        if vcpu.get_msrs(&mut one).unwrap_or(0) == 1 {
            msrs.push((*index, one.as_slice()[0].data));
        }
    }
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(k("get regs"))?,
        sregs: vcpu.get_sregs().map_err(k("get sregs"))?,
        xsave: vcpu.get_xsave().map_err(k("get xsave"))?,
        xcrs: vcpu.get_xcrs().map_err(k("get xcrs"))?,
        lapic: vcpu.get_lapic().map_err(k("get lapic"))?,
        msrs,
        events: vcpu.get_vcpu_events().map_err(k("get vcpu events"))?,
        mp_state: vcpu.get_mp_state().map_err(k("get mp state"))?,
        debugregs: vcpu.get_debug_regs().map_err(k("get debug regs"))?,
    })
}

/// Loads a saved vCPU state (CPUID must already be set).
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
    vcpu.set_sregs(&s.sregs).map_err(k("set sregs"))?;
    vcpu.set_regs(&s.regs).map_err(k("set regs"))?;
    // SAFETY: KVM_SET_XSAVE copies the vCPU's XSAVE size from the pointer, which exceeds the
    // 4096 bytes of `kvm_xsave` only when XSTATE features were enabled dynamically
    // (`arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`, e.g. AMX); this process never asks for
    // them, so the kernel reads only inside `s.xsave`. Its contents come from an untrusted
    // file, but they are plain bytes that KVM validates (EINVAL), not pointers.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(k("set xsave"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(k("set xcrs"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(k("set debug regs"))?;
    vcpu.set_lapic(&s.lapic).map_err(k("set lapic"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|(index, data)| kvm_msr_entry {
            index: *index,
            data: *data,
            ..Default::default()
        })
        .collect();
    for chunk in entries.chunks(64) {
        let msrs = Msrs::from_entries(chunk).map_err(SnapshotError::MsrList)?;
        // KVM_SET_MSRS stops at the first MSR it refuses and returns how many it took.
        let n = vcpu.set_msrs(&msrs).map_err(k("set MSRs"))?;
        if n != chunk.len() {
            let index = chunk.get(n).map_or(0, |e| e.index);
            return Err(SnapshotError::MsrRefused(index));
        }
    }
    vcpu.set_mp_state(s.mp_state).map_err(k("set mp state"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(k("set vcpu events"))?;
    Ok(())
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(k("get irqchip"))?;
    Ok(c)
}

/// Captures the in-kernel irqchip, PIT and clock.
pub fn save_vm(vm: &VmFd) -> Result<VmState, SnapshotError> {
    let mut clock = vm.get_clock().map_err(k("get clock"))?;
    clock.flags = 0; // KVM_SET_CLOCK rejects the flags GET_CLOCK reports.
    Ok(VmState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(k("get PIT"))?,
        clock,
    })
}

/// Loads saved irqchip, PIT and clock state (after creating irqchip and PIT).
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), SnapshotError> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c).map_err(k("set irqchip"))?;
    }
    vm.set_pit2(&s.pit).map_err(k("set PIT"))?;
    vm.set_clock(&s.clock).map_err(k("set clock"))?;
    Ok(())
}

const PAGE: usize = 4096;

/// Writes guest memory to `path`, skipping all-zero pages (they stay holes).
pub fn save_memory(mem: &GuestMem, path: &Path) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let f = File::create(path).map_err(io(path))?;
    let mut layout = Vec::new();
    let mut file_off = 0u64;
    let mut page = vec![0u8; PAGE];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let len = region.len();
        let mut off = 0;
        while off < len {
            mem.read_slice(&mut page, GuestAddress(start + off))
                .map_err(SnapshotError::ReadGuestMemory)?;
            if page.iter().any(|b| *b != 0) {
                f.write_all_at(&page, file_off + off).map_err(io(path))?;
            }
            off += PAGE as u64;
        }
        layout.push((start, len));
        file_off += len;
    }
    f.set_len(file_off).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(layout)
}

/// Fills guest memory from a memory file written by [`save_memory`], reading only the
/// file's data extents (holes are pages of zeroes, which fresh guest memory already is).
pub fn restore_memory(
    mem: &GuestMem,
    path: &Path,
    layout: &[(u64, u64)],
) -> Result<(), SnapshotError> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let f = File::open(path).map_err(io(path))?;
    // The layout comes from the snapshot file: a sum that overflows cannot match any file.
    let total = layout
        .iter()
        .try_fold(0u64, |sum, (_, len)| sum.checked_add(*len))
        .ok_or(SnapshotError::MemoryFileSize)?;
    if f.metadata().map_err(io(path))?.len() != total {
        return Err(SnapshotError::MemoryFileSize);
    }
    // File offset -> guest-physical address.
    let to_gpa = |off: u64| -> Option<(u64, u64)> {
        let mut base = 0;
        for (start, len) in layout {
            if off < base + len {
                return Some((start.checked_add(off - base)?, base + len - off));
            }
            base += len;
        }
        None
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < total {
        let Ok(data) = lseek(f.as_raw_fd(), off as i64, Whence::SeekData) else {
            break; // ENXIO: no data past `off`
        };
        let hole =
            lseek(f.as_raw_fd(), data, Whence::SeekHole).map_err(|e| io(path)(e.into()))? as u64;
        let mut at = data as u64;
        while at < hole {
            let Some((gpa, left_in_region)) = to_gpa(at) else {
                break;
            };
            let n = (hole - at).min(buf.len() as u64).min(left_in_region) as usize;
            f.read_exact_at(&mut buf[..n], at).map_err(io(path))?;
            mem.write_slice(&buf[..n], GuestAddress(gpa))
                .map_err(SnapshotError::MemoryDoesNotFit)?;
            at += n as u64;
        }
        off = hole;
    }
    Ok(())
}

/// The same document as [`Snapshot`], borrowing what cannot be copied, for writing.
#[derive(Serialize)]
#[allow(missing_docs)]
pub struct SnapshotOut<'a> {
    pub version: u32,
    pub spec: &'a VmConfig,
    pub memory: Vec<(u64, u64)>,
    pub vcpu: &'a VcpuState,
    pub aps: Vec<&'a VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    pub virtio: Option<TransportSnapshot>,
    pub nics: Vec<TransportSnapshot>,
}

/// Writes `state.json` atomically.
pub fn write_state(dir: &Path, s: &SnapshotOut<'_>) -> Result<(), SnapshotError> {
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let text = serde_json::to_vec(s).map_err(SnapshotError::Encode)?;
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Reads `state.json`.
pub fn read_state(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let path = dir.join("state.json");
    let text = std::fs::read(&path).map_err(io(&path))?;
    parse_state(&text)
}

/// Parses and checks a state document (from `state.json`, or a migration stream).
pub fn parse_state(text: &[u8]) -> Result<Snapshot, SnapshotError> {
    let s: Snapshot = serde_json::from_slice(text).map_err(SnapshotError::Decode)?;
    if s.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version(s.version));
    }
    if s.nics.len() != s.spec.nics.len() {
        return Err(SnapshotError::NicCount {
            states: s.nics.len(),
            nics: s.spec.nics.len(),
        });
    }
    if s.aps.len() + 1 != usize::from(s.spec.vcpus) {
        return Err(SnapshotError::VcpuCount {
            states: s.aps.len() + 1,
            vcpus: usize::from(s.spec.vcpus),
        });
    }
    Ok(s)
}
