//! Guest memory: allocating RAM around the MMIO hole, registering it with KVM, and the
//! dirty-page record (KVM's log of guest writes merged with the VMM's own).

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::Serialize;
use tessera_virtio::GuestMem;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::MMIO_HOLE;

/// Smallest guest RAM, in bytes.
const MIN_SIZE: u64 = 16 << 20;
const PAGE: usize = 4096;

/// Why guest memory could not be set up or its dirty record read.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size in MiB does not fit in bytes.
    #[error("guest memory: size overflows")]
    SizeOverflows,
    /// Less RAM than any guest we boot needs.
    #[error("guest memory: {0} MiB is too little (16 MiB at least)")]
    TooSmall(u64),
    /// The host would not map the memory.
    #[error("guest memory: {0}")]
    Allocate(vm_memory::mmap::FromRangesError),
    /// A KVM call failed.
    #[error("KVM {what}: {error}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        error: kvm_ioctls::Error,
    },
    /// The VM was started without dirty-page tracking.
    #[error("dirty-page tracking is off (start with --track-dirty-pages)")]
    TrackingOff,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MemoryError {
    move |error| MemoryError::Kvm { what, error }
}

/// Guest pages written since the last report, as the control API returns them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirtyPages {
    /// Number of 4 KiB pages.
    pub pages: u64,
    /// Guest-physical (start, length) ranges, merged where adjacent.
    pub ranges: Vec<(u64, u64)>,
}

/// RAM below the MMIO hole, and the rest above 4 GiB.
pub fn guest_memory(mib: u64) -> Result<GuestMem, MemoryError> {
    let size = mib.checked_mul(1 << 20).ok_or(MemoryError::SizeOverflows)?;
    if size < MIN_SIZE {
        return Err(MemoryError::TooSmall(mib));
    }
    let mut ranges = vec![(GuestAddress(0), size.min(MMIO_HOLE) as usize)];
    if size > MMIO_HOLE {
        ranges.push((GuestAddress(1 << 32), (size - MMIO_HOLE) as usize));
    }
    GuestMem::from_ranges(&ranges).map_err(MemoryError::Allocate)
}

/// Guest memory's regions as (guest-physical start, length), in slot order.
pub fn layout(mem: &GuestMem) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// Turns KVM's log of the pages the guest writes on or off for every slot (a live
/// migration turns it on for its pre-copy rounds: the log costs a write fault per page
/// per round). The slots stay what [`register_memory`] made them otherwise.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMem, on: bool) -> Result<(), MemoryError> {
    register_memory(vm, mem, on)
}

/// Hands every region of `mem` to KVM as a memory slot (slot = region index); called
/// again on the same slots, it changes only their dirty-logging flag.
///
/// `mem` must stay mapped for as long as any vCPU of `vm` can run: `vm::run` leaks it.
pub fn register_memory(vm: &VmFd, mem: &GuestMem, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr` and `memory_size` describe a live mmap owned by `mem`,
        // and the caller (`vm::run`) never unmaps it: at its end `mem` is deliberately
        // leaked, so the mapping lives as long as the process and therefore as long as any
        // vCPU of this VM can run. Slots are distinct region indices, so no two overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm("register guest memory"))?;
    }
    Ok(())
}

/// Pages written since the last call, from KVM's dirty log (guest writes) merged with
/// the memory bitmap (the VMM's own writes); both are cleared as they are read (each
/// bitmap word swapped for zero), so a write that lands meanwhile is in this report or
/// the next, never lost — a migration's last round relies on that.
pub fn dirty_pages(vm: &VmFd, mem: &GuestMem) -> Result<DirtyPages, MemoryError> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pages = 0u64;
    for (slot, region) in mem.iter().enumerate() {
        let len = region.len() as usize;
        let kvm_bits = vm
            .get_dirty_log(slot as u32, len)
            .map_err(kvm("get dirty log"))?;
        let vmm_bitmap: &vm_memory::bitmap::AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
        let vmm_bits = vmm_bitmap.get_and_reset();
        let base = region.start_addr().raw_value();
        let bit = |words: &[u64], page: usize| {
            words
                .get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        };
        for page in 0..len / PAGE {
            let by_guest = bit(&kvm_bits, page);
            let by_vmm = bit(&vmm_bits, page);
            if by_guest || by_vmm {
                pages += 1;
                let gpa = base + (page * PAGE) as u64;
                match ranges.last_mut() {
                    Some((start, l)) if *start + *l == gpa => *l += PAGE as u64,
                    _ => ranges.push((gpa, PAGE as u64)),
                }
            }
        }
    }
    Ok(DirtyPages { pages, ranges })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_below_the_minimum_or_overflowing_are_refused() {
        assert!(matches!(guest_memory(1), Err(MemoryError::TooSmall(1))));
        assert!(matches!(
            guest_memory(u64::MAX),
            Err(MemoryError::SizeOverflows)
        ));
        let mem = guest_memory(16).unwrap();
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 16 << 20);
    }
}
