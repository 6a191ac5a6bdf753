//! The limits the API enforces, in one place: the server checks them, the schema states
//! them (as `minimum`, `maximum`, `pattern`, `minLength`, `maxLength` keywords; the
//! attributes repeat the literals, and the tests below keep the two in step).

use std::ops::RangeInclusive;

/// Virtual CPUs of a VM.
pub const VCPUS: RangeInclusive<u32> = 1..=32;
/// Memory of a VM, MiB.
pub const MEMORY_MIB: RangeInclusive<u64> = 16..=1 << 20;
/// Volumes attached to one VM.
pub const MAX_DISKS: usize = 16;
/// Networks (NICs) of one VM.
pub const MAX_NETWORKS: usize = 8;
/// Kernel path and command line, characters.
pub const MAX_KERNEL_CHARS: usize = 4096;
/// Lifetime of an API token, seconds (60 s to 366 days).
pub const TOKEN_LIFETIME_S: RangeInclusive<u64> = 60..=366 * 24 * 3600;
/// Characters of a password.
pub const PASSWORD_CHARS: RangeInclusive<usize> = 12..=1024;
/// Largest volume, bytes: 64 TiB (the store's limit).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Volume sizes are multiples of this.
pub const VOLUME_BLOCK: u64 = 4096;
/// VLAN ids.
pub const VLAN: RangeInclusive<u16> = 1..=4094;
/// Events a listing returns at most.
pub const MAX_EVENTS: usize = 10_000;

/// Names of volumes, snapshots, VMs and networks (also URL, file and NBD export names).
pub const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9-]{0,62}$";
/// User names.
pub const USERNAME_PATTERN: &str = "^[a-z0-9][a-z0-9._-]{0,62}$";
/// Linux interface names (bridges, uplinks).
pub const IFNAME_PATTERN: &str = "^[a-z0-9._-]{1,15}$";
/// Passwords: no control characters (they cannot be typed back at a prompt).
pub const PASSWORD_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";

/// Whether `v` is a name (`extra` are the bytes allowed besides `[a-z0-9-]`).
pub fn is_name(v: &str, extra: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || extra.contains(&b)
        })
}

/// Whether `v` is a Linux interface name we accept.
pub fn is_ifname(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 15
        && v.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
}

/// Whether `pw` may be a password: its length in characters, and no control characters.
pub fn is_password(pw: &str) -> bool {
    PASSWORD_CHARS.contains(&pw.chars().count()) && !pw.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_their_patterns() {
        assert!(is_name("vm-100", &[]));
        for bad in ["", "-a", "A", "a/b", "a b", &"x".repeat(64), "a.b"] {
            assert!(!is_name(bad, &[]), "{bad}");
        }
        assert!(is_name("j.doe_2", b"._"));
        assert!(is_ifname("br-lan.7"));
        assert!(!is_ifname("br-lan-too-long-x"));
    }

    #[test]
    fn passwords_have_no_control_characters() {
        assert!(is_password("correct horse battery"));
        assert!(!is_password("short"));
        assert!(!is_password("twelve chars\n"));
        assert!(!is_password("twelve chars\u{85}"));
        assert!(!is_password(&"x".repeat(1025)));
    }
}
