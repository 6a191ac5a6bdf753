//! Boot images: a kernel, an optional initramfs and a default command line kept by the
//! cluster, so a VM names an image instead of a path on its node.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Largest upload (kernel and initramfs together), bytes: 256 MiB.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// One file of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageFile {
    /// Its size in bytes.
    pub size_bytes: u64,
    /// Its blake3 hash (64 hex digits); every copy is checked against it before use.
    pub blake3: String,
}

/// A node holding a verified copy of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageCopy {
    /// The node's id.
    pub node: String,
    /// The node's API address, where other nodes fetch the image's files.
    pub address: String,
}

/// A boot image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Name.
    pub name: String,
    /// The kernel (bzImage or ELF vmlinux, as `tessera-vmm --kernel` takes).
    pub kernel: ImageFile,
    /// The initramfs, if any.
    pub initrd: Option<ImageFile>,
    /// The command line a VM gets unless it names its own.
    pub cmdline: Option<String>,
    /// The nodes holding a verified copy (the node it was uploaded to first; every other
    /// node adds itself once it fetched and checked one).
    pub copies: Vec<ImageCopy>,
    /// Who uploaded it.
    pub uploaded_by: String,
    /// Being deleted (no VM may name it any more).
    #[serde(default)]
    pub deleting: bool,
    /// Uploaded (ms since the epoch).
    pub created_ms: u64,
}

/// The query of an upload; the body is the kernel's `kernel_bytes` bytes followed by the
/// initramfs (the rest of the body, if any).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ImageUpload {
    /// The image's name: 1-63 of a-z, 0-9, '-', starting with a letter or digit.
    #[param(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// How many bytes of the body are the kernel (at least 1); the rest is the initramfs.
    #[param(minimum = 1, maximum = 268435456)]
    pub kernel_bytes: u64,
    /// The default command line, at most 4096 characters.
    #[serde(default)]
    #[param(max_length = 4096)]
    pub cmdline: Option<String>,
}
