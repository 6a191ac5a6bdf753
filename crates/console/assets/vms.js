// The VM list (`#/vms`): one page of VMs at a time, filtered by the server (the API's
// `GET /vms` with `q`, `state`, `limit` and `offset`), so a cluster of 1,000 VMs sends the
// 50 shown, not every VM; the row actions; the create wizard. The page, the filter and
// the state are in the address (`#/vms?q=web&state=running&offset=50`): links, Back and
// a reload keep them.

import { h, replace, field, table, bytes, stateTag } from "./dom.js";
import { api, apiPage } from "./api.js";
import {
  announce, submit, formError, messages, pageMessage, action, confirmAction, sizeInput, nodeSelect, nodeName,
  followTask, keep,
} from "./forms.js";

const main = document.getElementById("main");

/** VMs per page of the list. */
export const PAGE_SIZE = 50;
export const VM_STATES = ["starting", "running", "paused", "stopping", "stopped", "crashed", "unknown"];

/** The list's filter and page, from the address (`#/vms?q=..&state=..&offset=..`). */
function listParams() {
  const p = new URLSearchParams(location.hash.split("?")[1] ?? "");
  const state = VM_STATES.includes(p.get("state")) ? p.get("state") : "";
  return { q: p.get("q") ?? "", state, offset: Math.max(0, Math.floor(Number(p.get("offset")) || 0)) };
}

function listHash({ q, state, offset }) {
  const p = new URLSearchParams();
  if (q) p.set("q", q);
  if (state) p.set("state", state);
  if (offset) p.set("offset", String(offset));
  const s = p.toString();
  return `#/vms${s ? `?${s}` : ""}`;
}

function listQuery({ q, state, offset }) {
  const p = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (offset) p.set("offset", String(offset));
  if (q.trim()) p.set("q", q.trim());
  if (state) p.set("state", state);
  return `vms?${p}`;
}

let env = { current: () => false, can: () => false, refresh: () => {} };

/**
 * The VM list's view and the row actions a VM's page shares. `shell`: `current(gen)`,
 * `can(role)`, `refresh()`.
 */
export function vmsPage(shell) {
  env = shell;
  // Answers to filter changes can arrive out of order: only the latest is drawn.
  let asked = 0;

  async function view(gen) {
    const params = listParams();
    const op = env.can("operator");
    const [page, nodes, volumes, images, networks, templates] = await Promise.all([
      apiPage(listQuery(params)), api("GET", "nodes"),
      op ? api("GET", "volumes") : [], op ? api("GET", "images") : [], op ? api("GET", "networks") : [],
      op ? api("GET", "vms?template=true") : [],
    ]);
    if (!env.current(gen)) return undefined;
    // The inputs stay the same elements across refreshes: typing is not interrupted.
    const filter = document.getElementById("vm-filter") ??
      h("input#vm-filter", { type: "search", name: "filter", placeholder: "name, node or disk", value: params.q });
    const stateSel = document.getElementById("vm-state") ?? h("select#vm-state", { name: "state" },
      h("option", { value: "" }, "Any state"), VM_STATES.map((s) => h("option", { value: s, selected: s === params.state }, s)));
    const searchRow = filter.closest(".row") ?? h("div.row", { role: "search" }, field("Filter", filter), field("State", stateSel));
    const list = h("div#vm-list");
    // The count and the page links above the rows, where they are seen without scrolling.
    const draw = (p, shown, into) => replace(into, pager(shown, p), listTable(shown, nodes, p));
    let typing = null;
    const changed = () => {
      clearTimeout(typing);
      // The server filters: ask once the user pauses, from the first page.
      typing = setTimeout(async () => {
        const p = { q: filter.value, state: stateSel.value, offset: 0 };
        history.replaceState(null, "", listHash(p));
        const mine = ++asked;
        try {
          const shown = await apiPage(listQuery(p));
          // A refresh may have replaced the list meanwhile: draw into the one shown.
          if (mine === asked && env.current(gen)) draw(p, shown, document.getElementById("vm-list") ?? list);
        } catch (e) {
          if (mine === asked) pageMessage(`VMs: ${e.message}`);
        }
      }, 250);
    };
    filter.oninput = changed;
    stateSel.onchange = changed;
    ++asked;
    draw(params, page, list);
    const parts = [h("h1", {}, "Virtual machines"), messages(), searchRow, list];
    if (op) parts.push(keep("vm-create", vmCreateForm(nodes, volumes, { templates, images, networks })));
    const focused = document.activeElement;
    replace(main, ...parts);
    if (focused && main.contains(focused)) focused.focus();
    return 5000;
  }

  return { view, vmActions };
}

