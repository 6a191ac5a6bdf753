//! The VM's NICs: virtio-net devices over taps, and the I/O thread that moves their frames.
//!
//! A NIC's tap is either opened by name (it must exist already: the VMM never creates
//! interfaces, whoever starts it puts the tap on its bridge) or handed over as an inherited
//! fd (a non-persistent tap whose creator keeps it alive only through us). Either way it is
//! used with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte virtio-net header
//! (`TUNSETVNETHDRSZ`) and the offloads the guest negotiated (`TUNSETOFFLOAD`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tessera_virtio::mmio::MmioTransport;
use tessera_virtio::net::{NetBackend, NetWorker, Rx, VNET_HDR_LEN};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Most NICs a VM may have (one interrupt line each, see [`crate::layout::NIC_IRQS`]).
pub const MAX_NICS: usize = crate::layout::NIC_IRQS.len();

/// One NIC of the VM spec: its MAC and where its tap comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// The MAC the guest sees (`52:54:00:12:34:56`): unicast, not all zero.
    pub mac: String,
    /// An existing tap, opened by name.
    #[serde(default)]
    pub tap: Option<String>,
    /// An open tap fd this process inherited.
    #[serde(default)]
    pub fd: Option<i32>,
}

/// Why a NIC could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// `--net` is not `tap=NAME,mac=MAC` or `fd=N,mac=MAC`.
    #[error("--net {0:?}: expected tap=NAME,mac=MAC or fd=N,mac=MAC")]
    Syntax(String),
    /// The MAC is not six hex bytes, or is multicast or all zero.
    #[error("MAC {0:?}: must be six hex bytes (aa:bb:cc:dd:ee:ff), unicast, not all zero")]
    Mac(String),
    /// Too many NICs.
    #[error("at most {MAX_NICS} NICs, not {0}")]
    TooMany(usize),
    /// The same tap or fd named twice.
    #[error("NIC {0} named twice")]
    Duplicate(String),
    /// The tap does not exist or is not a tap.
    #[error("tap {0}: no such tap device (the VMM opens existing taps only)")]
    NoTap(String),
    /// The fd is not an open tap with a virtio-net header.
    #[error("fd {fd}: {why}")]
    BadFd {
        /// The fd.
        fd: i32,
        /// What is wrong with it.
        why: String,
    },
    /// A tap ioctl or open failed.
    #[error("tap {name}: {what}: {error}")]
    Tap {
        /// The tap.
        name: String,
        /// Which step.
        what: &'static str,
        /// Why.
        error: std::io::Error,
    },
}

impl NicConfig {
    /// Parses `tap=NAME,mac=MAC` or `fd=N,mac=MAC` (keys in any order).
    pub fn parse(s: &str) -> Result<NicConfig, NicError> {
        let (mut mac, mut tap, mut fd) = (None, None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| NicError::Syntax(s.into()))?;
            match k {
                "mac" if mac.is_none() => mac = Some(v.to_string()),
                "tap" if tap.is_none() && !v.is_empty() => tap = Some(v.to_string()),
                "fd" if fd.is_none() => {
                    fd = Some(v.parse().map_err(|_| NicError::Syntax(s.into()))?)
                }
                _ => return Err(NicError::Syntax(s.into())),
            }
        }
        let nic = NicConfig {
            mac: mac.ok_or_else(|| NicError::Syntax(s.into()))?,
            tap,
            fd,
        };
        nic.check()?;
        Ok(nic)
    }

    /// Checks the MAC and that exactly one of `tap` and `fd` is given.
    pub fn check(&self) -> Result<[u8; 6], NicError> {
        if self.tap.is_some() == self.fd.is_some() {
            return Err(NicError::Syntax(format!("{self:?}")));
        }
        if let Some(t) = &self.tap {
            if t.len() > 15 || t.contains('/') || t.contains('\0') {
                return Err(NicError::NoTap(t.clone()));
            }
        }
        parse_mac(&self.mac)
    }
}

/// Six hex bytes separated by ':', unicast and not zero.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NicError> {
    let bad = || NicError::Mac(s.into());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(bad());
    }
    Ok(mac)
}

