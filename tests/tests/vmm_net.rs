//! tessera-vmm's virtio-net on a real tap and bridge: the test guest, in a network
//! namespace of the test's own, announces itself with a gratuitous ARP (seen on the bridge
//! through a raw AF_PACKET socket), answers iputils `ping` from the bridge's address, and
//! ignores a frame for another MAC. One VM boot serves those checks; a second guest then
//! floods a tap of its own (the transmit ring kept full) and loses no frame.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
    SockType,
};
use nix::sys::time::TimeVal;
use tessera_tests::{bin, output, require, skip, wait_console};

const GUEST: &str = env!("TESSERA_TEST_GUEST");
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: &str = "10.0.0.2";

fn ip(args: &[&str]) {
    tessera_tests::run(Command::new("ip").args(args));
}

/// `ip -j link show NAME`'s ifindex.
fn ifindex(name: &str) -> usize {
    let out = tessera_tests::run(Command::new("ip").args(["-j", "link", "show", name]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["ifindex"].as_u64().unwrap() as usize
}

/// A raw socket seeing every frame of every interface of this namespace.
fn capture() -> OwnedFd {
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("AF_PACKET socket");
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000)).unwrap();
    fd
}

/// Waits up to `limit` for a frame on interface `index` that `want` accepts.
fn wait_frame(fd: &OwnedFd, index: usize, limit: Duration, want: impl Fn(&[u8]) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let Ok((n, from)) = recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) else {
            continue;
        };
        if from.map(|a| a.ifindex()) == Some(index) && want(&buf[..n]) {
            return true;
        }
    }
    false
}

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn ping(count: &str, wait: &str) -> bool {
    output(Command::new("ping").args(["-c", count, "-i", "0.2", "-W", wait, GUEST_IP]))
        .status
        .success()
}

#[test]
fn test_guest_on_a_tap_announces_itself_answers_ping_and_ignores_other_macs() {
    let test = "test_guest_on_a_tap_announces_itself_answers_ping_and_ignores_other_macs";
    if !tessera_tests::kvm_or_skip(test) {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        skip(test, "needs root to create a network namespace");
        return;
    }
    require("ip");
    require("ping");
    let vmm = bin("tessera-vmm");
    let dir = tempfile::tempdir().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Only this thread moves, and with it every process it starts.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            in_namespace(&vmm, dir.path());
        })
        .join()
        .unwrap();
    });
}

