#!/usr/bin/env python3
"""VM start latency and 100 VM starts on the devcluster (see vm.sh); prints Markdown."""
import concurrent.futures, glob, http.client, json, os, ssl, statistics, subprocess, sys, tempfile, time

W, PW, GUEST, VMM = sys.argv[1:5]
# Small-scale runs (checking the script): REPEAT=3 VMS=5 bench/vm.sh
REPEAT = int(os.environ.get("REPEAT", "20"))
VMS = int(os.environ.get("VMS", "100"))
CA = f"{W}/cluster/node1/data/tls/ca.crt"
# The test guest's idle mode: a count per second, halted in between (tests/guest). The
# busy-looping count mode made 100 guests overload this 2-CPU machine by themselves.
CMDLINE = "console=ttyS0 tessera.mode=idle"
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
HZ = os.sysconf("SC_CLK_TCK")
CTX = ssl.create_default_context(cafile=CA)
CTX.check_hostname = False


def call_once(method, path, body=None, token=None, host="127.0.0.1"):
    c = http.client.HTTPSConnection(host, 8006, context=CTX, timeout=30)
    h = {"content-type": "application/json"}
    if token:
        h["authorization"] = f"Bearer {token}"
    c.request(method, "/api/v1/" + path, json.dumps(body) if body is not None else None, h)
    r = c.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else None)


# A loaded cluster answers 503 when no leader confirmed its term in time (the read
# barrier or the write did not get through; the body's "outcome" says whether anything
# was applied). Such answers are retried with backoff (0.1 s doubling to 5 s, at most
# 12 tries) and counted per outcome, so the report says how often it happened.
RETRIES = {}
RETRIES_LOCK = __import__("threading").Lock()


def call(method, path, body=None, token=None, host="127.0.0.1"):
    delay = 0.1
    for attempt in range(12):
        try:
            s, v = call_once(method, path, body, token, host)
        except (TimeoutError, ConnectionError) as e:
            # No answer within 30 s (a machine overloaded by the guests themselves): the
            # outcome is unknown, as for a 503 "unknown"; retried the same way.
            if attempt == 11:
                raise
            s, v = 503, {"outcome": f"no answer ({type(e).__name__})"}
        if s != 503 or attempt == 11:
            return s, v
        outcome = (v or {}).get("outcome", "?")
        with RETRIES_LOCK:
            RETRIES[outcome] = RETRIES.get(outcome, 0) + 1
        time.sleep(delay)
        delay = min(5.0, delay * 2)
    return s, v


_, v = call("POST", "login", {"username": "admin", "password": PW})
T = v["token"]
call("POST", "password", {"old_password": PW, "new_password": "benchmark password"}, T)
_, v = call("POST", "login", {"username": "admin", "password": "benchmark password"})
T = v["token"]


def console_files(name):
    return glob.glob(f"{W}/cluster/node*/data/vms/{name}/console.log")


def vmm_logs(name):
    return glob.glob(f"{W}/cluster/node*/data/vms/{name}/vmm.log")


def first_line(paths_fn, t0, timeout=60, marker="\n"):
    """Seconds from t0 until a file of paths_fn() holds marker (polled every 2 ms)."""
    while time.time() - t0 < timeout:
        for p in paths_fn():
            try:
                if marker in open(p, errors="replace").read(65536):
                    return time.time() - t0
            except FileNotFoundError:
                pass
        time.sleep(0.002)
    raise RuntimeError(f"no {marker!r} in {paths_fn()}")


# The VMM logs (at info, its default) "guest reached its first instruction" when the
# guest writes the boot-timer port, its first instruction; tesserad sends the VMM's
# stderr to the VM's vmm.log.
FIRST_INSN = "reached its first instruction"


def wait_task(tid, timeout=300):
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        s, t = call("GET", f"tasks/{tid}", token=T)
        # A busy cluster may answer 503 (no read barrier in time): ask again.
        if s == 200 and t["state"] in ("succeeded", "failed"):
            return t
        last = (s, t)
        time.sleep(0.01 if s == 200 else 0.2)
    raise RuntimeError(f"task {tid} did not end: last answer {last}")


def vm(name, mem=32):
    s, v = call("POST", "vms", {"name": name, "vcpus": 1, "memory_mib": mem, "kernel": GUEST,
                                "cmdline": CMDLINE}, T)
    # 409 "already exists": a create retried after a 503 whose outcome was unknown.
    assert s == 201 or (s == 409 and "already exists" in str(v)), v


