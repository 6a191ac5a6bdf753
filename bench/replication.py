#!/usr/bin/env python3
"""3-copy vs 1-copy volume vs nbdkit file, and catch-up throughput (see replication.sh)."""
import http.client, json, os, platform, ssl, subprocess, sys, time

W, PW, SIZE_MIB, RUNTIME, CATCHUP_MIB = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
CA = f"{W}/cluster/node1/data/tls/ca.crt"
CTX = ssl.create_default_context(cafile=CA)
CTX.check_hostname = False
STORE = f"{W}/bin/tessera-store"


def call(method, path, body=None, token=None):
    # A 503 (no leader confirmed in time on a loaded machine) is retried with backoff.
    delay = 0.1
    for _ in range(12):
        c = http.client.HTTPSConnection("127.0.0.1", 8006, context=CTX, timeout=30)
        h = {"content-type": "application/json"}
        if token:
            h["authorization"] = f"Bearer {token}"
        c.request(method, "/api/v1/" + path, json.dumps(body) if body is not None else None, h)
        r = c.getresponse()
        data = r.read()
        if r.status != 503:
            return r.status, (json.loads(data) if data else None)
        time.sleep(delay)
        delay = min(5.0, delay * 2)
    raise SystemExit(f"{method} {path}: 503 twelve times")


def wait(what, secs, f):
    deadline = time.monotonic() + secs
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


_, v = call("POST", "login", {"username": "admin", "password": PW})
call("POST", "password", {"old_password": PW, "new_password": "benchmark password"}, v["token"])
_, v = call("POST", "login", {"username": "admin", "password": "benchmark password"})
T = v["token"]


def healthy_nodes():
    s, n = call("GET", "nodes", token=T)
    return n if s == 200 and len(n) == 3 and all(x["storage"]["state"] == "ok" for x in n) else None


nodes = wait("three healthy stores", 60, healthy_nodes)
ID = {x["name"]: x["id"] for x in nodes}


def volume(name):
    s, v = call("GET", f"volumes/{name}", token=T)
    return v if s == 200 else None


def all_in_sync(name, copies):
    v = volume(name)
    if not v or v.get("state") != "ready":
        return None
    c = v["replication"]["copies"]
    return v if len(c) == copies and all(x["state"] == "in_sync" for x in c) else None


for name, copies in [("r3", 3), ("r1", 1)]:
    s, t = call("POST", "volumes", {"name": name, "size_bytes": SIZE_MIB << 20, "replicas": copies, "node": ID["node1"]}, T)
    assert s == 202, (s, t)
    wait(f"volume {name} ready, {copies} copies in sync", 120, lambda: all_in_sync(name, copies))
    assert volume(name)["replication"]["primary"] == ID["node1"], volume(name)

SOCK1 = f"{W}/cluster/node1/store/nbd.sock"
URI = {
    "r3": f"nbd+unix:///r3?socket={SOCK1}",
    "r1": f"nbd+unix:///r1?socket={SOCK1}",
    "nbdkit": f"nbd+unix:///?socket={W}/nbdkit.sock",
}


def fio(label, uri, rw, bs, qd, extra=()):
    out = subprocess.run(
        ["fio", f"--name={label}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={qd}", f"--size={SIZE_MIB}M", "--output-format=json", "--percentile_list=50:99", *extra],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"fio {label} failed: {out.stderr}")
    j = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "mib_s": side["bw"] / 1024, "p50_us": pct.get("50.000000", 0) / 1000,
            "p99_us": pct.get("99.000000", 0) / 1000}


def procs():
    """The cluster's processes: each node's store, and every tesserad together."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")[:-1]
        except OSError:
            continue
        if not argv or f"{W}/" not in " ".join(argv):
            continue
        if argv[0].endswith("tessera-store"):
            node = next((n for n in ("node1", "node2", "node3") if f"/cluster/{n}/" in " ".join(argv)), None)
            if node:
                out[f"store {node}"] = [int(pid)]
        elif argv[0].endswith("tesserad"):
            out.setdefault("tesserads", []).append(int(pid))
    return out


def cpu_seconds(pids):
    """CPU time (user + system) the processes used so far, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except OSError:
            pass
    return total / tick


def udp_datagrams():
    """UDP datagrams the machine sent and received so far (/proc/net/snmp; every process's,
    loopback QUIC among them)."""
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Udp:")]
    row = dict(zip(lines[0][1:], (int(x) for x in lines[1][1:])))
    return row["OutDatagrams"] + row["InDatagrams"]


def machine_busy():
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = f[3] + f[4]
    return (sum(f) - idle) / tick, sum(f) / tick


WORKLOADS = [("4k-randwrite-qd1", "randwrite", "4k", 1), ("4k-randwrite-qd16", "randwrite", "4k", 16),
             ("1m-seqwrite-qd8", "write", "1M", 8), ("4k-randread-qd16", "randread", "4k", 16)]
