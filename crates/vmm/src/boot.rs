//! Loading the kernel and preparing the zero page, command line and page tables.

use std::fs::File;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use tessera_virtio::GuestMem;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::layout::*;

/// Errors while preparing the guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("opening kernel {path}: {error}")]
    OpenKernel {
        /// The kernel path.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The initramfs could not be read.
    #[error("reading initramfs {path}: {error}")]
    ReadInitrd {
        /// The initramfs path.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// Neither an ELF nor a bzImage, or it does not fit.
    #[error("loading kernel: ELF: {elf}; bzImage: {bz}")]
    Load {
        /// Why it is not an ELF.
        elf: linux_loader::loader::Error,
        /// Why it is not a bzImage.
        bz: linux_loader::loader::Error,
    },
    /// The command line is too long or has bad characters.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The command line could not be placed in guest memory.
    #[error("kernel command line: {0}")]
    PlaceCmdline(linux_loader::loader::Error),
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error("writing boot structures: initramfs of {0} bytes does not fit in guest RAM")]
    InitrdTooLarge(u64),
    /// Writing the initramfs, page tables or GDT into guest memory failed.
    #[error("writing boot structures: {0}")]
    Memory(vm_memory::GuestMemoryError),
    /// Writing the zero page failed.
    #[error("writing boot structures: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// Where to start the vCPU.
pub struct Entry {
    /// 64-bit entry point.
    pub rip: u64,
}

/// Loads `kernel` (an ELF like vmlinux, or a bzImage) and writes the zero page.
pub fn load(
    mem: &GuestMem,
    kernel: &str,
    initrd: Option<&str>,
    cmdline: &str,
    mem_size: u64,
) -> Result<Entry, BootError> {
    let mut f = File::open(kernel).map_err(|error| BootError::OpenKernel {
        path: kernel.into(),
        error,
    })?;
    let mut params = boot_params::default();
    let kernel_end;
    let rip = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            kernel_end = r.kernel_end;
            r.kernel_load.raw_value()
        }
        Err(elf) => match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => {
                kernel_end = r.kernel_end;
                if let Some(h) = r.setup_header {
                    params.hdr = h;
                }
                // The 64-bit entry point is 0x200 past the protected-mode code.
                r.kernel_load.raw_value() + 0x200
            }
            Err(bz) => return Err(BootError::Load { elf, bz }),
        },
    };
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cl).map_err(BootError::PlaceCmdline)?;

    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;
    let mut n = 0;
    let mut add = |addr: u64, size: u64| {
        if n < params.e820_table.len() {
            params.e820_table[n] = boot_e820_entry {
                addr,
                size,
                r#type: 1,
            };
            n += 1;
        }
    };
    add(0, LOW_RAM_END);
    add(HIMEM_START, mem_size.min(MMIO_HOLE) - HIMEM_START);
    if mem_size > MMIO_HOLE {
        add(1 << 32, mem_size - MMIO_HOLE);
    }
    params.e820_entries = n as u8;
    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, kernel_end, mem_size.min(MMIO_HOLE))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(BootError::BootParams)?;
    write_page_tables(mem)?;
    Ok(Entry { rip })
}

/// Places the initramfs at the top of low RAM, page-aligned, above the kernel.
fn load_initrd(
    mem: &GuestMem,
    path: &str,
    kernel_end: u64,
    ram_top: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|error| BootError::ReadInitrd {
        path: path.into(),
        error,
    })?;
    let size = data.len() as u64;
    let addr = ram_top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a > kernel_end && *a + size <= u64::from(u32::MAX))
        .ok_or(BootError::InitrdTooLarge(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(BootError::Memory)?;
    Ok((addr, size))
}

/// Identity-maps the first 4 GiB with 2 MiB pages (the MMIO hole uncached), and writes
/// the GDT and an empty IDT. Linux builds its own tables; these carry it (or a small
/// guest) until it does.
fn write_page_tables(mem: &GuestMem) -> Result<(), BootError> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(BootError::Memory)
    };
    w(PDPT | 0x3, PML4)?;
    for gib in 0..4u64 {
        let pd = PD + gib * 0x1000;
        w(pd | 0x3, PDPT + gib * 8)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            // Present, writable, 2 MiB; cache-disabled and write-through in the MMIO hole.
            let flags = if addr >= MMIO_HOLE { 0x83 | 0x18 } else { 0x83 };
            w(addr | flags, pd + i * 8)?;
        }
    }
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        w(*entry, GDT + i as u64 * 8)?;
    }
    w(0, IDT)
}

/// Null, 64-bit code, data, TSS.
pub const GDT_ENTRIES: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
