#!/usr/bin/env python3
"""Drives tessera-vmm with the test guest and prints a Markdown report (see vmm.sh)."""
import json, os, platform, re, socket, statistics, subprocess, sys, tempfile, time

VMM, GUEST = sys.argv[1], sys.argv[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def api(sock, op, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.01)
    s.sendall((json.dumps({"v": 1, "op": op}) + "\n").encode())
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    reply = json.loads(data)
    if "error" in reply:
        raise RuntimeError(f"{op}: {reply['error']}")
    return reply["ok"]


def wait_console(path, pred, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            text = open(path, errors="replace").read()
        except FileNotFoundError:
            text = ""
        if pred(text):
            return text
        time.sleep(0.005)
    raise RuntimeError(f"timeout waiting on {path}")


def counts(text):
    return [int(m) for m in re.findall(r"^count (\d+)$", text, re.M)]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


work = tempfile.mkdtemp(prefix="tessera-vmm-bench-", dir="/var/tmp")
out = []
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out.append(f"Run of {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} — {os.cpu_count()} cores ({cpu}), kernel {platform.release()}, "
           f"KVM {'with' if 'vmx' in open('/proc/cpuinfo').read() or 'svm' in open('/proc/cpuinfo').read() else 'without'} hardware virtualization.")
out.append("")

# 1. Memory overhead of a 1-vCPU 128 MiB guest.
sock, con = f"{work}/m.sock", f"{work}/m.log"
p = subprocess.Popen([VMM, "--kernel", GUEST, "--memory-mib", "128", "--cmdline", "console=ttyS0 tessera.mode=count",
                      "--api-socket", sock, "--serial-out", con], stderr=subprocess.DEVNULL)
wait_console(con, lambda t: len(counts(t)) >= 3)
total = guest = 0
size = None
for line in open(f"/proc/{p.pid}/smaps"):
    m = re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line)
    if m:
        size = None
    if line.startswith("Size:"):
        size = int(line.split()[1])
    if line.startswith("Rss:"):
        rss = int(line.split()[1])
        total += rss
        if size == 128 * 1024:
            guest += rss
api(sock, {"type": "power_off"})
p.wait()
ref = subprocess.Popen(["sleep", "5"])
time.sleep(0.3)
ref_rss = int(next(l for l in open(f"/proc/{ref.pid}/status") if l.startswith("VmRSS:")).split()[1])
ref.kill()
out.append("| VMM memory | KiB |")
out.append("|---|---:|")
out.append(f"| process RSS, 128 MiB guest running | {total} |")
out.append(f"| of which guest RAM (touched pages) | {guest} |")
out.append(f"| **VMM overhead** (RSS minus guest RAM) | **{total - guest}** |")
out.append(f"| reference: RSS of `sleep` (a minimal process) | {ref_rss} |")
out.append("")

# 2. Time from process start to the first guest instruction (boot-timer port).
firsts, spawns = [], []
disk = f"{work}/d.raw"
with open(disk, "wb") as f:
    f.truncate(16 << 20)
for _ in range(20):
    r = subprocess.run([VMM, "--kernel", GUEST, "--memory-mib", "128", "--disk", disk, "--serial-out", f"{work}/b.log"],
                       capture_output=True, text=True, env={**os.environ, "TESSERA_LOG": "info"})
    m = re.search(r"first instruction.*?micros=(\d+)", ANSI.sub("", r.stderr))
    firsts.append(int(m.group(1)) / 1000)
    t = time.perf_counter()
    subprocess.run(["/bin/true"])
    spawns.append((time.perf_counter() - t) * 1000)
out.append("| start to first guest instruction (20 runs) | min | p50 | p90 | max |")
out.append("|---|---:|---:|---:|---:|")
out.append("| tessera-vmm, 128 MiB, ms | " + " | ".join(f"{v:.1f}" for v in (min(firsts), pct(firsts, 50), pct(firsts, 90), max(firsts))) + " |")
out.append("| reference: spawn and reap `/bin/true`, ms | " + " | ".join(f"{v:.1f}" for v in (min(spawns), pct(spawns, 50), pct(spawns, 90), max(spawns))) + " |")
out.append("")

# 3. Snapshot and restore of a 256 MiB guest.
sock, con, snap = f"{work}/s.sock", f"{work}/s.log", f"{work}/snap"
p = subprocess.Popen([VMM, "--kernel", GUEST, "--memory-mib", "256", "--cmdline", "console=ttyS0 tessera.mode=count",
                      "--disk", disk, "--api-socket", sock, "--serial-out", con], stderr=subprocess.DEVNULL)
wait_console(con, lambda t: len(counts(t)) >= 3)
api(sock, {"type": "pause"})
last = counts(open(con).read())[-1]
t = time.perf_counter()
api(sock, {"type": "snapshot", "dir": snap})
snap_ms = (time.perf_counter() - t) * 1000
p.kill()
p.wait()
sock2, con2 = f"{work}/r.sock", f"{work}/r.log"
t = time.perf_counter()
p = subprocess.Popen([VMM, "--restore", snap, "--api-socket", sock2, "--serial-out", con2], stderr=subprocess.DEVNULL)
wait_console(con2, lambda t: any(c > last for c in counts(t)))
restore_ms = (time.perf_counter() - t) * 1000
api(sock2, {"type": "power_off"})
p.wait()
t = time.perf_counter()
subprocess.run(["dd", "if=/dev/zero", f"of={work}/ref.bin", "bs=1M", "count=256", "conv=fsync"], capture_output=True)
dd_ms = (time.perf_counter() - t) * 1000
mem_alloc = os.stat(f"{snap}/memory").st_blocks * 512
out.append("| snapshot / restore, 256 MiB guest | ms |")
out.append("|---|---:|")
out.append(f"| snapshot (paused VM to files on disk; memory file allocates {mem_alloc >> 10} KiB of 256 MiB) | {snap_ms:.0f} |")
out.append(f"| restore (new process until the guest prints its next count) | {restore_ms:.0f} |")
out.append(f"| reference: `dd` 256 MiB of zeroes to the same disk with fsync | {dd_ms:.0f} |")
out.append("")

# 4. virtio-blk requests per second, and the cost of one exit on this machine.
r = subprocess.run([VMM, "--kernel", GUEST, "--memory-mib", "64", "--disk", disk, "--cmdline", "console=ttyS0 tessera.mode=bench",
                    "--serial-out", f"{work}/x.log"], capture_output=True, text=True, env={**os.environ, "TESSERA_LOG": "info"})
marks = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"bench marker marker=(\d+) micros=(\d+)", ANSI.sub("", r.stderr))}
reads_us = marks[2] - marks[1]
exits_us = marks[3] - marks[2]
exit_us = exits_us / 2000
out.append("| virtio-blk, test guest, raw file | value |")
out.append("|---|---:|")
out.append(f"| 4 KiB reads, one at a time (guest polls) | {2000 / (reads_us / 1e6):.0f} req/s ({reads_us / 2000:.1f} µs each) |")
out.append(f"| reference: one port-I/O exit to the VMM and back | {exit_us:.1f} µs |")
out.append(f"| request cost in exits | {reads_us / 2000 / exit_us:.1f} |")
print("\n".join(out))
