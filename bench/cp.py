#!/usr/bin/env python3
"""Importing a raw file into a 3-copy volume (issue #8; see cp.sh): `tessera volume cp`
over the QUIC export (TLS) vs nbdcopy (NBD on the Unix socket, and over TCP with TLS
like the QUIC export) and `qemu-img convert` over NBD, the same file, REPEAT rounds
alternating; median MiB/s and the ratios to nbdcopy on the Unix socket. Prints
Markdown."""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devapi import Cluster, median  # noqa: E402

W, PW, TESSERA = sys.argv[1:4]
REPEAT = int(os.environ.get("REPEAT", "3"))
SIZE_MIB = int(os.environ.get("SIZE_MIB", "1024"))

c = Cluster(W, PW)
c.wait("every node's store", lambda: (lambda n: len(n) == 3 and all(
    x["storage"]["state"] == "ok" for x in n.values()))(c.nodes()))
nodes = c.nodes()
c.volume("cpbench", SIZE_MIB << 20, 3, nodes[1]["id"])
v = c.get("volumes/cpbench")
i = next(k for k, n in nodes.items() if n["id"] == v["node"])
host_port = v["nbd"].split("://", 1)[1].split("/", 1)[0]
quic = f"quic://{host_port}/cpbench"
creds = f"{W}/cluster/node{i}/data/tls"
nbd = f"nbd+unix:///cpbench?socket={W}/cluster/node{i}/store/nbd.sock"
# The node's credentials under the names libnbd looks for, for NBD over TCP with TLS.
nbd_creds = f"{W}/nbd-creds"
os.makedirs(nbd_creds, exist_ok=True)
for a, b in (("ca.crt", "ca-cert.pem"), ("node.crt", "client-cert.pem"),
             ("node.key", "client-key.pem")):
    shutil.copy(f"{creds}/{a}", f"{nbd_creds}/{b}")
nbds = f"nbds://{host_port}/cpbench?tls-certificates={nbd_creds}"
src = f"{W}/random.raw"
with open(src, "wb") as f:
    for _ in range(SIZE_MIB):
        f.write(os.urandom(1 << 20))

tools = {
    "tessera volume cp (QUIC, TLS)": [TESSERA, "volume", "cp", src, quic, "--creds", creds],
    "nbdcopy (NBD, Unix socket)": ["nbdcopy", "--flush", src, nbd],
    "nbdcopy (NBD, TCP, TLS)": ["nbdcopy", "--flush", src, nbds],
    "qemu-img convert -n (NBD, Unix socket)": [
        "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, nbd],
}


def timed(args):
    t0 = time.monotonic()
    subprocess.run(args, check=True, timeout=900, stdout=subprocess.DEVNULL)
    return SIZE_MIB / (time.monotonic() - t0)


rates = {name: [] for name in tools}
names = list(tools)
for r in range(REPEAT):
    # Each round starts with another tool: the volume's first write allocates, so
    # whichever goes first in the first round pays for it.
    for name in names[r % len(names):] + names[:r % len(names)]:
        rates[name].append(timed(tools[name]))
ref = median(rates["nbdcopy (NBD, Unix socket)"])
print(f"| {SIZE_MIB} MiB of random bytes into a 3-copy volume | median MiB/s | runs |"
      " / nbdcopy |")
print("|---|---:|---|---:|")
for name in tools:
    m = median(rates[name])
    runs = ", ".join(f"{x:.0f}" for x in rates[name])
    print(f"| {name} | {m:.0f} | {runs} | {m / ref:.2f}x |")
# The same copy again with --resume: the volume already holds it, so only digests travel.
t0 = time.monotonic()
out = subprocess.run(tools["tessera volume cp (QUIC, TLS)"] + ["--resume", "--output", "json"],
                     check=True, timeout=900, capture_output=True, text=True).stdout
dt = time.monotonic() - t0
n = json.loads(out)
print()
print(f"`--resume` of the same copy (nothing differs): {dt:.1f} s, {SIZE_MIB / dt:.0f} MiB/s"
      f" compared; data sent {n['data_bytes']} bytes, equal {n['same_bytes'] >> 20} MiB")
