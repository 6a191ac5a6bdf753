//! What Tessera calls the interfaces it makes: bridges, VLAN interfaces and taps, each
//! within Linux's 15 bytes, the same on every node and every release.

/// Name prefix of the bridges Tessera derives from network names.
pub const BRIDGE_PREFIX: &str = "tsb-";
/// Name prefix of VLAN interfaces whose `<uplink>.<vid>` name would be too long.
pub const VLAN_PREFIX: &str = "tsv";
/// Name prefix of VM NIC taps.
pub const TAP_PREFIX: &str = "tsn-";
/// Alias prefix of taps: `tessera-tap:<vm>/<nic>`. Not
/// [`MARK_PREFIX`](crate::policy::MARK_PREFIX), so network reconciliation never counts a
/// VM's tap as a stale network interface.
pub const TAP_MARK_PREFIX: &str = "tessera-tap:";
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Whether the kernel would take `name` as an interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// FNV-1a: a stable hash for short name suffixes (same on every node and every release).
fn fnv1a(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for &b in *p {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The `attempt`-th candidate bridge name of a network: `tsb-<name>` when that fits,
/// else a cut name with a hash of the whole name (and of `attempt`, after a collision).
pub fn bridge_name(network: &str, attempt: u32) -> String {
    let room = IFNAME_MAX - BRIDGE_PREFIX.len();
    if attempt == 0 && network.len() <= room {
        return format!("{BRIDGE_PREFIX}{network}");
    }
    let h = fnv1a(&[network.as_bytes(), &attempt.to_le_bytes()]) & 0xffff;
    // 4 hex digits and a '-' after the cut; network names are ASCII, so any cut is a
    // character boundary.
    let cut = &network[..network.len().min(room - 5)];
    format!("{BRIDGE_PREFIX}{cut}-{h:04x}")
}

/// The VLAN sub-interface's name: `<uplink>.<vid>` as people expect, or `tsv<vid>-<hash>`
/// when that would pass 15 bytes.
pub fn vlan_name(uplink: &str, vid: u16) -> String {
    let plain = format!("{uplink}.{vid}");
    if plain.len() <= IFNAME_MAX {
        return plain;
    }
    let h = fnv1a(&[uplink.as_bytes()]);
    let mut s = format!("{VLAN_PREFIX}{vid}-{h:08x}");
    s.truncate(IFNAME_MAX);
    s
}

/// The tap of NIC `nic` of VM `vm`: `tsn-<vm>-<nic>` when that fits in 15 bytes, else the
/// VM name cut, with 4 hex digits of a hash of the whole name before the NIC index.
pub fn tap_name(vm: &str, nic: u16) -> String {
    let plain = format!("{TAP_PREFIX}{vm}-{nic}");
    if plain.len() <= IFNAME_MAX && vm.is_ascii() {
        return plain;
    }
    let h = fnv1a(&[vm.as_bytes()]) & 0xffff;
    let tail = format!("{h:04x}-{nic}");
    let room = IFNAME_MAX - TAP_PREFIX.len() - tail.len();
    let cut: String = vm
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(room)
        .collect();
    format!("{TAP_PREFIX}{cut}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_fifteen_bytes_and_are_stable() {
        for n in ["a", "lan", "abcdefghijk", "abcdefghijkl", &"x".repeat(63)] {
            for a in 0..4 {
                let b = bridge_name(n, a);
                assert!(b.len() <= IFNAME_MAX && b.starts_with(BRIDGE_PREFIX), "{b}");
                assert!(valid_ifname(&b));
                assert_eq!(b, bridge_name(n, a));
            }
        }
        assert_eq!(bridge_name("lan", 0), "tsb-lan");
        assert_ne!(
            bridge_name("abcdefghijkl", 0),
            bridge_name("abcdefghijkm", 0)
        );
        assert_eq!(vlan_name("eth0", 7), "eth0.7");
        assert_eq!(tap_name("web", 0), "tsn-web-0");
        for vm in ["web", "a-very-long-vm-name", "ünïcode-vm"] {
            for nic in [0, 7, 65535] {
                let t = tap_name(vm, nic);
                assert!(t.len() <= IFNAME_MAX && valid_ifname(&t), "{t}");
                assert!(t.ends_with(&format!("-{nic}")), "{t}");
            }
        }
        assert_ne!(
            tap_name("a-very-long-vm-name", 0),
            tap_name("a-very-long-vm-namf", 0)
        );
        let long = vlan_name("enx001122334455", 4094);
        assert!(
            long.len() <= IFNAME_MAX && long.starts_with("tsv4094-"),
            "{long}"
        );
    }
}
