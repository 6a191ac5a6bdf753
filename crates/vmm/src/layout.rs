//! The guest-physical memory map (x86_64). See `docs/vmm.md`.

/// GDT used to enter long mode.
pub const GDT: u64 = 0x500;
/// An empty IDT (the guest installs its own).
pub const IDT: u64 = 0x520;
/// Stack pointer at entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, PD (first 1 GiB in 2 MiB pages).
pub const PML4: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT: u64 = 0xa000;
/// Four page directories (0xb000-0xefff), one per GiB.
pub const PD: u64 = 0xb000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Largest command line.
pub const CMDLINE_MAX: usize = 4096;
/// End of the low RAM that the e820 map reports below the EBDA.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Kernels load at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (no RAM from here to 4 GiB).
pub const MMIO_HOLE: u64 = 0xc000_0000;
/// First virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Legacy interrupt of the first virtio-mmio device.
pub const VIRTIO_IRQ: u32 = 5;
/// Interrupts of the NICs' virtio-mmio devices, in NIC order (legacy lines Linux maps
/// one to one from a `virtio_mmio.device=` command-line entry).
pub const NIC_IRQS: [u32; 4] = [6, 7, 9, 11];
/// Register window of NIC `index`: the slots after the disk's.
pub const fn nic_mmio_base(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + (index as u64 + 1) * 0x1000
}
/// COM1 interrupt.
pub const SERIAL_IRQ: u32 = 4;
/// Interrupt of the Generic Event Device (the power button; `crate::power_button`).
pub const GED_IRQ: u32 = 10;
/// The GED's one-byte event register (read to take and clear the pending events).
pub const GED_PORT: u16 = 0x600;
/// KVM's TSS (three pages below 4 GiB, inside the hole).
pub const KVM_TSS: u64 = 0xfffb_d000;
/// KVM's identity map page (VMX), just below the TSS.
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// The boot-timer port: the guest's first write marks "first guest instruction reached".
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// Benchmark marker port: each write is logged with the time since start (for
/// measuring guest work from outside without a guest clock).
pub const BENCH_MARKER_PORT: u16 = 0x441;
