#!/usr/bin/env python3
"""The console benchmark's driver (bench/console.sh starts the cluster and chromedriver):
defines VMS VMs through the API, then drives headless Chromium over WebDriver (plain HTTP
JSON, no client library) and prints Markdown tables: the measures, and where each page's
time to interactive goes (from the same loads' performance entries). Arguments:
chromedriver port, the initial admin password, the cluster CA file."""

import json
import os
import ssl
import statistics
import sys
import time
import urllib.request

PORT, INITIAL, CA = int(sys.argv[1]), sys.argv[2], sys.argv[3]
REPEAT = int(os.environ.get("REPEAT", "10"))
VMS = int(os.environ.get("VMS", "1000"))
ORIGIN = "https://127.0.0.1:8006"
PASSWORD = "benchmark password 1"
TLS = ssl.create_default_context(cafile=CA)


def api(method, path, body=None, token=None):
    req = urllib.request.Request(f"{ORIGIN}/api/v1/{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, context=TLS, timeout=60) as r:
        return json.loads(r.read() or b"null")


def wd(method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["value"]


def main():
    tok = api("POST", "login", {"username": "admin", "password": INITIAL})["token"]
    api("POST", "password", {"old_password": INITIAL, "new_password": PASSWORD}, tok)
    tok = api("POST", "login", {"username": "admin", "password": PASSWORD})["token"]
    t0 = time.monotonic()
    for i in range(VMS):
        api("POST", "vms", {"name": f"bench-{i:04d}", "vcpus": 1, "memory_mib": 64,
                            "kernel": "/nonexistent/bench-kernel"}, tok)
    print(f"{VMS} VMs defined in {time.monotonic() - t0:.1f} s")
    for _ in range(300):
        try:
            wd("GET", "/status")
            break
        except OSError:
            time.sleep(0.1)
    caps = {"capabilities": {"alwaysMatch": {
        "acceptInsecureCerts": True,
        "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": [
            "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1280,800", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"]}}}}
    sid = wd("POST", "/session", caps)["sessionId"]
    s = f"/session/{sid}"

    def js(script, *args):
        return wd("POST", f"{s}/execute/sync", {"script": script, "args": list(args)})

    def js_async(script, *args):
        return wd("POST", f"{s}/execute/async", {"script": script, "args": list(args)})

    try:
        wd("POST", f"{s}/timeouts", {"script": 120000})
        wd("POST", f"{s}/url", {"url": f"{ORIGIN}/ui/favicon.svg"})
        # The session cookie, set by the browser's own login call.
        status = js_async("""const [u, p, done] = arguments;
            fetch('/api/v1/login', {method: 'POST', headers: {'content-type': 'application/json'},
              body: JSON.stringify({username: u, password: p})}).then(r => done(r.status));""",
                          "admin", PASSWORD)
        assert status == 200, status
        marks = {"dashboard": ("", "return !!document.getElementById('health')"),
                 # The first page (50 rows) and the count of every VM: the list is paged.
                 "VM list": ("vms", f"const c = document.getElementById('vm-count'); "
                             f"return document.querySelectorAll('tr[data-vm]').length >= {min(VMS, 50)} "
                             f"&& !!c && c.textContent.endsWith(' of {VMS}')")}
        rows, phases = [], []
        for label, (page, ready) in marks.items():
            tti, weight, decoded, calls, api_alone = [], [], [], [], []
            split = []
            for _ in range(REPEAT):
                wd("POST", f"{s}/url", {"url": "about:blank"})
                wd("POST", f"{s}/url", {"url": f"{ORIGIN}/ui/#/{page}"})
                # Polled in the page on every frame: the time the content is there.
                t = js_async(f"""const done = arguments[0];
                    const ready = () => {{ {ready} }};
                    const tick = () => ready() ? done(performance.now()) : requestAnimationFrame(tick);
                    tick();""")
                entries = js("""const n = performance.getEntriesByType('navigation')[0];
                    return [n].concat(performance.getEntriesByType('resource')).map(e =>
                      [e.name, e.initiatorType || 'navigation', e.transferSize, e.decodedBodySize, e.startTime,
                       e.responseEnd]);""")
                before = [e for e in entries if e[4] <= t]
                tti.append(t)
                weight.append(sum(e[2] for e in before))
                decoded.append(sum(e[3] for e in before))
                used = [e[0] for e in before if "/api/v1/" in e[0] and e[1] == "fetch"]
                calls.append(len(used))
                # Where the time went: the document; the console's own files (scripts and
                # style sheets, imported modules included); the first API call sent, the
                # session check answered (the lists wait for it), the last answer; the
                # rest until the content is on screen is building the page.
                apis = [e for e in before if "/api/v1/" in e[0] and e[1] == "fetch"]
                files = [e for e in before if e[1] not in ("navigation", "fetch")]
                session = [e[5] for e in apis if e[0].endswith("/api/v1/session")]
                split.append((
                    before[0][5],
                    max((e[5] for e in files), default=0),
                    min((e[4] for e in apis), default=0),
                    session[0] if session else 0,
                    max((e[5] for e in apis), default=0),
                    t))
                # The reference: the same API calls alone, from a blank page of the origin.
                wd("POST", f"{s}/url", {"url": f"{ORIGIN}/ui/favicon.svg"})
                api_alone.append(js_async("""const [urls, done] = arguments; const t = performance.now();
                    Promise.all(urls.map(u => fetch(u, {credentials: 'same-origin'}).then(r => r.json())))
                      .then(() => done(performance.now() - t));""", used))
            rows.append((label, statistics.median(tti), statistics.median(api_alone),
                         statistics.median(weight), statistics.median(decoded), max(calls)))
            phases.append((label, [statistics.median(x) for x in zip(*split)]))
        # The static files alone (the page's own weight without data).
        wd("POST", f"{s}/url", {"url": f"{ORIGIN}/ui/favicon.svg"})
        static = js_async("""const done = arguments[0]; const t = performance.now();
            const files = ['index.html', 'style.css', 'app.js', 'api.js', 'dom.js', 'forms.js', 'activity.js',
              'resize.js', 'vm.js', 'vm_edit.js', 'vms.js', 'terminal.js', 'networks.js', 'nodes.js', 'charts.js',
              'twofactor.js'];
            Promise.all(files.map(f => fetch('/ui/' + f).then(r => r.arrayBuffer())))
              .then(b => done([performance.now() - t, b.reduce((a, x) => a + x.byteLength, 0)]));""")
    finally:
        wd("DELETE", s)
    print(f"\n{VMS} VMs defined; median of {REPEAT} full loads; Chromium headless, 1280x800\n")
    print("| page | time to interactive | the same API calls alone | page weight (wire / decoded) | API calls per view |")
    print("|---|---|---|---|---|")
    for label, t, alone, w, d, c in rows:
        print(f"| {label} | {t:.0f} ms | {alone:.0f} ms | {w / 1024:.0f} KiB / {d / 1024:.0f} KiB | {c} |")
    print(f"\nreference: the console's static files alone (no API): {static[1] / 1024:.0f} KiB in {static[0]:.0f} ms")
    print("\nWhere the time goes (ms after the navigation's start, medians of the same loads):\n")
    print("| page | document received | console's files received | first API call sent "
          "| session answered | last API answer | interactive |")
    print("|---|---|---|---|---|---|---|")
    for label, p in phases:
        print(f"| {label} | " + " | ".join(f"{x:.0f}" for x in p) + " |")


if __name__ == "__main__":
    main()
