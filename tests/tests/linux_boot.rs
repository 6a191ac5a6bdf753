//! A stock Debian kernel (linux-image-cloud-amd64) with a busybox initramfs boots on
//! tessera-vmm, reaches init on the serial console, and uses /dev/vda.
//!
//! This needs hardware virtualization: on our paravirtual-KVM test machines a stock
//! kernel dies in emulation (see shared/guide/test-environment.md), so the test prints a
//! SKIP line there. It is written to pass on the machines our users run.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_tests::{bin, output, run};

fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn cloud_kernel() -> Option<(PathBuf, String)> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("vmlinuz-")
                    && n.to_string_lossy().ends_with("-cloud-amd64")
            })
        })
        .collect();
    found.sort();
    let k = found.pop()?;
    let version = k
        .file_name()?
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    Some((k, version))
}

/// Copies a module into the initramfs, decompressing it if Debian shipped it compressed.
fn add_module(root: &Path, modules: &Path, rel: &str) -> Option<String> {
    let name = Path::new(rel).file_name()?.to_string_lossy().to_string();
    for ext in ["", ".xz", ".zst"] {
        let src = modules.join(format!("{rel}{ext}"));
        if !src.exists() {
            continue;
        }
        let dst = root.join(&name);
        match ext {
            "" => {
                std::fs::copy(&src, &dst).ok()?;
            }
            ".xz" => {
                let out = output(Command::new("xz").arg("-dc").arg(&src));
                std::fs::write(&dst, out.stdout).ok()?;
            }
            _ => {
                let out = output(Command::new("zstd").arg("-dc").arg(&src));
                std::fs::write(&dst, out.stdout).ok()?;
            }
        }
        return Some(name);
    }
    None // built into the kernel
}

#[test]
fn stock_linux_boots_to_init_and_uses_its_virtio_disk() {
    if !hardware_virtualization() {
        tessera_tests::skip(
            "stock_linux_boots_to_init_and_uses_its_virtio_disk",
            "no hardware virtualization (/proc/cpuinfo has no vmx or svm flag), so a stock Linux guest cannot boot under this KVM",
        );
        return;
    }
    let (kernel, version) = cloud_kernel()
        .expect("linux-image-cloud-amd64 is installed by tests/setup on machines with vmx/svm");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("initramfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static is installed by tests/setup");
    let modules = PathBuf::from(format!("/lib/modules/{version}/kernel"));
    let mut insmods = String::new();
    for rel in [
        "drivers/virtio/virtio.ko",
        "drivers/virtio/virtio_ring.ko",
        "drivers/virtio/virtio_mmio.ko",
        "drivers/block/virtio_blk.ko",
    ] {
        if let Some(name) = add_module(&root, &modules, rel) {
            insmods.push_str(&format!("/bin/busybox insmod /{name} || true\n"));
        }
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /proc /sys /dev\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         /bin/busybox mount -t devtmpfs devtmpfs /dev\n\
         echo TESSERA-LINUX: init reached\n\
         {insmods}\
         /bin/busybox sleep 1\n\
         echo tessera-linux-was-here | /bin/busybox dd of=/dev/vda bs=512 conv=sync 2>/dev/null\n\
         /bin/busybox sync\n\
         if /bin/busybox dd if=/dev/vda bs=512 count=1 2>/dev/null | /bin/busybox grep -q tessera-linux-was-here; then echo TESSERA-LINUX: vda ok; fi\n\
         /bin/busybox reboot -f\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    run(Command::new("chmod").arg("+x").arg(root.join("init")));
    let cpio = d.path().join("initramfs.cpio.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc 2>/dev/null | gzip > {}",
        root.display(),
        cpio.display()
    )));
    let disk = d.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let serial = d.path().join("serial.log");
    let out = output(
        Command::new("timeout")
            .arg("300")
            .arg(bin("tessera-vmm"))
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&cpio)
            .args([
                "--memory-mib",
                "512",
                "--cmdline",
                "console=ttyS0 reboot=k panic=1 rdinit=/init",
            ])
            .arg("--disk")
            .arg(&disk)
            .arg("--serial-out")
            .arg(&serial),
    );
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        out.status.success(),
        "VMM failed: {}\n{console}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(console.contains("TESSERA-LINUX: init reached"), "{console}");
    assert!(console.contains("TESSERA-LINUX: vda ok"), "{console}");
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        bytes.starts_with(b"tessera-linux-was-here"),
        "the guest's write is not on the disk"
    );
}
