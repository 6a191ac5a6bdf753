//! What to run: the VM specification, from a JSON file or command-line flags.

use serde::{Deserialize, Serialize};

/// A VM to run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel: an ELF (vmlinux or our test guest) or a bzImage.
    pub kernel: String,
    /// Initramfs loaded with the kernel.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Record which guest pages are written (for live migration); costs a write fault
    /// per page per round.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The disk: a raw file path or an NBD URI (`nbd+unix:///vol?socket=...`,
    /// `nbds://host:port/vol` with TLS).
    #[serde(default)]
    pub disk: Option<String>,
    /// How an NBD disk connects: TLS credential files, request timeout.
    #[serde(default)]
    pub nbd: tessera_disk::NbdOptions,
    /// The NICs: virtio-net devices over taps (`crate::net`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::net::NicConfig>,
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1".into()
}
fn default_memory() -> u64 {
    128
}
fn default_vcpus() -> u8 {
    1
}