function listTable({ items, total }, nodes, p) {
  const op = env.can("operator");
  const empty = total || p.q || p.state ? "No VM matches." : "No VMs yet.";
  return table("VMs", ["Name", "State", "Node", "vCPUs", "Memory", "Disks", op ? "Actions" : null].filter(Boolean),
    items.map((v) => {
      const r = [
        h("a", { href: `#/vm/${encodeURIComponent(v.name)}` }, v.name),
        h("span", {}, stateTag(v.actual_state), v.desired_state !== v.actual_state ? h("span.muted", {}, ` → ${v.desired_state}`) : "",
          v.state_reason ? h("div.muted", {}, v.state_reason) : null),
        nodeName(nodes, v.running_on ?? v.placed_on ?? v.node),
        String(v.vcpus), `${v.memory_mib} MiB`, v.disks.join(", ") || "–",
      ];
      if (op) r.push(h("td.actions", {}, vmActions(v)));
      r.attrs = { "data-vm": v.name };
      return r;
    }), total && p.offset >= total ? "No VMs on this page." : empty);
}

/** "VMs 51–100 of 1000" and links to the pages before and after. */
function pager({ items, total }, p) {
  const to = p.offset + items.length;
  const link = (label, offset, rel) => h("a", { href: listHash({ ...p, offset }), rel, "data-page": rel }, label);
  return h("nav.pager#vm-pager", { "aria-label": "Pages of VMs" },
    h("span#vm-count", { role: "status" }, items.length ? `VMs ${p.offset + 1}–${to} of ${total}` : `None here; ${total} in all`),
    p.offset > 0 ? link("← Previous", Math.max(0, p.offset - PAGE_SIZE), "prev") : null,
    to < total ? link("Next →", p.offset + PAGE_SIZE, "next") : null);
}

function vmActions(v) {
  const go = (act) => async () => {
    await api("POST", `vms/${encodeURIComponent(v.name)}/${act}`);
    pageMessage(`${v.name}: ${act} requested`, true);
    announce(`${v.name}: ${act} requested`);
    env.refresh();
  };
  const s = v.actual_state;
  const out = [];
  if (s === "stopped" || s === "crashed") out.push(action("Start", v.name, go("start"), "primary"));
  if (s === "running") out.push(action("Stop", v.name, go("stop")), action("Reboot", v.name, go("reboot")), action("Pause", v.name, go("pause")));
  if (s === "paused") out.push(action("Resume", v.name, go("resume")), action("Stop", v.name, go("stop")));
  if (s !== "stopped") out.push(action("Kill", v.name, go("kill")));
  if (s === "stopped" || s === "crashed") {
    out.push(confirmAction("Delete", v.name, async () => {
      await api("DELETE", `vms/${encodeURIComponent(v.name)}`);
      pageMessage(`${v.name} deleted`, true);
      // Its own page has nothing left to show.
      if (location.hash.startsWith("#/vm/")) location.hash = "#/vms";
      else env.refresh();
    }));
  }
  return out;
}

