//! Builds the freestanding test guest (tests/guest) into an ELF the VMM boots. Uses the
//! system C compiler and linker; no Rust target other than the host's is needed.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = PathBuf::from("guest");
    for f in ["guest.c", "entry.S", "guest.ld"] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    let flags = [
        "-ffreestanding",
        "-fno-pic",
        "-fno-pie",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-mno-red-zone",
        "-mgeneral-regs-only",
        "-mcmodel=small",
        "-O2",
        "-Wall",
        "-Werror",
        "-c",
    ];
    run(Command::new("cc")
        .args(flags)
        .arg(src.join("entry.S"))
        .arg("-o")
        .arg(out.join("entry.o")));
    run(Command::new("cc")
        .args(flags)
        .arg(src.join("guest.c"))
        .arg("-o")
        .arg(out.join("guest.o")));
    let elf = out.join("tessera-test-guest.elf");
    run(Command::new("ld")
        .args(["-nostdlib", "-static", "-no-pie", "-z", "noexecstack", "-T"])
        .arg(src.join("guest.ld"))
        .arg(out.join("entry.o"))
        .arg(out.join("guest.o"))
        .arg("-o")
        .arg(&elf));
    println!("cargo:rustc-env=TESSERA_TEST_GUEST={}", elf.display());
}
