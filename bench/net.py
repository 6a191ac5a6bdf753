#!/usr/bin/env python3
"""virtio-net guest-to-bridge packet rate and throughput (see net.sh); prints Markdown.

Runs inside a private network and mount namespace (net.sh starts it with unshare), so
every frame stays in interfaces this script made. Two paths, measured alternately:
  - the test guest in tessera.mode=flood: its frames go guest -> virtio-net ->
    tessera-vmm's I/O thread -> tap0 -> bridge tsbench0;
  - the reference: a host process sending the same frames on one end of a veth pair
    whose other end is in bridge tsbench1 (AF_PACKET, one send() per frame, as the VMM
    does one write() per frame).
The reference sender is Python: its rate is bounded by the interpreter as much as by the
kernel's veth and bridge, so it is a lower bound of what the host path can carry, and a
veth gives no back-pressure (frames past the receive backlog are dropped: the report
counts only frames received). Each is timed on the receiving port's counters (tap0 rx, vethb rx), polled every 1 ms:
from the first frame counted to the last, so process start-up is not in the rate. The
bridge's own rx counter checks that every frame crossed the bridge.
"""
import os, socket, statistics, subprocess, sys, time

VMM, GUEST = sys.argv[1:3]
FRAMES = int(os.environ.get("FRAMES", "200000"))
REPEAT = int(os.environ.get("REPEAT", "3"))
LENS = [int(x) for x in os.environ.get("LENS", "60,1514").split(",")]
WORK = os.environ.get("WORK", "/tmp")
MAC = "52:54:00:12:34:56"


def sh(*args):
    subprocess.run(args, check=True)


def counter(dev, what):
    with open(f"/sys/class/net/{dev}/statistics/{what}") as f:
        return int(f.read())


def setup():
    sh("ip", "link", "set", "lo", "up")
    for br in ("tsbench0", "tsbench1"):
        sh("ip", "link", "add", br, "type", "bridge")
        sh("ip", "link", "set", br, "up")
    sh("ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr")
    sh("ip", "link", "set", "tap0", "master", "tsbench0")
    sh("ip", "link", "set", "tap0", "up")
    sh("ip", "link", "add", "vetha", "type", "veth", "peer", "name", "vethb")
    sh("ip", "link", "set", "vethb", "master", "tsbench1")
    sh("ip", "link", "set", "vethb", "up")
    sh("ip", "link", "set", "vetha", "up")
    # The kernel's own IPv6 chatter (router solicitations) would be counted too.
    for dev in ("tsbench0", "tsbench1", "tap0", "vetha", "vethb"):
        with open(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "w") as f:
            f.write("1")


def timed(port, bridge, n, proc, limit=300):
    """Polls port's rx_packets until n more frames arrived or proc ended; returns
    (frames/s from the first frame counted to the last, frames counted, bridge frames)."""
    p0, b0 = counter(port, "rx_packets"), counter(bridge, "rx_packets")
    t_first = c_first = None
    t0 = time.time()
    while True:
        c = counter(port, "rx_packets") - p0
        now = time.time()
        if c and t_first is None:
            t_first, c_first = now, c
        if c >= n or (proc.poll() is not None and counter(port, "rx_packets") - p0 == c):
            break
        if now - t0 > limit:
            proc.kill()
            raise RuntimeError(f"{port}: {c} of {n} frames in {limit} s")
        time.sleep(0.001)
    proc.wait()
    got = counter(port, "rx_packets") - p0
    rate = (got - c_first) / (now - t_first) if t_first and now > t_first else 0.0
    return rate, got, counter(bridge, "rx_packets") - b0


def guest(n, length, i):
    out = f"{WORK}/flood-{length}-{i}.console"
    p = subprocess.Popen([VMM, "--kernel", GUEST, "--memory-mib", "32", "--cmdline",
                          f"console=ttyS0 tessera.mode=flood tessera.frames={n} tessera.frame_len={length}",
                          "--net", f"tap=tap0,mac={MAC}", "--serial-out", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = timed("tap0", "tsbench0", n, p)
    text = open(out, errors="replace").read()
    if f"flood done, {n} frames sent" not in text:
        raise RuntimeError(f"the guest did not finish its flood:\n{text}")
    return r


# The reference sender, in its own process as the VMM is.
SENDER = """
import socket, sys
n, length = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("vetha", 0))
frame = b"\\xff" * 6 + bytes.fromhex("525400123457") + b"\\x88\\xb5" + bytes(length - 14)
send = s.send
for _ in range(n):
    send(frame)
"""


def veth(n, length):
    p = subprocess.Popen([sys.executable, "-c", SENDER, str(n), str(length)])
    return timed("vethb", "tsbench1", n, p)


setup()
results = {}
for length in LENS:
    g, v = [], []
    for i in range(REPEAT):
        # Alternated, so a change in the machine's load hits both alike.
        g.append(guest(FRAMES, length, i))
        v.append(veth(FRAMES, length))
        print(f"(frame {length} B, round {i + 1}: guest {g[-1][0]:.0f}/s, veth {v[-1][0]:.0f}/s)",
              file=sys.stderr, flush=True)
    results[length] = (g, v)

med = lambda rs: statistics.median(r[0] for r in rs)
print(f"| frame (bytes on the wire, no FCS) | test guest -> virtio-net -> tap -> bridge | reference: process -> veth -> bridge | ratio guest / veth |")
print("|---|---:|---:|---:|")
for length, (g, v) in results.items():
    gm, vm = med(g), med(v)
    # Each round's guest run and veth run are neighbours in time: the ratio is taken per
    # round, then the median, so a burst of load elsewhere hits both sides of one ratio.
    paired = statistics.median(a[0] / b[0] for a, b in zip(g, v))
    print(f"| {length} B: frames/s (median of {REPEAT}) | {gm:,.0f} | {vm:,.0f} | {paired:.2f} |")
    print(f"| {length} B: MB/s | {gm * length / 1e6:.1f} | {vm * length / 1e6:.1f} | |")
print(f"\nThe ratio is the median of the {REPEAT} rounds' own ratios (guest and veth run back to back).")
print()
for length, (g, v) in results.items():
    lost_g = sum(FRAMES - r[1] for r in g)
    print(f"- {length} B: each run {FRAMES:,} frames; counted on tap0 / the bridge: "
          f"{', '.join(f'{r[1]}/{r[2]}' for r in g)} (guest), "
          f"{', '.join(f'{r[1]}/{r[2]}' for r in v)} (veth); frames the guest sent that tap0 did not count: {lost_g}")