function vmCreateForm(nodes, volumes, { templates, images, networks }) {
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const vcpus = h("input", { name: "vcpus", type: "number", min: "1", max: "32", value: "1", required: true });
  const mem = h("input", { name: "memory_mib", type: "number", min: "16", value: "256", required: true });
  const diskMode = h("select", { name: "disk_mode" },
    h("option", { value: "new" }, "A new volume"),
    h("option", { value: "existing" }, "An existing volume"),
    h("option", { value: "none" }, "No disk"));
  const size = sizeInput();
  const volNode = nodeSelect(nodes, "volume_node");
  const free = volumes.filter((v) => !v.attached_to && v.state === "ready");
  const existing = h("select", { name: "disks" }, free.map((v) => h("option", { value: v.name }, `${v.name} (${bytes(v.size_bytes)})`)));
  const newBox = h("div.row", {}, field("Disk size", size.n), field("Unit", size.unit), field("Volume on node", volNode));
  const oldBox = h("div.row", { hidden: true }, field("Volume", existing, free.length ? null : "No unattached volume is ready."));
  diskMode.addEventListener("change", () => {
    newBox.hidden = diskMode.value !== "new";
    oldBox.hidden = diskMode.value !== "existing";
  });
  const kernel = h("input", { name: "kernel", autocomplete: "off", placeholder: "/var/lib/tessera/images/vmlinux" });
  // Boot: an uploaded image where there is one (every node has a copy), else a kernel path.
  const ready = images.filter((i) => !i.deleting);
  const boot = h("select", { name: "image" },
    ready.map((i) => h("option", { value: i.name }, `Image ${i.name}${i.cmdline ? ` (${i.cmdline})` : ""}`)),
    h("option", { value: "" }, "A kernel path on the node"));
  const kernelBox = h("div.row", { hidden: ready.length > 0 }, field("Kernel (path on the node)", kernel));
  boot.addEventListener("change", () => { kernelBox.hidden = boot.value !== ""; });
  // A template's copy: its spec and its disks cloned copy-on-write (the API's `from`).
  const from = h("select", { name: "from" }, h("option", { value: "" }, "No template"),
    templates.map((t) => h("option", { value: t.name }, t.name)));
  const diskChoice = h("div#disk-choice", {}, field("Disk", diskMode, "A new volume is named <vm>-disk."), newBox, oldBox);
  const bootBox = h("div", {}, field("Boot", boot));
  from.addEventListener("change", () => {
    // A copy boots what its template boots, on copies of its disks.
    diskChoice.hidden = bootBox.hidden = from.value !== "";
    kernelBox.hidden = from.value !== "" || boot.value !== "";
  });
  const nets = h("fieldset.nets", {}, h("legend", {}, "Networks (one NIC each)"),
    networks.length ? networks.filter((n) => !n.deleting).map((n) => h("label.check", {},
      h("input", { type: "checkbox", name: "networks", value: n.name }), ` ${n.name} (${n.bridge}${n.vlan ? `, VLAN ${n.vlan}` : ""})`))
      : h("p.muted", {}, "No networks defined (see Networks)."));
  const cmdline = h("input", { name: "cmdline", autocomplete: "off", placeholder: "console=ttyS0" });
  const pin = nodeSelect(nodes, "node", "Any node");
  const ha = h("input", { type: "checkbox", name: "ha", value: "1" });
  const status = h("div", { "aria-live": "polite" });
  const form = h("form.card#vm-create", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        const body = { name: name.value, vcpus: Number(vcpus.value), memory_mib: Number(mem.value), disks: [] };
        body.networks = [...nets.querySelectorAll("input:checked")].map((c) => c.value);
        if (from.value) { /* the template's boot */ } else if (boot.value) body.image = boot.value;
        else if (kernel.value) body.kernel = kernel.value;
        if (cmdline.value) body.cmdline = cmdline.value;
        if (pin.value) body.node = pin.value;
        if (ha.checked) body.ha = true;
        if (from.value) {
          body.from = from.value;
        } else if (diskMode.value === "existing") {
          if (!existing.value) throw Object.assign(new Error("disks: choose a volume"), { field: "disks" });
          body.disks = [existing.value];
        }
        if (!from.value && diskMode.value === "new") {
          const vol = { name: `${name.value}-disk`, size_bytes: size.bytes() };
          if (volNode.value) vol.node = volNode.value;
          const task = await api("POST", "volumes", vol);
          await followTask(task, status, `volume ${vol.name}`);
          body.disks = [vol.name];
        }
        await api("POST", "vms", body);
        replace(status, h("p.notice", {}, `VM ${body.name} created`));
        announce(`VM ${body.name} created`);
        name.value = "";
        env.refresh();
      });
    },
  },
  h("h2", {}, "Create a VM"),
  h("div.row", {}, field("Name", name), field("vCPUs", vcpus), field("Memory (MiB)", mem)),
  templates.length ? field("Copy of template", from, "Its settings and its disks, cloned (<vm>-disk<N>).") : null,
  diskChoice,
  h("div.row", {}, bootBox, field("Kernel command line", cmdline), field("Pin to node", pin)),
  kernelBox, nets,
  h("label.check", {}, ha, " High availability: started on another node when its node fails (docs/ha.md)"),
  formError(), status,
  h("p", {}, h("button", { type: "submit" }, "Create VM")));
  return form;
}
