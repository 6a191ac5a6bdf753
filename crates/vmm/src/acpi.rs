//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT (one local APIC per vCPU and the
//! IOAPIC) and a DSDT describing COM1, the virtio-mmio disk (when the command line does
//! not already announce it) and the power button behind a Generic Event Device
//! ([`crate::power_button`]). Built with the `acpi_tables` crate; only the 36-byte RSDP is
//! laid out here.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use tessera_virtio::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in guest memory.
    #[error("writing boot structures: ACPI {what}: {error}")]
    Write {
        /// Which table.
        what: &'static str,
        /// The guest memory error.
        error: vm_memory::GuestMemoryError,
    },
}

const OEM: [u8; 6] = *b"TESSRA";
const TABLE: [u8; 8] = *b"TESSERA ";

/// Where the RSDP goes: Linux scans 0xE0000-0xFFFFF for it.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// Local APIC and IOAPIC addresses.
const LAPIC: u32 = 0xfee0_0000;
const IOAPIC: u32 = 0xfec0_0000;

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt(with_disk: bool) -> Vec<u8> {
    let (com1_io, com1_irq) = (
        aml::IO::new(0x3f8, 0x3f8, 1, 8),
        aml::Interrupt::new(true, true, false, false, SERIAL_IRQ),
    );
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &com1_crs),
    );
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    let (disk_mem, disk_irq) = (
        aml::Memory32Fixed::new(true, VIRTIO_MMIO_BASE as u32, 0x1000),
        aml::Interrupt::new(true, true, false, false, VIRTIO_IRQ),
    );
    let disk_crs = aml::ResourceTemplate::new(vec![&disk_mem, &disk_irq]);
    let disk_hid: aml::AmlStr = "LNRO0005";
    let (dhid, duid, dcrs) = (
        aml::Name::new("_HID".into(), &disk_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &disk_crs),
    );
    let disk = aml::Device::new("_SB_.V000".into(), vec![&dhid, &duid, &dcrs]);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM, TABLE, 1);
    com1.to_aml_bytes(&mut sdt);
    if with_disk {
        disk.to_aml_bytes(&mut sdt);
    }
    power_button(&mut sdt);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// The power button (`PNP0C0C`) and the Generic Event Device (`ACPI0013`) that signals
/// it: on the GED's interrupt the OS runs `_EVT`, which reads the event register at
/// [`GED_PORT`] (the read clears it) and, if the button's bit is set, notifies the button
/// (0x80: "pressed"), as the ACPI spec's GED and control method power button describe.
fn power_button(sdt: &mut Sdt) {
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let (phid, puid) = (
        aml::Name::new("_HID".into(), &pwrb_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
    );
    aml::Device::new("_SB_.PWRB".into(), vec![&phid, &puid]).to_aml_bytes(sdt);

    let ged_hid: aml::AmlStr = "ACPI0013";
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let (port, len) = (GED_PORT as usize, 1usize);
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let bit = crate::power_button::EVENT_POWER_BUTTON as usize;
    let (gdat, local0, local1) = (aml::Path::new("GDAT"), aml::Local(0), aml::Local(1));
    let read = aml::Store::new(&local0, &gdat);
    let masked = aml::And::new(&local1, &local0, &bit);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let pressed = 0x80usize;
    let notify = aml::Notify::new(&pwrb, &pressed);
    let is_set = aml::Equal::new(&local1, &bit);
    let when = aml::If::new(&is_set, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &masked, &when]);
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &ged_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
    );
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(sdt);
}

fn rsdp(xsdt: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM);
    r[15] = 2; // ACPI 2.0+: XSDT
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    r[8] = 0u8.wrapping_sub(sum(&r[..20]));
    r[32] = 0u8.wrapping_sub(sum(&r));
    r
}

/// Writes the tables into guest memory for `vcpus` processors; `with_disk` describes the
/// virtio-mmio disk in the DSDT (not when the command line announces it).
pub fn write_tables(mem: &GuestMem, vcpus: u8, with_disk: bool) -> Result<(), AcpiError> {
    let mut at = RSDP_ADDR + 0x40;
    let mut place = |data: &[u8]| -> Result<u64, AcpiError> {
        let addr = at;
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|error| AcpiError::Write {
                what: "tables",
                error,
            })?;
        at = (at + data.len() as u64 + 15) & !15;
        Ok(addr)
    };
    let dsdt_addr = place(&dsdt(with_disk))?;
    let fadt = FADTBuilder::new(OEM, TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .finalize();
    let fadt_addr = place(&bytes(&fadt))?;
    let mut madt = MADT::new(OEM, TABLE, 1, LocalInterruptController::Address(LAPIC));
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC, 0));
    let madt_addr = place(&bytes(&madt))?;
    let mut xsdt = XSDT::new(OEM, TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes(&xsdt))?;
    mem.write_slice(&rsdp(xsdt_addr), GuestAddress(RSDP_ADDR))
        .map_err(|error| AcpiError::Write {
            what: "RSDP",
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_have_valid_checksums_and_list_every_cpu() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&mem, 4, true).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert_eq!(
                sum(&t),
                0,
                "checksum of {:?}",
                String::from_utf8_lossy(&t[..4])
            );
            t
        };
        let x = read_table(xsdt);
        let entries: Vec<u64> = x[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let madt = entries
            .iter()
            .map(|a| read_table(*a))
            .find(|t| &t[..4] == b"APIC")
            .unwrap();
        let mut cpus = 0;
        let mut off = 44;
        while off < madt.len() {
            if madt[off] == 0 {
                cpus += 1;
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(cpus, 4);
        let fadt = entries
            .iter()
            .map(|a| read_table(*a))
            .find(|t| &t[..4] == b"FACP")
            .unwrap();
        let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let d = read_table(dsdt);
        assert!(d.windows(8).any(|w| w == b"LNRO0005"));
        assert!(d.windows(8).any(|w| w == b"ACPI0013"), "no GED in the DSDT");
        assert!(d.windows(4).any(|w| w == b"PWRB"), "no power button");
        assert!(d.windows(4).any(|w| w == b"_EVT"), "no GED event method");
    }

    #[test]
    fn without_the_disk_the_dsdt_still_has_the_power_button() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&mem, 1, false).unwrap();
        let d = dsdt(false);
        assert!(!d.windows(8).any(|w| w == b"LNRO0005"));
        assert!(d.windows(8).any(|w| w == b"ACPI0013"));
        assert_eq!(sum(&d), 0);
    }
}
