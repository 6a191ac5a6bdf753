#!/usr/bin/env python3
"""The monitor's log of tests/image/rolling-upgrade judged: one line per round,
"epoch|leader release/slot|..." for node1-3, "-" where a node did not answer. Prints what
it saw; exits 1 naming each rule broken: some API answering (gaps <= 30 s), two nodes
agreeing on a leader (<= 60 s: elections), never two nodes away (<= 30 s), node3 never
away, node1 seen on N+1 before node2 and node2 not on N+1 then.

    tests/image/rolling-monitor.py MONITOR_LOG
"""
import sys
rows = []
for line in open(sys.argv[1]):
    t, *nodes = line.strip().split("|")
    rows.append((int(t), [n.split(" ") for n in nodes]))
if len(rows) < 20:
    sys.exit(f"only {len(rows)} monitor rounds")
def longest(bad):
    """The longest stretch of seconds over rounds where bad(row) holds."""
    worst, since = 0, None
    for t, n in rows:
        if bad(n):
            since = t if since is None else since
            worst = max(worst, t - since)
        else:
            since = None
    return worst
answering = lambda n: [x for x in n if x[0] != "-"]
no_api = longest(lambda n: not answering(n))
def no_quorum(n):
    leaders = [x[0] for x in answering(n) if x[0] != "None"]
    return not any(leaders.count(l) >= 2 for l in leaders)
no_q = longest(no_quorum)
two_away = longest(lambda n: len(answering(n)) <= 1)
away = [sum(1 for _, n in rows if n[i][0] == "-") for i in range(3)]
# When each node was first seen on N+1, and what the others ran then.
first = {}
for t, n in rows:
    for i in range(3):
        if n[i][1].startswith("test-n1/") and i not in first:
            first[i] = (t, [x[1] for x in n])
print(f"monitor: {len(rows)} rounds over {rows[-1][0] - rows[0][0]} s; longest without any API "
      f"answering {no_api} s, without two nodes agreeing on a leader {no_q} s, with two "
      f"nodes away {two_away} s; rounds each node did not answer: {away}")
for i in sorted(first):
    print(f"monitor: node{i + 1} first on N+1 at +{first[i][0] - rows[0][0]} s (releases then: {first[i][1]})")
bad = []
if no_api > 30:
    bad.append(f"no API answered for {no_api} s")
if no_q > 60:
    bad.append(f"no quorum evident for {no_q} s")
if two_away > 30:
    bad.append(f"two nodes away at once for {two_away} s")
if away[2]:
    bad.append(f"node3, never upgraded, did not answer {away[2]} rounds")
if sorted(first) != [0, 1]:
    bad.append(f"nodes seen on N+1: {sorted(i + 1 for i in first)}, not node1 and node2")
elif not (first[0][0] < first[1][0] and not first[0][1][1].startswith("test-n1/")):
    bad.append("node2 did not stay on N until node1 was back on N+1")
for b in bad:
    print("monitor: " + b)
sys.exit(1 if bad else 0)
