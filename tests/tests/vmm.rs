//! tessera-vmm running our freestanding test guest under real KVM: the guest finds the
//! virtio-blk device as a driver would, writes, flushes, reads back, discards, reports
//! on the serial console and powers off. Checked from outside: the serial log and the
//! bytes on the disk (a raw file, or a Tessera volume read back with nbdcopy).

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;

use tessera_tests::{bin, output, require, run, StoreProcess};

const GUEST: &str = env!("TESSERA_TEST_GUEST");

/// Runs the VMM and returns its serial output; asserts a clean exit.
fn boot(disk: &str, cmdline: &str, serial: &Path) -> String {
    let out = output(
        Command::new(bin("tessera-vmm"))
            .args([
                "--kernel",
                GUEST,
                "--memory-mib",
                "64",
                "--disk",
                disk,
                "--cmdline",
                cmdline,
            ])
            .arg("--serial-out")
            .arg(serial),
    );
    let console = std::fs::read_to_string(serial).unwrap_or_default();
    assert!(
        out.status.success(),
        "tessera-vmm failed ({}):\nconsole:\n{console}\nlog:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    console
}

fn pattern(sector: u64, i: u64) -> u8 {
    (sector
        .wrapping_mul(131)
        .wrapping_add(i * 7)
        .wrapping_add(i >> 9)) as u8
}

fn check_disk(bytes: &[u8]) {
    for sector in [0u64, 8, 2048] {
        let at = (sector * 512) as usize;
        for i in 0..4096u64 {
            assert_eq!(
                bytes[at + i as usize],
                pattern(sector, i),
                "sector {sector} byte {i}"
            );
        }
    }
    assert!(
        bytes[64 * 512..64 * 512 + 4096].iter().all(|b| *b == 0),
        "discarded range is not zero"
    );
}

#[test]
fn test_guest_drives_virtio_blk_on_a_raw_file() {
    if !tessera_tests::kvm_or_skip("test_guest_drives_virtio_blk_on_a_raw_file") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    std::fs::write(&disk, vec![0xffu8; 16 << 20]).unwrap();
    let console = boot(
        disk.to_str().unwrap(),
        "console=ttyS0",
        &d.path().join("serial.log"),
    );
    assert!(console.contains("disk id: disk.raw"), "{console}");
    assert!(
        console.contains("TESSERA-GUEST: PASS writes=4 reads=4 discards=1"),
        "{console}"
    );
    check_disk(&std::fs::read(&disk).unwrap());
}

#[test]
fn test_guest_drives_virtio_blk_on_a_tessera_volume_over_nbd() {
    if !tessera_tests::kvm_or_skip("test_guest_drives_virtio_blk_on_a_tessera_volume_over_nbd") {
        return;
    }
    require("nbdcopy");
    let d = tempfile::tempdir().unwrap();
    let store = StoreProcess::start(&d.path().join("store"));
    store.create_volume("vm-100-disk-0", "16M");
    let uri = format!(
        "nbd+unix:///vm-100-disk-0?socket={}",
        store.nbd_sock.display()
    );
    let console = boot(&uri, "console=ttyS0", &d.path().join("serial.log"));
    assert!(console.contains("disk id: vm-100-disk-0"), "{console}");
    assert!(
        console.contains("TESSERA-GUEST: PASS writes=4 reads=4 discards=1"),
        "{console}"
    );
    let dump = d.path().join("dump.raw");
    run(Command::new("nbdcopy")
        .arg(store.uri("vm-100-disk-0"))
        .arg(&dump));
    check_disk(&std::fs::read(&dump).unwrap());
}

#[test]
fn a_lying_guest_gets_its_requests_failed_and_the_vmm_survives() {
    if !tessera_tests::kvm_or_skip("a_lying_guest_gets_its_requests_failed_and_the_vmm_survives") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let console = boot(
        disk.to_str().unwrap(),
        "console=ttyS0 tessera.mode=evil",
        &d.path().join("serial.log"),
    );
    assert!(
        console.contains("TESSERA-GUEST: PASS evil requests refused, device alive"),
        "{console}"
    );
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        bytes[..512].iter().all(|b| *b == 0),
        "a refused write reached the disk"
    );
    assert!(
        bytes[512..1024].iter().all(|b| *b == 0x42),
        "the good write after the bad ones is missing"
    );
}

#[test]
fn bad_vm_specs_are_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--kernel", "/nonexistent/vmlinux"],
            "opening kernel /nonexistent/vmlinux",
        ),
        (
            &["--kernel", GUEST, "--memory-mib", "1"],
            "1 MiB is too little",
        ),
        (&["--kernel", GUEST, "--disk", "nbd+unix:///x"], "socket"),
        (&["--kernel", "/etc/hostname"], "loading kernel"),
        (
            &["--kernel", GUEST, "--initrd", "/nonexistent/initrd"],
            "reading initramfs /nonexistent/initrd",
        ),
        (
            &["--kernel", GUEST, "--vcpus", "33"],
            "vcpus must be 1 to 32, not 33",
        ),
    ];
    for (args, needle) in cases {
        let out = output(
            Command::new(bin("tessera-vmm"))
                .args(args)
                .arg("--serial-out")
                .arg(d.path().join("s")),
        );
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn every_vm_gets_acpi_tables_listing_every_cpu_and_the_power_button() {
    if !tessera_tests::kvm_or_skip(
        "every_vm_gets_acpi_tables_listing_every_cpu_and_the_power_button",
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // One vCPU gets them too (the power button is described there).
    for n in [1u8, 2, 4] {
        let serial = d.path().join(format!("serial{n}.log"));
        let out = output(
            Command::new(bin("tessera-vmm"))
                .args([
                    "--kernel",
                    GUEST,
                    "--memory-mib",
                    "64",
                    "--cmdline",
                    "console=ttyS0 tessera.mode=acpi",
                ])
                .args(["--vcpus", &n.to_string()])
                .arg("--disk")
                .arg(&disk)
                .arg("--serial-out")
                .arg(&serial),
        );
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        assert!(
            out.status.success(),
            "{}\n{console}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            console.contains(&format!(
                "TESSERA-GUEST: ACPI cpus={n} hw_reduced=1 dsdt=1 ged=1"
            )),
            "{console}"
        );
    }
    let out = output(Command::new(bin("tessera-vmm")).args(["--kernel", GUEST, "--vcpus", "0"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus must be 1 to 32"));
}
