#!/usr/bin/env python3
"""Live migration on the devcluster (see migrate.sh): a 256 MiB test guest on a three-copy
volume, idle (a count every 10 ms, halted in between) and busy (a busy loop, a count every
1 ms of its LAPIC timer),
moved between node1 and node2 REPEAT times each through the API. Per move: the downtime
the guest sees (the longest gap between two consecutive counts on its consoles, polled
every millisecond, less the guest's usual interval), the VMM's own pause figure, and the
total time (POST to the task's end). Reference in the same run: what the loopback link
carries (bench/sockbw.py, TCP), and the time a copy of all 256 MiB would take at that
rate. Prints Markdown."""
import glob
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devapi import Cluster, CountWatch, median  # noqa: E402

W, PW, GUEST = sys.argv[1:4]
REPEAT = int(os.environ.get("REPEAT", "5"))
MEMORY_MIB = 256
MODES = {
    "idle": "console=ttyS0 tessera.mode=idle tessera.tick_ms=10",
    # Busy: the vCPU never rests, and a count every 1 ms of its LAPIC timer is the fine
    # clock (the busy loop's own counts came ~100 ms apart).
    "busy": "console=ttyS0 tessera.mode=count tessera.tick_ms=1",
}

link = json.loads(subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "sockbw.py"), "3"],
                                 check=True, capture_output=True, text=True).stdout)
c = Cluster(W, PW)
c.wait("every node's store and memory", lambda: (lambda n: len(n) == 3 and all(
    x["storage"]["state"] == "ok" and (x.get("metrics") or {}).get("memory_total", 0) > 0
    for x in n.values()))(c.nodes()), 120, 0.5)
ids = {i: n["id"] for i, n in c.nodes().items()}
rows, summary = [], {}
for mode, cmdline in MODES.items():
    name = f"mig-{mode}"
    c.volume(f"{name}-root", 16 << 20, 3, ids[1])
    s, v = c.call("POST", "vms", {"name": name, "vcpus": 1, "memory_mib": MEMORY_MIB,
                                  "disks": [f"{name}-root"], "kernel": GUEST, "cmdline": cmdline,
                                  "desired_state": "running"})
    assert s == 201, (s, v)
    c.wait(f"{name} running", lambda: c.get(f"vms/{name}")["actual_state"] == "running", 120)
    watch = CountWatch(lambda: glob.glob(f"{W}/cluster/node*/data/vms/{name}/console.log"))
    stop = threading.Event()

    failed = []

    def poll():
        try:
            while not stop.is_set():
                watch.poll()
                time.sleep(0.001)
        except Exception as e:  # reported by the main thread
            failed.append(repr(e))

    th = threading.Thread(target=poll)
    th.start()
    try:
        seen = []
        for r in range(REPEAT):
            where = c.get(f"vms/{name}")["running_on"]
            to = 2 if where == ids[1] else 1
            # Two seconds of its usual rhythm before the move.
            time.sleep(2)
            t0 = time.perf_counter()
            s, v = c.call("POST", f"vms/{name}/migrate", {"to": f"node{to}"})
            assert s == 202, (s, v)
            task = c.wait_task(v["id"])
            total = time.perf_counter() - t0
            assert task["state"] == "succeeded", task
            m = task["vm"]["migration"]
            # The guest counts on: a second of counts after the move.
            def after():
                assert not failed, failed
                return watch.first and max(watch.first.values()) > t0 + total + 1.0
            try:
                c.wait("counts after the move", after, 30)
            except RuntimeError:
                last = max(watch.first) if watch.first else None
                raise RuntimeError(f"no count after the move: last count {last} first seen "
                                   f"{watch.first.get(last, 0) - t0:.2f} s after the POST, the task "
                                   f"took {total:.2f} s; files {watch.offsets}")
            before = [g for g, _ in watch.gaps(t0 - 2, t0)]
            usual = median(before)
            gap, at = max(watch.gaps(t0, t0 + total + 1.0))
            rows.append((mode, r + 1, f"node{to}", gap * 1000, (gap - usual) * 1000, usual * 1000,
                         max(before) * 1000, m.get("downtime_ms"), total * 1000, m.get("total_ms"),
                         m.get("bytes"), m.get("iterations")))
            seen.append((gap - usual, gap, total, m.get("downtime_ms")))
            print(f"{mode} run {r + 1} to node{to}: gap {gap * 1000:.0f} ms (usual {usual * 1000:.1f} ms, "
                  f"longest of the 2 s before {max(before) * 1000:.0f} ms), "
                  f"VMM pause {m.get('downtime_ms')} ms, total {total * 1000:.0f} ms", flush=True)
    finally:
        stop.set()
        th.join()
    summary[mode] = seen
    s, v = c.call("POST", f"vms/{name}/stop")

print("| guest | run | to | longest count gap | downtime seen (gap - usual) | usual interval "
      "| longest gap, 2 s before | VMM's pause | total (POST to task end) | VMM's total | bytes | rounds |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for mode, r, to, gap, down, usual, worst, vmm_down, total, vmm_total, sent, rounds in rows:
    print(f"| {mode} | {r} | {to} | {gap:.0f} ms | {down:.0f} ms | {usual:.1f} ms | {worst:.0f} ms "
          f"| {vmm_down} ms | {total:.0f} ms | {vmm_total} ms | {sent} | {rounds} |")
print()
copy_s = MEMORY_MIB / link["tcp"]
for mode, seen in summary.items():
    downs = [d * 1000 for d, _, _, _ in seen]
    totals = [t * 1000 for _, _, t, _ in seen]
    vmm = [x for _, _, _, x in seen if x is not None]
    print(f"{mode} {MEMORY_MIB} MiB guest, {REPEAT} moves: downtime seen median {median(downs):.0f} ms, "
          f"max {max(downs):.0f} ms (goal <= 50 ms); VMM's pause median {median(vmm) if vmm else 'n/a'} ms; "
          f"total median {median(totals):.0f} ms, max {max(totals):.0f} ms")
print(f"reference, same run: loopback TCP {link['tcp']:.0f} MiB/s (bench/sockbw.py): all "
      f"{MEMORY_MIB} MiB would take {copy_s * 1000:.0f} ms to copy")
print(f"API answers retried (503): {c.retries}")