/// Checks a VM's NICs: their count, MACs, and no tap or fd twice.
pub fn check_all(nics: &[NicConfig]) -> Result<(), NicError> {
    if nics.len() > MAX_NICS {
        return Err(NicError::TooMany(nics.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for n in nics {
        n.check()?;
        let key = match (&n.tap, n.fd) {
            (Some(t), _) => format!("tap={t}"),
            (None, fd) => format!("fd={fd:?}"),
        };
        if !seen.insert(key.clone()) {
            return Err(NicError::Duplicate(key));
        }
    }
    Ok(())
}

/// A tap with a virtio-net header, non-blocking.
pub struct Tap {
    name: String,
    file: File,
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name and the flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn io_err(what: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> NicError {
    let name = name.to_string();
    move |error| NicError::Tap { name, what, error }
}

const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

impl Tap {
    /// Opens the NIC's tap.
    pub fn open(nic: &NicConfig) -> Result<Tap, NicError> {
        match (&nic.tap, nic.fd) {
            (Some(name), None) => Tap::by_name(name),
            (None, Some(fd)) => Tap::from_fd(fd),
            _ => Err(NicError::Syntax(format!("{nic:?}"))),
        }
    }

    fn by_name(name: &str) -> Result<Tap, NicError> {
        // TUNSETIFF would create a tap of a name that does not exist: only taps that do
        // (asked of the kernel, not /sys, which may show another network namespace). An
        // interface of that name that is not a tap makes TUNSETIFF fail.
        let cname = std::ffi::CString::new(name).map_err(|_| NicError::NoTap(name.into()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string, alive for the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(NicError::NoTap(name.into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(io_err("opening /dev/net/tun", name))?;
        let mut req = IfReq::default();
        // The name is at most 15 bytes (checked), so the terminating NUL stays.
        for (d, s) in req.name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        req.flags = TAP_FLAGS as libc::c_short;
        // SAFETY: TUNSETIFF reads one `struct ifreq` (40 bytes: the name and a union whose
        // first member is the flags), which `IfReq` lays out, alive for the call.
        let r = unsafe { ioctl_with_ref(&file, libc::TUNSETIFF as _, &req) };
        if r < 0 {
            return Err(io_err("TUNSETIFF", name)(std::io::Error::last_os_error()));
        }
        Tap::set_up(name.to_string(), file)
    }

    fn from_fd(fd: i32) -> Result<Tap, NicError> {
        let bad = |why: &str| NicError::BadFd {
            fd,
            why: why.into(),
        };
        if fd < 3 {
            return Err(bad("not a tap (standard streams are not taps)"));
        }
        // SAFETY: F_GETFD only asks whether `fd` is open; it changes nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad("not open"));
        }
        // SAFETY: the fd is open (checked) and was handed to this process for this NIC;
        // check_all refused it being named twice, so it has exactly one owner from here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let file = File::from(owned);
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which is large enough.
        let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF as _, &mut req) };
        if r < 0 {
            return Err(bad("not a tun/tap fd (TUNGETIFF failed)"));
        }
        if libc::c_int::from(req.flags) & TAP_FLAGS != TAP_FLAGS {
            return Err(bad(
                "not a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR",
            ));
        }
        let name = String::from_utf8_lossy(&req.name)
            .trim_end_matches('\0')
            .to_string();
        // SAFETY: F_GETFL/F_SETFL on an fd we own change only its file status flags.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(bad("could not make it non-blocking"));
            }
        }
        Tap::set_up(name, file)
    }

    fn set_up(name: String, file: File) -> Result<Tap, NicError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, alive for the call.
        let r = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ as _, &size) };
        if r < 0 {
            return Err(io_err("TUNSETVNETHDRSZ", &name)(
                std::io::Error::last_os_error(),
            ));
        }
        let tap = Tap { name, file };
        tap.set_offload(0)
            .map_err(io_err("TUNSETOFFLOAD", &tap.name))?;
        Ok(tap)
    }

    /// The tap's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    fn send(&self, packet: &[u8]) -> std::io::Result<()> {
        let n = (&self.file).write(packet)?;
        if n != packet.len() {
            return Err(std::io::Error::other("short write to the tap"));
        }
        Ok(())
    }

    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

const KICK: u64 = 0;
const TAP: u64 = 1;

/// Runs a NIC's frames until the kick eventfd fails (the VMM is going away): a kick (the
/// driver notified a queue) sends what the transmit queue holds and fills the receive
/// queue; the tap becoming readable fills the receive queue. The tap is watched
/// edge-triggered: when the guest has no buffer the frames wait in the tap (which drops
/// beyond its queue length) until the driver's next notification.
pub fn io_loop(
    t: Arc<Mutex<MmioTransport>>,
    mut worker: NetWorker,
    kick: EventFd,
    tap: Arc<Tap>,
) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        kick.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KICK),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        tap.file.as_raw_fd(),
        EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP),
    )?;
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in events.iter().take(n) {
            if ev.data() == KICK {
                match kick.read() {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                worker
                    .transmit_on(&t)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            let rx: Rx = worker
                .receive_on(&t)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            tracing::trace!(?rx, "virtio-net receive pass");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nic_flags_parse_and_refuse() {
        let n = NicConfig::parse("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.check().unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(
            NicConfig::parse("mac=02:00:00:00:00:01,fd=7").unwrap().fd,
            Some(7)
        );
        for bad in [
            "tap=tap0",
            "mac=52:54:00:12:34:56",
            "tap=tap0,fd=3,mac=52:54:00:12:34:56",
            "tap=tap0,mac=01:00:00:00:00:01",
            "tap=tap0,mac=00:00:00:00:00:00",
            "tap=tap0,mac=52:54:00:12:34",
            "tap=tap0,mac=52:54:00:12:34:56:78",
            "tap=tap0,mac=52:54:00:12:34:5g",
            "tap=a-name-longer-than-15,mac=52:54:00:12:34:56",
            "tap=tap0,mac=52:54:00:12:34:56,speed=10",
            "tap=,mac=52:54:00:12:34:56",
        ] {
            assert!(NicConfig::parse(bad).is_err(), "{bad} accepted");
        }
        let a = NicConfig::parse("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert!(matches!(
            check_all(&[a.clone(), a.clone()]),
            Err(NicError::Duplicate(_))
        ));
        assert!(matches!(
            check_all(&vec![a; MAX_NICS + 1]),
            Err(NicError::TooMany(_))
        ));
    }

    #[test]
    fn a_tap_that_does_not_exist_is_not_created() {
        let n = NicConfig::parse("tap=tsr-no-such0,mac=52:54:00:12:34:56").unwrap();
        assert!(matches!(Tap::open(&n), Err(NicError::NoTap(_))));
        let f = NicConfig::parse("fd=1,mac=52:54:00:12:34:56").unwrap();
        assert!(matches!(Tap::open(&f), Err(NicError::BadFd { .. })));
    }
}
