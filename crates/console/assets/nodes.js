// The Nodes page: the list (health, CPU, memory, storage, VMs) and a node's detail with
// graphs of its last hour (the node's metrics history, refreshed every 10 s with only the
// new points; the network per interface with a selector), its VMs and volumes, and
// removing a node that is down and maintenance mode on and off (Administrators).

import { h, replace, table, bytes, stateTag } from "./dom.js";
import { api } from "./api.js";
import { loadCharts, lineChart } from "./charts.js";

const main = document.getElementById("main");
const HOUR_MS = 3600 * 1000;
/** The history's interval: a new point every 10 s. */
const REFRESH_MS = 10000;

const rate = (v) => `${bytes(v)}/s`;
const CHARTS = [
  { id: "cpu", title: "CPU busy", fmt: (v) => `${v.toFixed(0)}%`, range: [0, 100],
    series: [{ label: "CPU", value: (p) => p.cpu_percent }] },
  { id: "memory", title: "Memory", fmt: bytes,
    series: [{ label: "Used", value: (p) => p.memory_used }, { label: "Total", value: (p) => p.memory_total }] },
  { id: "disk", title: "Disk space (largest filesystem)", fmt: bytes,
    series: [{ label: "Used", value: (p) => p.disk_used }, { label: "Size", value: (p) => p.disk_total }] },
  { id: "diskio", title: "Disk I/O", fmt: rate,
    series: [{ label: "Read", value: (p) => p.disk_read_bps }, { label: "Written", value: (p) => p.disk_write_bps }] },
  { id: "network", title: "Network", fmt: rate,
    series: [{ label: "Received", value: (p) => p.net_rx_bps }, { label: "Sent", value: (p) => p.net_tx_bps }] },
];

/** The interface graph's series: what `name` received and sent. */
const ifaceSeries = (name) => {
  const of = (p) => (p.interfaces ?? []).find((i) => i.name === name);
  return [{ label: `${name} received`, value: (p) => of(p)?.rx_bps }, { label: `${name} sent`, value: (p) => of(p)?.tx_bps }];
};

/** The interfaces in `points`, busiest first (most bytes over the points), then by name. */
function interfacesByTraffic(points) {
  const moved = new Map();
  for (const p of points) {
    for (const i of p.interfaces ?? []) moved.set(i.name, (moved.get(i.name) ?? 0) + (i.rx_bps ?? 0) + (i.tx_bps ?? 0));
  }
  return [...moved.keys()].sort((a, b) => moved.get(b) - moved.get(a) || a.localeCompare(b));
}

const disk = (n) => (n.metrics?.disks ?? []).reduce((best, x) => (!best || x.total > best.total ? x : best), null);
const nodeLabel = (n) => n.name ?? n.id;
const volumesOn = (volumes, n) => volumes.filter((v) => v.node === n.id ||
  (v.replication?.copies ?? []).some((c) => c.node === n.id));

/**
 * The view for `#/nodes` and `#/nodes/<id or name>`. `env` is what the console shell
 * shares: `current(gen)` (is this view still shown), `can(role)`, `messages()`,
 * `pageMessage(text, ok)`, `confirmAction(label, name, fn)`, `refresh()`.
 */