res = {}
# A counter for the 3-copy runs: the volume's generation before and after each (a raise
# means the cluster took a copy out of the in-sync set or put one back during the run).
gens = {}
# Where the CPU went in each write run: CPU seconds per process group, fio's own (a child),
# and the whole machine's busy time, over the run (ramp included).
cpu_use = {}
PERF = os.environ.get("PERF")
# PERF=1 profiles the 3-copy 1M run; PERF=<workload> that workload's 3-copy run.
PERF_RUN = "1m-seqwrite-qd8" if PERF in (None, "1") else PERF
if PERF and PERF_RUN not in [w for w, *_ in WORKLOADS]:
    raise SystemExit(f"PERF={PERF}: no such workload")
if PERF and not any(os.access(os.path.join(d, "perf"), os.X_OK) for d in os.environ["PATH"].split(":")):
    raise SystemExit("PERF=1 needs perf (Debian: apt-get install linux-perf)")
for target in ["nbdkit", "r1", "r3"]:
    print(f"bench: filling {target}", file=sys.stderr)
    fio("fill", URI[target], "write", "1M", 8)
    for w, rw, bs, qd in WORKLOADS:
        print(f"bench: {target} {w}", file=sys.stderr)
        g0 = volume("r3")["replication"]["generation"]
        groups = procs()
        before = {g: cpu_seconds(p) for g, p in groups.items()}
        child0 = os.times().children_user + os.times().children_system
        m0, t0, u0 = machine_busy(), time.monotonic(), udp_datagrams()
        perf = None
        if PERF and target == "r3" and w == PERF_RUN:
            # A profile of the three stores during one 3-copy run (PERF=1: the 1M one).
            pids = ",".join(str(p) for g, ps in groups.items() if g.startswith("store") for p in ps)
            perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", f"{W}/perf.data", "-p", pids],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res[(target, w)] = fio(w, URI[target], rw, bs, qd,
                               ("--time_based", f"--runtime={RUNTIME}", "--ramp_time=1"))
        if perf:
            perf.send_signal(2)
            perf.wait()
            rep = subprocess.run(["perf", "report", "-i", f"{W}/perf.data", "--no-children", "--sort", "comm,dso,sym",
                                  "--stdio", "-g", "none", "--percent-limit", "1.5"], capture_output=True, text=True)
            open(f"{W}/perf-r3.txt", "w").write(rep.stdout)
        m1, elapsed = machine_busy(), time.monotonic() - t0
        use = {g: cpu_seconds(p) - before.get(g, 0) for g, p in groups.items()}
        use["fio"] = os.times().children_user + os.times().children_system - child0
        use["machine busy"] = m1[0] - m0[0]
        cpu_use[(target, w)] = (use, elapsed, (m1[1] - m0[1]) / elapsed, udp_datagrams() - u0)
        if target == "r3":
            gens[w] = (g0, volume("r3")["replication"]["generation"])


# Catch-up: node3's store (a replica of r3) killed, CATCHUP_MIB written, store started again.
def store_of(node):
    mark = f"{W}/cluster/{node}/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")[:-1]
        except OSError:
            continue
        if argv and argv[0].endswith("tessera-store") and mark in " ".join(argv):
            return int(pid), argv
    return None, None


def replica_report(node_id):
    out = subprocess.run([STORE, "--admin-socket", f"{W}/cluster/node1/store/admin.sock", "--output", "json",
                          "replication"], capture_output=True, text=True, check=True)
    j = json.loads(out.stdout)
    vols = j["value"] if isinstance(j, dict) and "value" in j else j
    v = next(x for x in vols if x["volume"] == "r3")
    # An out-of-sync copy the primary is not yet catching up is not listed.
    # The store names a node by the first 16 hex digits of its id.
    return next((r for r in v["replicas"] if node_id.startswith(r["node"])), None)


pid, argv = store_of("node3")
assert pid, "no store of node3"
os.kill(pid, 9)
wait("node3's store gone", 20, lambda: not os.path.exists(f"/proc/{pid}") or
     open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z")
t_kill = time.monotonic()
print(f"bench: node3's store killed; writing {CATCHUP_MIB} MiB to r3", file=sys.stderr)
fio("away", URI["r3"], "write", "1M", 8, ("--refill_buffers", f"--io_size={CATCHUP_MIB}M"))
t_written = time.monotonic()

for sock in ("admin.sock", "nbd.sock"):
    try:
        os.remove(f"{W}/cluster/node3/store/{sock}")
    except FileNotFoundError:
        pass
log = open(f"{W}/cluster/node3/store.log", "ab")
p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
open(f"{W}/restarted.pid", "w").write(str(p.pid))
t_start = time.monotonic()
first, last, peak_total, sent, wire = None, None, 0, 0, 0
deadline = t_start + 300
while time.monotonic() < deadline:
    r = replica_report(ID["node3"])
    if r is None:
        time.sleep(0.02)
        continue
    st = r["state"]["state"]
    now = time.monotonic()
    # Counters of the primary's current configuration: the largest seen is the pass's.
    sent, wire = max(sent, r["catch_up_sent_bytes"]), max(wire, r["catch_up_wire_bytes"])
    if st == "catching_up":
        peak_total = max(peak_total, r["state"].get("total_bytes", 0))
        if first is None:
            first = (now, r)
    if st in ("caught_up", "in_sync") and first is not None:
        last = (now, r)
        break
    time.sleep(0.02)
if last is None:
    raise SystemExit(f"node3 never caught up: {replica_report(ID['node3'])}")
wait("r3 all in sync again", 120, lambda: all_in_sync("r3", 3))
t_in_sync = time.monotonic()
took = last[0] - first[0]
rate = (sent - first[1]["catch_up_sent_bytes"]) / 2**20 / max(took, 1e-9)

stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"### Replication benchmark, {stamp}\n")
print(f"Machine: {os.cpu_count()} cores ({cpu}), {platform.release()}; dev cluster on loopback, "
      f"fio nbd engine over node1's store's Unix socket, {SIZE_MIB} MiB targets, {RUNTIME} s per run.\n")