# Reference: a bare tessera-vmm to its first console line.
bare = []
for i in range(REPEAT):
    d = tempfile.mkdtemp(dir=W)
    out = f"{d}/console.log"
    t0 = time.time()
    p = subprocess.Popen([VMM, "--kernel", GUEST, "--cmdline", CMDLINE,
                          "--memory-mib", "32", "--vcpus", "1", "--api-socket", f"{d}/api.sock",
                          "--serial-out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare.append(first_line(lambda: [out], t0))
    p.kill()
    p.wait()

# Through the cluster: POST .../start to the guest's first instruction, its first console
# line and the task's end.
vm("lat")
to_insn, to_line, to_task = [], [], []
for i in range(REPEAT):
    for f in console_files("lat") + vmm_logs("lat"):
        os.remove(f)
    t0 = time.time()
    s, task = call("POST", "vms/lat/start", token=T)
    assert s == 202, task
    to_insn.append(first_line(lambda: vmm_logs("lat"), t0, marker=FIRST_INSN))
    to_line.append(first_line(lambda: console_files("lat"), t0))
    t = wait_task(task["id"])
    assert t["state"] == "succeeded", t
    to_task.append(time.time() - t0)
    s, task = call("POST", "vms/lat/kill", token=T)
    assert wait_task(task["id"])["state"] == "succeeded"
call("DELETE", "vms/lat", token=T)


def rss():
    best = 0
    for pid in subprocess.run(["pgrep", "-f", f"tesserad --seed {W}"], capture_output=True,
                              text=True).stdout.split():
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                best = max(best, int(line.split()[1]))
    return best


ms = lambda xs: f"{statistics.median(xs) * 1000:.0f} ms"
print(f"(latency part done: first line {ms(to_line)}, bare {ms(bare)})", file=sys.stderr, flush=True)

def cpu_ticks(pids):
    """Sum of utime + stime (clock ticks) of the live processes among pids."""
    total = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read()
        except FileNotFoundError:
            continue
        rest = f[f.rfind(")") + 2:].split()
        total += int(rest[11]) + int(rest[12])
    return total


def cpu_share(pids, seconds=10):
    """The CPU those processes use together, in % of one CPU, over `seconds`."""
    t0, c0 = time.time(), cpu_ticks(pids)
    time.sleep(seconds)
    return (cpu_ticks(pids) - c0) / HZ / (time.time() - t0) * 100


def pids_of(pattern):
    return [int(p) for p in subprocess.run(["pgrep", "-f", pattern], capture_output=True,
                                           text=True).stdout.split()]


def load1():
    return float(open("/proc/loadavg").read().split()[0])


# Reference for the VMS starts: VMS bare tessera-vmm processes, started directly one
# after another (no API, no placement, no Raft): time until every one printed its first
# console line, and the CPU they use together once started.
refdir = tempfile.mkdtemp(dir=W)
procs, outs = [], []
t0 = time.time()
for i in range(VMS):
    out = f"{refdir}/{i}.console"
    outs.append(out)
    procs.append(subprocess.Popen([VMM, "--kernel", GUEST, "--cmdline", CMDLINE, "--memory-mib", "16",
                                   "--vcpus", "1", "--api-socket", f"{refdir}/{i}.sock",
                                   "--serial-out", out],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
bare_spawned = time.time() - t0
for out in outs:
    first_line(lambda: [out], t0, timeout=300)
bare_all = time.time() - t0
bare_cpu = cpu_share([p.pid for p in procs])
for p in procs:
    p.kill()
for p in procs:
    p.wait()
print(f"(reference done: {VMS} bare VMMs up in {bare_all:.1f} s, {bare_cpu:.1f}% CPU together)",
      file=sys.stderr, flush=True)

# VMS VMs started at once across the three nodes. Placement overcommits vCPUs up to the
# cluster's ratio (default 4 per CPU): raised so that VMS one-vCPU VMs fit on the three
# nodes of this machine (each node counts the machine's CPUs).
_, nodes = call("GET", "nodes", token=T)
cpus = sum(n["allocation"]["cpus"] for n in nodes)
ratio = min(64, max(4, -(-VMS // max(1, cpus)) + 1))
s, v = call("PATCH", "settings", {"vcpu_overcommit": ratio}, T)
assert s == 200, v
rss0 = rss()
names = [f"many{i}" for i in range(VMS)]
for n in names:
    vm(n, 16)
retries_creating = sum(RETRIES.values())
with RETRIES_LOCK:
    RETRIES.clear()
load_before = load1()


def start(i):
    """POST .../start through one of the three nodes (round robin). A 409 "room changed
    meanwhile ... try again" (the node lost the race for a node's room more often than
    it places again itself) is tried again, as its message says, and counted."""
    delay = 0.1
    for attempt in range(8):
        s, v = call("POST", f"vms/{names[i]}/start", token=T, host=HOSTS[i % 3])
        if s == 202:
            return "placed", v
        if s == 409 and "already started" in str(v):
            # A start retried after an unanswered request or a 503 of unknown outcome
            # had been committed.
            return "placed", v
        if not (s == 409 and "room changed meanwhile" in str(v)) or attempt == 7:
            return "refused", (s, v)
        with RETRIES_LOCK:
            RETRIES["409 room changed"] = RETRIES.get("409 room changed", 0) + 1
        time.sleep(delay)
        delay *= 2


# Eight clients at once, as several users or a script would send them.
t0 = time.time()
with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    answers = list(pool.map(start, range(VMS)))
accepted = time.time() - t0
refused = [v for kind, v in answers if kind == "refused"]
placed = VMS - len(refused)
starting_names = {names[i] for i, (kind, _) in enumerate(answers) if kind == "placed"}

# Every placed VM running, as GET /vms reports (the nodes' own reports).
states, running_at, last = {}, None, None
while time.time() - t0 < 600:
    s, vs = call("GET", "vms", token=T)
    if s == 200:
        items = vs["items"] if isinstance(vs, dict) and "items" in vs else vs
        states = {v["name"]: v for v in items if v["name"] in starting_names}
        ended = [v for v in states.values() if v["actual_state"] in ("running", "crashed")]
        if len(ended) == len(starting_names):
            running_at = time.time() - t0
            break
    time.sleep(0.2)
running = sum(1 for v in states.values() if v["actual_state"] == "running")
crashed = [v for v in states.values() if v["actual_state"] == "crashed"]
node_names = {n["id"]: n.get("name") or n["id"] for n in nodes}
per_node = {}
for v in states.values():
    where = node_names.get(v.get("running_on"), v.get("running_on") or "?")
    per_node[where] = per_node.get(where, 0) + 1
retries_starting = dict(RETRIES)
rss1 = rss()
# Once they run: the CPU the VMMs and the three tesserads use, and the load.
vmm_pids = pids_of(f"tessera-vmm .*{W}/cluster/")
cluster_cpu = cpu_share(vmm_pids)
tesserad_cpu = cpu_share(pids_of(f"tesserad --seed {W}"), 5)
load_after = load1()
# The guests' own word, not only the nodes' reports: every running VM's console shows its
# idle loop ticking (count 1 is printed one tick, a second, after the guest started).
ticking = sum(1 for n in starting_names
              if any("\ncount 1\n" in open(p, errors="replace").read() for p in console_files(n)))

print("| measurement | result |\n|---|---|")
print(f"| bare tessera-vmm start -> first console line (median of {REPEAT}, reference) | {ms(bare)} |")
print(f"| POST .../start -> guest's first instruction (median of {REPEAT}) | {ms(to_insn)} |")
print(f"| POST .../start -> first console line (median of {REPEAT}) | {ms(to_line)} |")
print(f"| ratio: cluster first console line / bare tessera-vmm first console line | {statistics.median(to_line) / statistics.median(bare):.1f}x |")
print(f"| POST .../start -> start task succeeded (median of {REPEAT}) | {ms(to_task)} |")
print(f"| reference: {VMS} bare tessera-vmm started one after another -> all printed their first line | {bare_all:.1f} s (spawning took {bare_spawned:.1f} s) |")
print(f"| reference: CPU of those {VMS} idle VMMs together (10 s) | {bare_cpu:.1f}% of one CPU |")
print(f"| {VMS} starts (one vCPU, 16 MiB each; vcpu_overcommit {ratio}, {cpus} CPUs counted over the 3 nodes; 8 clients, round robin over the nodes): placed / refused | {placed} / {len(refused)} |")
print(f"| time from the first POST .../start to the last one answered | {accepted:.1f} s |")
print(f"| time from the first POST .../start to every placed VM running (GET /vms) | {running_at:.1f} s |" if running_at is not None else "| every placed VM running | **not within 600 s** |")
print(f"| ratio: cluster all running / bare all first line | {running_at / bare_all:.1f}x |" if running_at else "| ratio | - |")
print(f"| placed VMs running / crashed | {running} / {len(crashed)} |")
print(f"| placed VMs whose console shows them ticking (`count 1`, read after the CPU measurements) | {ticking} |")
print(f"| VMs per node | {', '.join(f'{k}: {n}' for k, n in sorted(per_node.items()))} |")
print(f"| 503 answers or unanswered requests (and 409 room changed) retried, before the starts (latency part, defining the VMs) / during the starts, by outcome | {retries_creating or 0} / {retries_starting or 0} |")
print(f"| CPU of the {len(vmm_pids)} cluster VMMs together once running (10 s) / of the three tesserads (5 s) | {cluster_cpu:.1f}% / {tesserad_cpu:.1f}% of one CPU |")
print(f"| load average (1 min) before the starts / after | {load_before:.2f} / {load_after:.2f} |")
print(f"| largest tesserad RSS before / after | {rss0 // 1024} MiB / {rss1 // 1024} MiB |")
if refused:
    print(f"\nFirst refusal: {refused[0][0]} {refused[0][1]}")
if crashed:
    print(f"\nFirst crash: {crashed[0]['name']}: {crashed[0].get('state_reason')}")
