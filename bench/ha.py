#!/usr/bin/env python3
"""HA restart on the devcluster (see ha.sh): the node running an HA VM is killed (SIGKILL
of its tesserad, its store and its VMMs), REPEAT times; each time the time until the
guest's first console line on another node, and until the node is declared down. The
killed node is started again (its store, then its tesserad, same command lines) and is up
before the next kill, which hits a new HA VM on a new volume (ha<r>, on ha<r>-root) whose
three copies are in sync: after a restart elsewhere the old volume did not get its third
copy back in sync within minutes on this build (see BENCHMARKS.md), and a kill under a
volume with two copies in sync would measure something else. Reference in the same run: a
bare tessera-vmm to its first console line. Prints Markdown."""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devapi import Cluster, median, pids_of  # noqa: E402

W, PW, GUEST, VMM = sys.argv[1:5]
REPEAT = int(os.environ.get("REPEAT", "10"))
# Idle mode: a count every 100 ms, halted in between, so the guest does not take a CPU
# of this two-core machine from the nodes being measured.
CMDLINE = "console=ttyS0 tessera.mode=idle tessera.tick_ms=100"
BANNER = "tessera test guest"


def bare_start():
    d = tempfile.mkdtemp(dir=W)
    out = f"{d}/console.log"
    t0 = time.perf_counter()
    p = subprocess.Popen([VMM, "--kernel", GUEST, "--cmdline", CMDLINE, "--memory-mib", "64",
                          "--vcpus", "1", "--api-socket", f"{d}/api.sock", "--serial-out", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < 60:
            try:
                if BANNER in open(out, errors="replace").read():
                    return time.perf_counter() - t0
            except FileNotFoundError:
                pass
            time.sleep(0.002)
        raise RuntimeError("the bare VMM printed nothing in 60 s")
    finally:
        p.kill()
        p.wait()


def consoles(vm, exclude):
    return {i: f"{W}/cluster/node{i}/data/vms/{vm}/console.log" for i in (1, 2, 3) if i != exclude}


def read(p):
    try:
        return open(p, errors="replace").read()
    except FileNotFoundError:
        return ""


def new_banner(before, now):
    """Whether `now` shows a boot the snapshot `before` did not (a file restarted anew or
    grown by one)."""
    fresh = now[len(before):] if now.startswith(before) else now
    return BANNER in fresh


c = Cluster(W, PW)
c.wait("every node's store and memory", lambda: (lambda n: len(n) == 3 and all(
    x["storage"]["state"] == "ok" and (x.get("metrics") or {}).get("memory_total", 0) > 0
    for x in n.values()))(c.nodes()), 120, 0.5)
ids = {i: n["id"] for i, n in c.nodes().items()}
# The HA manager places by CPUs, not by the cluster's vcpu_overcommit (a first version
# left every run's VM running and the fifth restart waited for room): each run's VM is
# stopped once its node is back.
bare = [bare_start() for _ in range(REPEAT)]
print(f"bare tessera-vmm to its first console line: {', '.join(f'{b * 1000:.0f}' for b in bare)} ms",
      flush=True)
restarts, detections, rows, failures = [], [], [], []
started = []  # the processes this script started again (the cleanup kills them by $W)
for r in range(REPEAT):
    victim = r % 3 + 1
    vm = f"ha{r}"
    # The earlier runs' volumes back to three copies in sync first (a kill while one has
    # two would test a double failure); at most 90 s, else said and measured anyway.
    try:
        for k in range(r):
            c.wait_in_sync(f"ha{k}-root", 3, timeout=90 / max(1, r))
        clean = True
    except RuntimeError:
        clean = False
        print(f"run {r + 1}: an earlier volume has not all three copies in sync yet", flush=True)
    c.volume(f"{vm}-root", 16 << 20, 3, ids[victim])
    s, v = c.call("POST", "vms", {"name": vm, "vcpus": 1, "memory_mib": 64, "disks": [f"{vm}-root"],
                                  "kernel": GUEST, "cmdline": CMDLINE, "ha": True, "priority": 10,
                                  "desired_state": "running"})
    assert s == 201, (s, v)
    v = c.wait(f"{vm} running", lambda: (lambda v: v if v["actual_state"] == "running" else None)(
        c.get(f"vms/{vm}")), 120)
    assert v["running_on"] == ids[victim], v
    others = [i for i in (1, 2, 3) if i != victim]
    hosts = [f"127.0.0.{i}" for i in others]
    files = consoles(vm, victim)
    snap = {i: read(p) for i, p in files.items()}
    procs = pids_of(f"{W}/cluster/node{victim}/")
    again = [a for a in procs.values() if os.path.basename(a[0]) in ("tessera-store", "tesserad")]
    assert len(again) == 2, f"node{victim}: {procs}"
    detected = {}

    def watch_down():
        t = time.perf_counter()
        while time.perf_counter() - t < 60:
            try:
                n = c.nodes(hosts)
            except RuntimeError:
                continue
            if n[victim]["state"] == "down":
                detected["at"] = time.perf_counter()
                return
            time.sleep(0.05)

    t0 = time.perf_counter()
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    w = threading.Thread(target=watch_down)
    w.start()
    where = None
    while where is None and time.perf_counter() - t0 < 90:
        for i, p in files.items():
            if new_banner(snap[i], read(p)):
                where = i
                break
        time.sleep(0.002)
    took = time.perf_counter() - t0
    w.join()
    down = detected["at"] - t0 if "at" in detected else float("nan")
    if where is None:
        failures.append(r + 1)
        state = c.get(f"vms/{vm}", hosts)
        print(f"run {r + 1}: node{victim} killed, {vm} did NOT run again within 90 s "
              f"(declared down at {down:.2f} s; now {state.get('actual_state')}: "
              f"{state.get('state_reason')})", flush=True)
    else:
        restarts.append(took)
        rows.append((r + 1, victim, where, took, down, clean))
        print(f"run {r + 1}: node{victim} killed, {vm} ran again on node{where} {took:.2f} s later "
              f"(declared down at {down:.2f} s)", flush=True)
    detections.append(down)
    # The killed node comes back (store first: tesserad configures it).
    for argv in sorted(again, key=lambda a: os.path.basename(a[0]) != "tessera-store"):
        name = "store" if "store" in os.path.basename(argv[0]) else "tesserad"
        log = open(f"{W}/cluster/node{victim}/{name}.log", "a")
        started.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True))
        if name == "store":
            c.wait("the store's admin socket",
                   lambda: os.path.exists(f"{W}/cluster/node{victim}/store/admin.sock"), 30)
    c.wait(f"node{victim} up", lambda: (lambda n: n[victim]["state"] == "up"
                                        and n[victim]["storage"]["state"] == "ok")(c.nodes()), 60, 0.2)
    s, v = c.call("POST", f"vms/{vm}/stop")
    if s == 202:
        c.wait(f"{vm} stopped", lambda: c.get(f"vms/{vm}")["actual_state"] == "stopped", 60, 0.2)
    else:
        print(f"run {r + 1}: {vm} not stopped: {s} {v}", flush=True)

print("| run | killed | ran again on | first new console line | declared down | earlier volumes in sync |")
print("|---|---|---|---|---|---|")
for r, victim, where, took, down, clean in rows:
    print(f"| {r} | node{victim} | node{where} | {took:.2f} s | {down:.2f} s | {'yes' if clean else 'NO'} |")
for r in failures:
    print(f"| {r} | | did not run again within 90 s | | | |")
print()
print(f"HA restart (kill -> the guest's first console line elsewhere), {len(restarts)} of {REPEAT} kills: "
      f"median {median(restarts):.2f} s, max {max(restarts):.2f} s (goal <= 15 s)")
print(f"  declared down: median {median(detections):.2f} s, max {max(detections):.2f} s "
      f"(bound 3.5 s, docs/ha.md)")
print(f"  reference, same run: bare tessera-vmm to its first console line: median "
      f"{median(bare) * 1000:.0f} ms, max {max(bare) * 1000:.0f} ms")
print(f"  not run again within 90 s: {len(failures)} of {REPEAT} (runs {failures})")
print(f"  API answers retried (503 or node down): {c.retries}")
for p in started:
    p.kill()
    p.wait()
