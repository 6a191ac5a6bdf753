"""The local three-node cluster (tessera-devcluster on 127.0.0.1-3) seen by a benchmark:
its REST API (HTTPS checked against the cluster CA, a 503 retried with backoff), its nodes'
directories and processes, and the VMs' console files. Used by ha.py and migrate.py."""
import glob
import http.client
import json
import os
import ssl
import time

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


class Cluster:
    def __init__(self, work, password):
        self.w = work
        self.ctx = ssl.create_default_context(cafile=f"{work}/cluster/node1/data/tls/ca.crt")
        self.ctx.check_hostname = False
        self.token = None
        self.retries = 0
        _, v = self.call("POST", "login", {"username": "admin", "password": password})
        first = v["token"]
        self.call("POST", "password",
                  {"old_password": password, "new_password": "benchmark password"}, token=first)
        _, v = self.call("POST", "login", {"username": "admin", "password": "benchmark password"})
        self.token = v["token"]

    def call_once(self, method, path, body, token, host):
        c = http.client.HTTPSConnection(host, 8006, context=self.ctx, timeout=30)
        h = {"content-type": "application/json"}
        if token:
            h["authorization"] = f"Bearer {token}"
        c.request(method, "/api/v1/" + path, json.dumps(body) if body is not None else None, h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, (json.loads(data) if data else None)

    def call(self, method, path, body=None, token=None, hosts=None):
        """One request, to the first host of `hosts` that answers (default: all three, so a
        killed node's address is skipped); a 503 (no leader confirmed yet) is retried."""
        token = token or self.token
        delay = 0.1
        last = None
        for _ in range(12):
            for host in hosts or HOSTS:
                try:
                    s, v = self.call_once(method, path, body, token, host)
                except (OSError, http.client.HTTPException) as e:
                    last = (0, str(e))
                    continue
                if s != 503:
                    return s, v
                last = (s, v)
                break
            self.retries += 1
            time.sleep(delay)
            delay = min(2.0, delay * 2)
        raise RuntimeError(f"{method} {path}: no answer, last {last}")

    def get(self, path, hosts=None):
        s, v = self.call("GET", path, hosts=hosts)
        if s != 200:
            raise RuntimeError(f"GET {path}: {s} {v}")
        return v

    def wait(self, what, f, timeout=120, every=0.1):
        t0 = time.time()
        while time.time() - t0 < timeout:
            v = f()
            if v:
                return v
            time.sleep(every)
        raise RuntimeError(f"timed out waiting for {what}")

    def nodes(self, hosts=None):
        """Node index (1..3: the devcluster names them node1..node3) -> the node's record."""
        return {int(n["name"][4:]): n for n in self.get("nodes", hosts)}

    def node_dir(self, i):
        return f"{self.w}/cluster/node{i}"

    def vm_dirs(self, name):
        return glob.glob(f"{self.w}/cluster/node*/data/vms/{name}")

    def wait_task(self, tid, timeout=300):
        def done():
            s, t = self.call("GET", f"tasks/{tid}")
            return t if s == 200 and t["state"] in ("succeeded", "failed") else None
        return self.wait(f"task {tid}", done, timeout, 0.02)

    def volume(self, name, size, replicas, node_id):
        s, v = self.call("POST", "volumes", {"name": name, "size_bytes": size,
                                             "replicas": replicas, "node": node_id})
        assert s == 202, (s, v)
        assert self.wait_task(v["id"])["state"] == "succeeded"
        self.wait_in_sync(name, replicas)

    def wait_in_sync(self, name, replicas, timeout=180):
        def synced():
            v = self.get(f"volumes/{name}")
            copies = (v.get("replication") or {}).get("copies") or []
            return v["state"] == "ready" and len(copies) == replicas and all(
                c["state"] == "in_sync" and "joining" not in c for c in copies)
        self.wait(f"{name}'s copies in sync", synced, timeout, 0.2)


def pids_of(mark):
    """Processes whose command line holds `mark`: pid -> argv."""
    out = {}
    for c in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = open(c, "rb").read().split(b"\0")[:-1]
        except OSError:
            continue
        if any(mark.encode() in a for a in argv):
            out[int(c.split("/")[2])] = [a.decode() for a in argv]
    return out


class CountWatch:
    """The first time each `count N` line appears in any of a VM's console files, polled
    every millisecond, read incrementally (a file that shrinks was started anew)."""

    def __init__(self, paths_fn):
        self.paths_fn = paths_fn
        self.offsets = {}
        self.partial = {}
        self.first = {}

    def poll(self):
        now = time.perf_counter()
        for p in self.paths_fn():
            try:
                size = os.path.getsize(p)
                if size < self.offsets.get(p, 0):
                    self.offsets[p], self.partial[p] = 0, ""
                with open(p, errors="replace") as f:
                    f.seek(self.offsets.get(p, 0))
                    data = f.read()
                    self.offsets[p] = f.tell()
            except FileNotFoundError:
                continue
            text = self.partial.get(p, "") + data
            lines = text.split("\n")
            self.partial[p] = lines.pop()
            for line in lines:
                if line.startswith("count "):
                    try:
                        n = int(line[6:].strip())
                    except ValueError:
                        continue
                    self.first.setdefault(n, now)

    def gaps(self, since, until):
        """(interval between consecutive counts, count) for counts first seen in
        [since, until]."""
        # A copy: the polling thread adds counts meanwhile.
        seen = sorted((n, t) for n, t in list(self.first.items()) if since <= t <= until)
        return [(b[1] - a[1], b[0]) for a, b in zip(seen, seen[1:]) if b[0] == a[0] + 1]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
