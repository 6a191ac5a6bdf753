//! tessera-vmm: one KVM virtual machine per process.
//!
//! It boots a kernel with a serial console, a virtio-blk disk (a file or an NBD
//! volume) and virtio-net NICs over taps, and reports why the guest stopped. The VMM never talks to the cluster: it is
//! told what to run. It also pauses, snapshots, restores, tracks dirty pages and
//! live-migrates (sends its VM to, or receives one from, another `tessera-vmm`) on
//! request through its control socket (see docs/vmm.md).
//!
//! KVM needs `unsafe` in three places (guest memory slots, the vCPU kick signal, XSAVE
//! restore) and taps a few more (the tun ioctls, taking over an inherited fd, in `net`);
//! each says why it is sound, and clippy refuses one that does not.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod net;
pub mod power_button;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