print("| workload | 3-copy IOPS | p50 µs | p99 µs | 1-copy IOPS | p50 µs | p99 µs | nbdkit IOPS | p50 µs | p99 µs | 3/1 IOPS | 3/1 p50 | 1/nbdkit IOPS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for w, *_ in WORKLOADS:
    a, b, k = res[("r3", w)], res[("r1", w)], res[("nbdkit", w)]
    print(f"| {w} | {a['iops']:.0f} | {a['p50_us']:.0f} | {a['p99_us']:.0f} | {b['iops']:.0f} | {b['p50_us']:.0f} | "
          f"{b['p99_us']:.0f} | {k['iops']:.0f} | {k['p50_us']:.0f} | {k['p99_us']:.0f} | "
          f"{a['iops'] / b['iops']:.2f}× | {a['p50_us'] / max(b['p50_us'], 1e-9):.2f}× | {b['iops'] / k['iops']:.2f}× |")
seq3, seq1 = res[("r3", "1m-seqwrite-qd8")]["mib_s"], res[("r1", "1m-seqwrite-qd8")]["mib_s"]
lat3, lat1 = res[("r3", "4k-randwrite-qd1")]["p50_us"], res[("r1", "4k-randwrite-qd1")]["p50_us"]
print()
print(f"Goal 1, 3-copy 1M sequential write ≥ 60 % of 1-copy: {seq3:.0f} vs {seq1:.0f} MiB/s = {seq3 / seq1:.0%} "
      f"({'met' if seq3 >= 0.6 * seq1 else 'MISSED'}).")
print(f"Goal 2, 3-copy 4K write QD1 latency ≤ 2× 1-copy: p50 {lat3:.0f} vs {lat1:.0f} µs = {lat3 / lat1:.2f}× "
      f"({'met' if lat3 <= 2 * lat1 else 'MISSED'}).")
print()
print("CPU seconds used during each write run (ramp included), by process; `machine busy` is every CPU's busy "
      "time over the run, against the CPUs' time available:")
print()
names = ["store node1", "store node2", "store node3", "tesserads", "fio", "machine busy"]
print("| target, workload | s | " + " | ".join(names) + " | available | store CPU ms per MiB | UDP datagrams per request |")
print("|---|---:|" + "---:|" * len(names) + "---:|---:|---:|")
for (target, w), (use, elapsed, ncpu, udp) in cpu_use.items():
    if "write" not in w or target == "nbdkit":
        continue
    mib = res[(target, w)]["mib_s"] * elapsed
    stores = sum(v for k, v in use.items() if k.startswith("store"))
    print(f"| {target}, {w} | {elapsed:.1f} | " + " | ".join(f"{use.get(n, 0):.2f}" for n in names)
          + f" | {elapsed * ncpu:.1f} | {1000 * stores / max(mib, 1e-9):.2f} "
          f"| {udp / max(res[(target, w)]['iops'] * elapsed, 1e-9):.1f} |")
if PERF:
    print(f"\nProfile of the stores during r3 {PERF_RUN}: {W}/perf-r3.txt (KEEP=1 keeps it).")
print()
print("3-copy volume's generation before -> after each run: "
      + ", ".join(f"{w} {a} -> {b}" for w, (a, b) in gens.items()) + ".")
print()
print(f"Catch-up: {CATCHUP_MIB} MiB written with node3's store down ({t_written - t_kill:.1f} s, the write waited for "
      f"the cluster to take the copy out of the in-sync set); "
      f"largest pass {peak_total / 2**20:.1f} MiB. From the first catching_up report to caught_up: {took:.2f} s, "
      f"{sent / 2**20:.1f} MiB of blocks sent ({rate:.0f} MiB/s; "
      f"{rate / seq1:.2f}× the 1-copy sequential write), {wire / 2**20:.1f} MiB on the wire. "
      f"Store restarted to all copies in sync in the API: {t_in_sync - t_start:.1f} s.")