export function nodesPage(env) {
  // The detail page shown, kept between refreshes so only new points are fetched.
  let detail = { gen: -1, id: null, points: [], charts: null, iface: null };

  // Nodes whose plain removal the API refused, with its words: they are offered a forced
  // one (the API's `force=true`), which loses what only that node held.
  const refused = new Map();

  /**
   * For an Administrator and a node that is down: "Remove" (asks twice), and once the API
   * refused that (the node holds volumes), "Force remove" (asks twice too) with the API's
   * reason beside it. A node that is up or suspect has neither: a node that is alive is
   * not removed from here.
   */
  function removeButton(n) {
    if (!env.can("administrator") || n.state !== "down") {
      refused.delete(n.id);
      return null;
    }
    const label = nodeLabel(n);
    const done = () => {
      refused.delete(n.id);
      env.pageMessage(`${label} removed from the cluster`, true);
      if (location.hash !== "#/nodes") location.hash = "#/nodes";
      else env.refresh();
    };
    const plain = env.confirmAction("Remove", label, async () => {
      try {
        await api("DELETE", `nodes/${encodeURIComponent(n.id)}`);
      } catch (e) {
        if (e.status === 409) {
          refused.set(n.id, e.message);
          env.refresh();
        }
        throw e;
      }
      done();
    });
    if (!refused.has(n.id)) return plain;
    const force = env.confirmAction("Force remove", label, async () => {
      await api("DELETE", `nodes/${encodeURIComponent(n.id)}?force=true`);
      done();
    });
    // Why is in the page's message (the API's words); here, what forcing costs.
    return h("span.remove-node", {}, force, h("span.muted", {}, `Loses what only ${label} holds.`));
  }

  /**
   * For an Administrator and a node that is not down: "Maintenance" (the node takes no new
   * VMs and its running VMs leave by live migration) or, in maintenance, "End maintenance";
   * each asks twice.
   */
  function maintenanceButton(n) {
    if (!env.can("administrator") || n.state === "down") return null;
    const label = nodeLabel(n);
    const on = Boolean(n.maintenance);
    return env.confirmAction(on ? "End maintenance" : "Maintenance", label, async () => {
      await api("POST", `nodes/${encodeURIComponent(n.id)}/maintenance`, { enabled: !on });
      env.pageMessage(on ? `${label} takes VMs again` : `${label} in maintenance: its VMs move away`, true);
      env.refresh();
    });
  }

  /** A node's maintenance as the list shows it beside its state. */
  const maintenanceNote = (m) => (!m ? "" : m.drained ? " · maintenance, drained"
    : ` · maintenance, draining: ${m.vms_left.join(", ")}`);

  async function list(gen) {
    // The VM counts come with the nodes (their allocation): the list needs no VM records.
    const nodes = await api("GET", "nodes");
    if (!env.current(gen)) return undefined;
    const admin = env.can("administrator");
    const rows = nodes.map((n) => {
      const d = disk(n);
      const r = [
        h("a", { href: `#/nodes/${encodeURIComponent(n.id)}` }, nodeLabel(n)),
        h("span", {}, stateTag(n.state), maintenanceNote(n.maintenance)),
        `${(n.metrics?.cpu_percent ?? 0).toFixed(0)}% of ${n.metrics?.cpus ?? "?"}`,
        `${bytes(n.metrics?.memory_used)} / ${bytes(n.metrics?.memory_total)}`,
        h("span", {}, stateTag(n.storage?.state ?? "unknown"), d ? ` · ${bytes(d.available)} free of ${bytes(d.total)}` : ""),
        String(n.allocation?.vms ?? 0),
      ];
      if (admin) r.push(h("td.actions", {}, maintenanceButton(n), removeButton(n)));
      r.attrs = { "data-node": nodeLabel(n) };
      return r;
    });
    replace(main, h("h1", {}, "Nodes"), env.messages(),
      table("Nodes", ["Node", "State", "CPU", "Memory", "Storage", "VMs placed", admin ? "Actions" : null].filter(Boolean), rows, "No nodes."),
      h("p.muted", {}, "A node's page shows its last hour: CPU, memory, disk and network, and its VMs. VMs placed: those placed there and not stopped. Only a node that is down can be removed. A node in maintenance takes no new VMs; its running VMs move away by live migration."));
    return 5000;
  }

  function skeleton(n) {
    replace(main,
      h("p", {}, h("a", { href: "#/nodes" }, "← Nodes")),
      h("h1#node-title", {}, `Node ${nodeLabel(n)}`),
      env.messages(),
      h("section.card#node-summary", { "aria-label": "Summary" }),
      h("h2", {}, "Last hour"),
      h("p.muted#node-graphs-status", { role: "status" }),
      h("div.charts#node-charts", {}, CHARTS.map((c) => h("figure.chart-card", {},
        h("figcaption", {}, c.title, " ", h(`span.muted#chart-${c.id}-now`)),
        h(`div.chart#chart-${c.id}`, { role: "img", "aria-label": `${c.title} over the last hour` }))),
        h("figure.chart-card", {},
          h("figcaption", {}, "Network by interface ",
            h("label.inline", { for: "chart-ifnet-select" }, "Interface"), " ",
            h("select#chart-ifnet-select", { onchange: (e) => drawInterface(e.target.value) }), " ",
            h("span.muted#chart-ifnet-now")),
          h("div.chart#chart-ifnet", { role: "img", "aria-label": "Network traffic of the chosen interface over the last hour" }))),
      h("h2", {}, "VMs on this node"),
      h("div#node-vms"),
      h("h2", {}, "Volumes on this node"),
      h("div#node-volumes"));
  }

  function summary(n, vms) {
    const d = disk(n);
    const a = n.allocation ?? {};
    replace(document.getElementById("node-summary"),
      h("p", {}, stateTag(n.state), ` · id ${n.id}`, n.address ? ` · ${typeof n.address === "string" ? n.address : JSON.stringify(n.address)}` : ""),
      h("p", {}, `CPU: ${(n.metrics?.cpu_percent ?? 0).toFixed(0)}% busy of ${n.metrics?.cpus ?? "?"} cores; ${a.vcpus_allocated ?? 0} vCPUs given to VMs`),
      h("p", {}, `Memory: ${bytes(n.metrics?.memory_used)} used of ${bytes(n.metrics?.memory_total)}; VMs placed take ${bytes((a.memory_mib_allocated ?? 0) * 2 ** 20)}`),
      h("p", {}, "Storage: ", stateTag(n.storage?.state ?? "unknown"), n.storage?.reason ? ` ${n.storage.reason}` : "",
        d ? ` · ${bytes(d.total - d.available)} used, ${bytes(d.available)} free of ${bytes(d.total)}` : ""),
      h("p", {}, `VMs: ${vms.length}`),
      removeButton(n));
  }

  async function show(gen, id) {
    const fresh = detail.gen !== gen || detail.id !== id || !document.getElementById("node-charts");
    if (fresh) {
      detail.iface?.chart.destroy();
      detail = { gen, id, points: [], charts: null, iface: null };
    }
    const last = detail.points.at(-1)?.t_ms;
    const [nodes, mine, volumes, hist] = await Promise.all([
      // Only this node's VMs (where they run, else where placed, else pinned).
      api("GET", "nodes"), api("GET", `vms?node=${encodeURIComponent(id)}`), api("GET", "volumes"),
      // A node that is down cannot answer for its history: the page says so and shows
      // the rest.
      api("GET", `nodes/${encodeURIComponent(id)}/metrics${last ? `?since=${last}` : ""}`).catch((e) => e),
    ]);
    if (!env.current(gen)) return undefined;
    const n = nodes.find((x) => x.id === id || x.name === id);
    if (!n) {
      replace(main, h("h1", {}, "No such node"), h("p", {}, `No node ${id} in the cluster. `, h("a", { href: "#/nodes" }, "Nodes")));
      return "manual";
    }
    if (fresh || !document.getElementById("node-charts")) skeleton(n);
    document.title = `Tessera · node ${nodeLabel(n)}`;
    summary(n, mine);
    replace(document.getElementById("node-vms"), table("VMs on this node", ["Name", "State", "vCPUs", "Memory", "Disks"],
      mine.map((v) => Object.assign([v.name, stateTag(v.actual_state), String(v.vcpus), `${v.memory_mib} MiB`, v.disks.join(", ") || "–"],
        { attrs: { "data-vm": v.name } })), "No VM runs or is placed here."));
    replace(document.getElementById("node-volumes"), table("Volumes on this node", ["Name", "Size", "State", "Copy", "Attached to"],
      volumesOn(volumes, n).map((v) => Object.assign([v.name, bytes(v.size_bytes), stateTag(v.state),
        v.node === n.id ? (v.replication?.copies?.length > 1 ? "primary" : "only copy") : "replica", v.attached_to ?? "–"],
      { attrs: { "data-volume": v.name } })), "No volume is stored here."));
    const status = document.getElementById("node-graphs-status");
    if (hist instanceof Error) {
      if (hist.status === 401) throw hist;
      status.textContent = `The history could not be read: ${hist.message}`;
    } else {
      const merged = detail.points.concat(hist.points);
      const newest = merged.at(-1)?.t_ms ?? 0;
      detail.points = merged.filter((p) => p.t_ms > newest - HOUR_MS);
      status.textContent = detail.points.length
        ? `${detail.points.length} points, every ${hist.interval_s} s; refreshed every ${REFRESH_MS / 1000} s.`
        : "No points yet: the node takes one every 10 s.";
    }
    if (!detail.charts) {
      const uPlot = await loadCharts();
      if (!env.current(gen) || !document.getElementById("node-charts")) return undefined;
      detail.charts = CHARTS.map((c) => lineChart(uPlot, document.getElementById(`chart-${c.id}`), c));
    }
    const latest = detail.points.at(-1);
    CHARTS.forEach((c, i) => {
      detail.charts[i].set(detail.points);
      const now = latest ? c.series.map((s) => {
        const v = s.value(latest);
        return `${s.label.toLowerCase()} ${v === null || v === undefined ? "–" : c.fmt(v)}`;
      }).join(", ") : "";
      document.getElementById(`chart-${c.id}-now`).textContent = now ? `(now: ${now})` : "";
    });
    interfaceChart();
    return REFRESH_MS;
  }

  /**
   * The per-interface graph: the interfaces of the history offered in the selector
   * (busiest first), the chosen one (at first the busiest) drawn. Says so when the node's
   * points have none (a node of an older version).
   */
  function interfaceChart() {
    const select = document.getElementById("chart-ifnet-select");
    if (!select || !window.uPlot) return;
    const names = interfacesByTraffic(detail.points);
    const shown = [...select.options].map((o) => o.value);
    const chosen = detail.iface?.name;
    if (names.join("\n") !== shown.join("\n")) {
      replace(select, names.map((n) => h("option", { value: n, selected: n === chosen }, n)));
    }
    select.disabled = names.length === 0;
    if (names.length === 0) {
      document.getElementById("chart-ifnet-now").textContent = "(no interface in the history)";
      return;
    }
    drawInterface(chosen && names.includes(chosen) ? chosen : names[0]);
  }

  /** Draws interface `name`'s graph (a new chart when the interface changes). */
  function drawInterface(name) {
    const box = document.getElementById("chart-ifnet");
    if (!box || !window.uPlot) return;
    if (detail.iface?.name !== name) {
      detail.iface?.chart.destroy();
      detail.iface = { name, chart: lineChart(window.uPlot, box, { series: ifaceSeries(name), fmt: rate }) };
      box.dataset.interface = name;
      document.getElementById("chart-ifnet-select").value = name;
    }
    detail.iface.chart.set(detail.points);
    const latest = detail.points.at(-1);
    const now = latest ? ifaceSeries(name).map((s) => {
      const v = s.value(latest);
      return `${s.label.replace(`${name} `, "")} ${v === null || v === undefined ? "–" : rate(v)}`;
    }).join(", ") : "";
    document.getElementById("chart-ifnet-now").textContent = now ? `(now: ${now})` : "";
  }

  return async (gen) => {
    const id = decodeURIComponent(location.hash.replace(/^#\/?/, "").split("/")[1] ?? "");
    return id ? show(gen, id) : list(gen);
  };
}