fn in_namespace(vmm: &Path, dir: &Path) {
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "br0", "type", "bridge"]);
    ip(&["addr", "add", "10.0.0.1/24", "dev", "br0"]);
    ip(&["link", "set", "br0", "up"]);
    ip(&["tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"]);
    ip(&["link", "set", "tap0", "master", "br0"]);
    ip(&["link", "set", "tap0", "up"]);
    let br0 = ifindex("br0");
    let cap = capture();

    // A tap that does not exist is refused, not created.
    let out = output(Command::new(vmm).args([
        "--kernel",
        GUEST,
        "--net",
        "tap=tap9,mac=52:54:00:12:34:56",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such tap device"), "{err}");
    assert!(
        !tessera_tests::run(Command::new("ip").args(["link", "show"])).contains("tap9"),
        "the VMM created a tap"
    );

    let serial = dir.join("serial.log");
    let log = std::fs::File::create(dir.join("vmm.log")).unwrap();
    let _vm = Vmm(Command::new(vmm)
        .args([
            "--kernel",
            GUEST,
            "--memory-mib",
            "64",
            "--cmdline",
            &format!("console=ttyS0 tessera.mode=net tessera.ip={GUEST_IP}"),
            "--net",
            "tap=tap0,mac=52:54:00:12:34:56",
        ])
        .arg("--serial-out")
        .arg(&serial)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap());
    let text = wait_console(&serial, "the guest's NIC", line_done("sent gratuitous ARP"));
    assert!(
        text.contains("TESSERA-GUEST: net up mac=52:54:00:12:34:56 ip=10.0.0.2"),
        "{text}"
    );

    // Guest to bridge: its gratuitous ARP (sender and target 10.0.0.2, from its MAC).
    let garp = wait_frame(&cap, br0, Duration::from_secs(20), |f| {
        f.len() >= 42
            && f[6..12] == MAC
            && f[12..14] == [0x08, 0x06]
            && f[28..32] == [10, 0, 0, 2]
            && f[38..42] == [10, 0, 0, 2]
    });
    assert!(garp, "no gratuitous ARP from the guest seen on br0");

    // Both ways: the kernel's ARP request and three echo requests answered.
    assert!(
        ping("3", "5"),
        "ping failed; console:\n{}\nvmm log:\n{}",
        console(&serial),
        std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default()
    );
    let text = console(&serial);
    assert!(
        text.contains("ARP request for me from 10.0.0.1, replied"),
        "{text}"
    );
    let echoes = text.matches("ICMP echo request from 10.0.0.1").count();
    assert!(echoes >= 3, "{echoes} echo requests answered:\n{text}");

    // A frame for another MAC reaches the guest (the bridge floods an unknown
    // destination) and is not answered.
    ip(&[
        "neigh",
        "replace",
        GUEST_IP,
        "lladdr",
        "52:54:00:99:99:99",
        "dev",
        "br0",
        "nud",
        "permanent",
    ]);
    assert!(
        !ping("2", "1"),
        "an echo request to another MAC was answered"
    );
    let text = wait_console(&serial, "the ignored frame", |t| {
        t.contains("frame for another MAC (52:54:00:99:99:99) ignored")
    });
    assert_eq!(
        text.matches("ICMP echo request from 10.0.0.1").count(),
        echoes,
        "{text}"
    );

    // The NIC still works afterwards.
    ip(&["neigh", "del", GUEST_IP, "dev", "br0"]);
    assert!(ping("1", "5"), "ping after the ignored frames failed");
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");

    a_full_transmit_ring_loses_no_frame(vmm, dir);
}

/// A console that holds a whole line ending in `end`, or a whole FAIL line: the console is
/// written a byte at a time, so a check on a part of a line could read its first half.
fn line_done(end: &str) -> impl Fn(&str) -> bool + '_ {
    move |t: &str| {
        t.contains(&format!("{end}\n"))
            || t.split_once("FAIL")
                .is_some_and(|(_, rest)| rest.contains('\n'))
    }
}

/// The kernel's count of frames `dev` received (what the VMM wrote into the tap).
fn rx_packets(dev: &str) -> u64 {
    let out = tessera_tests::run(Command::new("ip").args(["-j", "-s", "link", "show", dev]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

/// The flood mode (bench/net.sh's) keeps the transmit ring full, refilling it as frames
/// complete: every one of its frames reaches the tap, on a bridge of its own. A frame
/// length the guest cannot send is refused by the guest before it sends anything.
fn a_full_transmit_ring_loses_no_frame(vmm: &Path, dir: &Path) {
    ip(&["link", "add", "br1", "type", "bridge"]);
    ip(&["link", "set", "br1", "up"]);
    ip(&["tuntap", "add", "dev", "tap1", "mode", "tap", "vnet_hdr"]);
    ip(&["link", "set", "tap1", "master", "br1"]);
    ip(&["link", "set", "tap1", "up"]);
    let flood = |len: u32, name: &str| {
        let serial = dir.join(name);
        let vm = Vmm(Command::new(vmm)
            .args(["--kernel", GUEST, "--memory-mib", "32", "--cmdline"])
            .arg(format!(
                "console=ttyS0 tessera.mode=flood tessera.frames=3000 tessera.frame_len={len}"
            ))
            .args(["--net", "tap=tap1,mac=52:54:00:12:34:57", "--serial-out"])
            .arg(&serial)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap());
        let text = wait_console(&serial, "the flood's end", line_done("frames sent"));
        drop(vm);
        text
    };

    let before = rx_packets("tap1");
    let text = flood(59, "flood-bad.log");
    assert!(
        text.contains("FAIL tessera.frame_len= must be 60 to 1514"),
        "{text}"
    );
    assert_eq!(rx_packets("tap1"), before, "a refused flood sent frames");

    let text = flood(1514, "flood.log");
    assert!(
        text.contains("flood of 3000 frames of 1514 bytes")
            && text.contains("flood done, 3000 frames sent"),
        "{text}"
    );
    // The VMM wrote each frame before the guest saw it used; the count is the kernel's.
    assert_eq!(rx_packets("tap1") - before, 3000);
}
