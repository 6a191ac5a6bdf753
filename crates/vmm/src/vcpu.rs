//! Putting a vCPU into 64-bit mode at the kernel's entry, the way the Linux 64-bit boot
//! protocol expects it.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::GDT_ENTRIES;
use crate::layout::*;

/// Configures CPUID and the local APIC of `vcpu`; for the boot processor (`rip` given)
/// also registers, segments, paging and FPU. Application processors wait in KVM for the
/// INIT/SIPI the guest sends them.
pub fn setup(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    index: u8,
    rip: Option<u64>,
) -> Result<(), kvm_ioctls::Error> {
    let mut cpuid: CpuId = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC id in EBX[31:24]; x2APIC id in leaf 0xb EDX.
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
            0xb => e.edx = u32::from(index),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)?;
    set_lint(vcpu)?;
    let Some(rip) = rip else {
        return Ok(());
    };

    let regs = kvm_regs {
        rflags: 0x2,
        rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;

    let mut sregs = vcpu.get_sregs()?;
    let seg = |index: u16, entry: u64| kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cs = seg(1, GDT_ENTRIES[1]);
    let data = seg(2, GDT_ENTRIES[2]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(3, GDT_ENTRIES[3]);
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 31); // PE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
}

fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    // LINT0 as ExtINT (the PIC), LINT1 as NMI, as firmware would leave them.
    let mut lapic = vcpu.get_lapic()?;
    let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, 0x350, 7);
    set(&mut lapic.regs, 0x360, 4);
    vcpu.set_lapic(&lapic)
}
