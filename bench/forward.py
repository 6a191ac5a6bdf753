#!/usr/bin/env python3
"""Forwarding through a node that holds no copy (issue #8; see forward.sh): a one-copy
volume on node1, written and read with nbdcopy through node1's store (its copy: the
reference, same run) and through node2's (no copy: every request forwarded to node1's
store over the QUIC export). REPEAT rounds, alternating; median MiB/s and the ratio
forwarded / direct: writes and reads with nbdcopy's defaults, and reads of 4 KiB
requests, 8 in flight on one connection. Prints Markdown."""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devapi import Cluster, median  # noqa: E402

W, PW = sys.argv[1:3]
REPEAT = int(os.environ.get("REPEAT", "3"))
SIZE_MIB = int(os.environ.get("SIZE_MIB", "256"))


def uri(i):
    return f"nbd+unix:///fwd?socket={W}/cluster/node{i}/store/nbd.sock"


def timed(args):
    t0 = time.monotonic()
    subprocess.run(args, check=True, timeout=600)
    return SIZE_MIB / (time.monotonic() - t0)


c = Cluster(W, PW)
c.wait("every node's store", lambda: (lambda n: len(n) == 3 and all(
    x["storage"]["state"] == "ok" for x in n.values()))(c.nodes()))
node1 = c.nodes()[1]["id"]
s, t = c.call("POST", "volumes", {"name": "fwd", "size_bytes": SIZE_MIB << 20,
                                  "replicas": 1, "node": node1})
assert s == 202, (s, t)
assert c.wait_task(t["id"])["state"] == "succeeded"
c.wait("fwd ready", lambda: c.get("volumes/fwd")["state"] == "ready")
src = f"{W}/random.raw"
with open(src, "wb") as f:
    f.write(os.urandom(SIZE_MIB << 20))
# Small reads at queue depth 8 on one connection: each costs a round trip to node1 when
# forwarded, so they show whether a connection's reads are in flight together.
SMALL = ["--connections=1", "--requests=8", "--request-size=4096"]
OPS = ("write", "read", "read 4K QD8")
rates = {(op, node): [] for op in OPS for node in (1, 2)}
for _ in range(REPEAT):
    for node in (1, 2):
        rates[("write", node)].append(timed(["nbdcopy", "--flush", src, uri(node)]))
        rates[("read", node)].append(timed(["nbdcopy", uri(node), "null:"]))
        rates[("read 4K QD8", node)].append(timed(["nbdcopy", *SMALL, uri(node), "null:"]))
assert c.get("volumes/fwd")["node"] == node1, "the primary moved"
print(f"| nbdcopy, {SIZE_MIB} MiB, 1-copy volume on node1 | through node1 (its copy) MiB/s"
      " | through node2 (forwarded) MiB/s | forwarded / direct |")
print("|---|---:|---:|---:|")
for op in OPS:
    d, f = median(rates[(op, 1)]), median(rates[(op, 2)])
    runs = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(rates[(op, 1)], rates[(op, 2)]))
    print(f"| {op} (runs: {runs}) | {d:.0f} | {f:.0f} | {f / d:.2f}x |")
