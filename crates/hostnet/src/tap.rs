//! Tap devices for VM NICs: opened with the flags virtio-net needs (`IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`), then given the VM's MAC, Tessera's mark and the network's bridge, and
//! brought up, through rtnetlink. The tap is not persistent: it lives as long as its fd,
//! so it goes away with the VMM that holds it.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rtnetlink::LinkUnspec;

use crate::names::{tap_name, TAP_MARK_PREFIX};

nix::ioctl_write_ptr_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);

/// A NIC of a VM on a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapSpec {
    pub vm: String,
    /// The NIC's index in the VM (names the tap).
    pub nic: u16,
    /// The VM's MAC for this NIC (unicast, not all zero).
    pub mac: [u8; 6],
    /// The bridge of the network the NIC is on.
    pub bridge: String,
}

/// An open tap: the interface exists while this (or its fd) is alive.
#[derive(Debug)]
pub struct Tap {
    name: String,
    fd: OwnedFd,
}

impl Tap {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fd the VMM reads and writes frames (with a virtio-net header) on.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("MAC {0}: must be a unicast, non-zero address")]
    BadMac(String),
    #[error("bridge {0}: no such interface")]
    NoBridge(String),
    #[error("tap {0}: an interface of that name exists already; left alone")]
    Exists(String),
    #[error("opening /dev/net/tun: {0}")]
    Open(#[source] std::io::Error),
    #[error("creating tap {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("tap {name}: {message}")]
    Netlink { name: String, message: String },
}

/// The tap's own MAC: the VM's with the first byte `fe` (as libvirt does). Never the
/// VM's own: a bridge port's address is a local address of the bridge, so frames to the
/// VM's MAC would be taken by the host instead of forwarded to the guest; and `fe` keeps
/// the bridge (which takes its lowest port address) from taking the guests' MACs. A VM
/// MAC that itself starts with `fe` (a cluster prefix can: it is a hash) gets `fc`: the
/// tap would otherwise carry the guest's own MAC and swallow every frame sent to it.
pub fn tap_mac(vm_mac: &[u8; 6]) -> [u8; 6] {
    let mut m = *vm_mac;
    m[0] = if vm_mac[0] == 0xfe { 0xfc } else { 0xfe };
    m
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Creates the tap of `spec` on its bridge, up, with [`tap_mac`] of the VM's MAC and the mark
/// `tessera-tap:<vm>/<nic>`. Refuses a name that exists (it may be someone else's).
pub async fn create_tap(spec: &TapSpec) -> Result<Tap, TapError> {
    if spec.mac[0] & 1 != 0 || spec.mac == [0; 6] {
        return Err(TapError::BadMac(format_mac(&spec.mac)));
    }
    let name = tap_name(&spec.vm, spec.nic);
    let nl = |e: rtnetlink::Error| TapError::Netlink {
        name: name.clone(),
        message: e.to_string(),
    };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| TapError::Netlink {
        name: name.clone(),
        message: e.to_string(),
    })?;
    let conn = tokio::spawn(conn);
    let result = async {
        let links = crate::netlink::list(&handle)
            .await
            .map_err(|e| TapError::Netlink {
                name: name.clone(),
                message: e.to_string(),
            })?;
        if links.iter().any(|l| l.name == name) {
            return Err(TapError::Exists(name.clone()));
        }
        let bridge = links
            .iter()
            .find(|l| l.name == spec.bridge)
            .ok_or_else(|| TapError::NoBridge(spec.bridge.clone()))?
            .index;

        let fd = open_tap(&name)?;
        let index = crate::netlink::list(&handle)
            .await
            .map_err(|e| TapError::Netlink {
                name: name.clone(),
                message: e.to_string(),
            })?
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.index)
            .ok_or_else(|| TapError::Netlink {
                name: name.clone(),
                message: "not listed after creation".into(),
            })?;
        // One request: the kernel applies address, bridge, alias and up together, and
        // on failure the fd is dropped here, which deletes the tap again.
        let msg = LinkUnspec::new_with_index(index)
            .address(tap_mac(&spec.mac).to_vec())
            .controller(bridge)
            .alias(format!("{TAP_MARK_PREFIX}{}/{}", spec.vm, spec.nic))
            .up()
            .build();
        handle.link().set(msg).execute().await.map_err(nl)?;
        tracing::info!(tap = %name, bridge = %spec.bridge, mac = %format_mac(&spec.mac), "tap up");
        Ok(Tap {
            name: name.clone(),
            fd,
        })
    }
    .await;
    conn.abort();
    result
}

fn open_tap(name: &str) -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    // SAFETY: ifreq is plain data (byte arrays, integers, a raw pointer); all zeroes is
    // a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // `name` comes from `tap_name`: ASCII, at most 15 bytes, so the terminating NUL of
    // the 16-byte field stays.
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    // The flags fit a c_short (IFF_VNET_HDR is 0x4000).
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is an open /dev/net/tun; TUNSETIFF reads one ifreq through the
    // pointer, which points at `req`, alive for the call.
    unsafe { tunsetiff(file.as_raw_fd(), &req) }.map_err(|source| TapError::Create {
        name: name.into(),
        source,
    })?;
    Ok(OwnedFd::from(file))
}

/// Makes the child `cmd` starts inherit the open fds `fds` (taps, for the VMM's
/// `--net fd=N`) under the same numbers: their close-on-exec flag is cleared in the child,
/// after the fork, so the parent's fds stay close-on-exec and no other child gets them.
pub fn inherit_in_child(cmd: &mut Command, fds: Vec<RawFd>) {
    let hook = move || -> std::io::Result<()> {
        for &fd in &fds {
            // SAFETY: fcntl on an fd number only reads and sets that fd's flags; an fd
            // that is not open fails with EBADF, reported below.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            // SAFETY: as above.
            if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it calls fcntl (async-signal-safe), reads the
    // vector moved into it, and allocates nothing (an OS error is a plain code).
    unsafe { cmd.pre_exec(hook) };
}

#[cfg(test)]
mod mac_tests {
    #[test]
    fn a_tap_never_carries_its_vms_mac() {
        let vm = [0x02, 0xac, 0x8a, 0x59, 0x94, 0xa3];
        assert_eq!(super::tap_mac(&vm), [0xfe, 0xac, 0x8a, 0x59, 0x94, 0xa3]);
        let fe = [0xfe, 0xac, 0x8a, 0x59, 0x94, 0xa3];
        assert_eq!(super::tap_mac(&fe), [0xfc, 0xac, 0x8a, 0x59, 0x94, 0xa3]);
        for first in (0u8..=255).filter(|b| b & 1 == 0) {
            let m = [first, 1, 2, 3, 4, 5];
            assert_ne!(super::tap_mac(&m), m);
        }
    }
}
