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

# The switch-over's moments from the task's "timeline source:" / "timeline target:" log
# lines (host monotonic clock: both nodes run on this host), in ms after the source VMM
# paused the guest, in the order they happen.
STEPS = [
    ("vmm_sent", "src VMM: last pages + state sent"),
    ("vmm_built", "tgt VMM: VM built"),
    ("vmm_loaded", "tgt VMM: loaded"),
    ("loaded_seen", "tgt tesserad: saw loaded"),
    ("switched_over", "tgt: switch-over committed"),
    ("switched_over_seen", "src tesserad: saw it"),
    ("store_replica", "src store: replica"),
    ("primary_ready", "tgt store: primary"),
    ("vmm_go", "tgt VMM: go"),
    ("vmm_disk_attached", "tgt VMM: disk opened"),
    ("vmm_running", "tgt VMM: vCPUs run"),
    ("vmm_first_console", "guest: first console byte"),
    ("vmm_first_disk_request", "guest: first disk request"),
    ("vmm_first_disk_done", "... done"),
]


def timeline(task):
    """Every mark of the task's timeline lines, in ms after the source's pause (or {})."""
    marks = {}
    for entry in task.get("log", []):
        msg = entry.get("message", "")
        if not msg.startswith("timeline "):
            continue
        side = msg.split(":", 1)[0].split()[1]
        words = msg.split(":", 1)[1].split()
        t0 = float(words[0].split("=")[1])
        for w in words[1:]:
            what, rel = w.split("=")
            marks[(side, what)] = t0 + float(rel)
    paused = marks.get(("source", "vmm_paused"))
    if paused is None:
        return {}
    # Target marks by their names; a source mark of the same name (its VMM's "loaded" is
    # when it heard it) as src_<name>.
    out = {what: at - paused for (side, what), at in marks.items() if side == "target"}
    for (side, what), at in marks.items():
        if side == "source":
            out[f"src_{what}" if what in out else what] = at - paused
    return out
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
rows, summary, steps = [], {}, []
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
                return watch.first and max(list(watch.first.values())) > t0 + total + 1.0
            try:
                c.wait("counts after the move", after, 30)
            except RuntimeError:
                last = max(list(watch.first)) if watch.first else None
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
            # The target writes its timeline once the guest's first disk request is done.
            tl = {}
            for _ in range(50):
                tl = timeline(c.get(f"tasks/{v['id']}"))
                if "vmm_first_disk_done" in tl:
                    break
                time.sleep(0.1)
            steps.append((mode, r + 1, gap * 1000, tl))
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
print()
print("Where the time goes (ms after the source VMM paused the guest; host monotonic clock):")
print()
print("| guest | run | gap seen | " + " | ".join(label for _, label in STEPS) + " |")
print("|---|---|---|" + "---|" * len(STEPS))
for mode, r, gap, tl in steps:
    cells = [f"{tl[k]:.1f}" if k in tl else "-" for k, _ in STEPS]
    print(f"| {mode} | {r} | {gap:.0f} | " + " | ".join(cells) + " |")
print()
for mode in MODES:
    got = [tl for m, _, _, tl in steps if m == mode and tl]
    if not got:
        continue
    meds = [f"{label} {median([tl[k] for tl in got if k in tl]):.1f}" for k, label in STEPS
            if any(k in tl for tl in got)]
    print(f"{mode}, median over {len(got)} moves: " + "; ".join(meds))
    run = [tl["vmm_running"] for tl in got if "vmm_running" in tl]
    wait = [tl["vmm_first_disk_done"] - tl["vmm_first_disk_request"] for tl in got
            if "vmm_first_disk_done" in tl and "vmm_first_disk_request" in tl]
    if run and wait:
        print(f"{mode}: not running (host clock, the source's pause to the target's vCPUs running) "
              f"median {median(run):.1f} ms, max {max(run):.1f} ms; the guest's first disk request "
              f"after it waited median {median(wait):.1f} ms, max {max(wait):.1f} ms")
