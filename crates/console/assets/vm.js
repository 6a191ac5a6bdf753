// A VM's page (`#/vm/<name>`): its configuration, disks, NICs, the tasks that concern it,
// its actions, and its serial console in the page (terminal.js) while it runs.

import { h, replace, table, bytes, when, stateTag } from "./dom.js";
import { api } from "./api.js";
import { openConsole } from "./terminal.js";
import { keep } from "./forms.js";
import { vmEditForm } from "./vm_edit.js";

const main = document.getElementById("main");

/** What a task did, for a VM's history: its action, or the store operation on a disk. */
function taskLabel(t) {
  if (t.vm) return t.vm.action;
  const op = t.op ?? {};
  const what = op.name ?? op.volume ?? "";
  return `${String(op.type ?? "?").replace(/_/g, " ")} ${what}${op.snapshot ? `@${op.snapshot}` : ""}`;
}

/**
 * The view for `#/vm/<name>`. `env` is what the console shell shares: `current(gen)`,
 * `can(role)`, `messages()`, `vmActions(vm)` (the buttons the list has), `onLeave(fn)`
 * (called when the user navigates away), `nodeName(nodes, id)`, `refresh()`.
 */
export function vmPage(env) {
  // The console of the VM shown, kept across refreshes of the rest of the page.
  let shown = { gen: -1, name: null, console: null, box: null };

  function closeConsole() {
    shown.console?.then((c) => c?.close()).catch(() => {});
    shown.console = null;
  }

  return async function view(gen) {
    const name = decodeURIComponent(location.hash.replace(/^#\/?vm\//, "").split("/")[0] ?? "");
    const [vm, nodes, volumes, networks, tasks] = await Promise.all([
      api("GET", `vms/${encodeURIComponent(name)}`), api("GET", "nodes"), api("GET", "volumes"),
      api("GET", "networks"), api("GET", "tasks"),
    ]);
    if (!env.current(gen)) return undefined;
    if (shown.gen !== gen) {
      // A new visit: the page's frame, and the console's place in it.
      closeConsole();
      shown = { gen, name, console: null, box: h("div#vm-console") };
      env.onLeave(closeConsole);
      replace(main,
        h("p", {}, h("a", { href: "#/vms" }, "← Virtual machines")),
        h("h1#vm-title", {}, `VM ${name}`),
        env.messages(),
        h("div#vm-info"),
        h("section.card#vm-console-card", { "aria-labelledby": "h-console" },
          h("h2#h-console", {}, "Serial console"), shown.box));
    }
    const info = document.getElementById("vm-info");
    // The edit form is kept while the user types in it; so is the focus.
    const focused = document.activeElement;
    replace(info, ...details(vm, nodes, volumes, networks, tasks));
    if (focused && info.contains(focused)) focused.focus();
    consoleState(vm);
    // The state changes by events (the stream refreshes the view); tasks' progress polls.
    return tasks.some((t) => t.state === "running" || t.state === "queued") ? 1000 : 5000;
  };

  function consoleState(vm) {
    const live = vm.actual_state === "running" || vm.actual_state === "paused";
    if (!env.can("operator")) {
      replace(shown.box, h("p.muted", {}, "The serial console needs the Operator role."));
      return;
    }
    if (!live) {
      closeConsole();
      replace(shown.box, h("p.muted#console-off", {}, "The console is there while the VM runs."));
      return;
    }
    if (!shown.console) shown.console = openConsole(shown.box, vm.name);
  }

  function details(vm, nodes, volumes, networks, tasks) {
    const where = vm.running_on ?? vm.placed_on;
    const boot = vm.image ? `image ${vm.image}` : vm.kernel ? `kernel ${vm.kernel}` : vm.template ? "–" : "none set";
    const config = [
      ["State", h("span", {}, stateTag(vm.actual_state), vm.desired_state !== vm.actual_state ? ` → ${vm.desired_state}` : "")],
      ["Why", vm.state_reason ?? "–"],
      ["Node", where ? env.nodeName(nodes, where) : "not placed"],
      ["Pinned to", vm.node ? env.nodeName(nodes, vm.node) : "any node"],
      ["vCPUs", String(vm.vcpus)],
      ["Memory", `${vm.memory_mib} MiB`],
      ["Boots", boot],
      ["Command line", vm.cmdline ?? "–"],
      ["Template", vm.template ? "yes: it cannot start; new VMs copy it" : vm.from ? `no; made from ${vm.from}` : "no"],
      ["High availability", vm.ha ? `yes (priority ${vm.priority ?? 0})` : "no"],
      ["After a crash", vm.restart_policy],
      ["Stop waits", `${vm.stop_timeout_s ?? 30} s for the guest, then forces`],
      ["Created", when(vm.created_ms)],
      ["Changed", when(vm.updated_ms)],
    ];
    const out = [
      h("section.card#vm-config", { "aria-labelledby": "h-config" },
        h("h2#h-config", {}, "Configuration"),
        h("dl.pairs", {}, config.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
        env.can("operator") && !vm.template ? h("div.actions#vm-actions", { "data-vm": vm.name }, env.vmActions(vm)) : null),
    ];
    if (env.can("operator")) out.push(keep("vm-edit", vmEditForm(vm, env.refresh)));
    const disks = vm.disks.map((d, i) => {
      const v = volumes.find((x) => x.name === d);
      const r = [d, i === 0 ? "boot disk" : `disk ${i + 1}`, v ? bytes(v.size_bytes) : "–",
        v ? stateTag(v.state) : "missing", v ? env.nodeName(nodes, v.node) : "–",
        v ? String(v.snapshots.length) : "–"];
      r.attrs = { "data-disk": d };
      return r;
    });
    out.push(h("h2", {}, "Disks"),
      table(`Disks of ${vm.name}`, ["Volume", "Use", "Size", "State", "Node", "Snapshots"], disks, "No disks."));
    const nics = vm.networks.map((n, i) => {
      const net = networks.find((x) => x.name === n);
      return [`nic${i}`, n, vm.nics?.[i]?.mac ?? "–", net?.bridge ?? "–", net?.vlan ?? "untagged", net?.uplink ?? "–"];
    });
    out.push(h("h2", {}, "Network interfaces"),
      table(`NICs of ${vm.name}`, ["NIC", "Network", "MAC", "Bridge", "VLAN", "Uplink"], nics,
        "No NICs: this VM is on no network."),
      h("p.muted", {}, "Link state is not reported by the API yet."));
    const mine = tasks.filter((t) => t.vm?.vm === vm.name ||
      [t.op?.name, t.op?.volume].some((x) => x && vm.disks.includes(x)))
      .sort((a, b) => b.created_ms - a.created_ms);
    out.push(h("h2", {}, "Task history"),
      table(`Tasks of ${vm.name}`, ["Task", "State", "Progress", "User", "Started", "Error / log"], mine.map((t) => {
        const r = [taskLabel(t), stateTag(t.state),
          h("progress", { max: "100", value: String(t.progress), "aria-label": `${taskLabel(t)} progress` }, `${t.progress}%`),
          t.user, when(t.created_ms),
          h("div", {}, t.error ? h("span.state-failed", {}, t.error) : null,
            t.log?.length ? h("details", {}, h("summary", {}, `Log (${t.log.length})`),
              h("pre", {}, t.log.map((l) => `${new Date(l.time_ms).toLocaleTimeString()} ${l.message}\n`))) : null)];
        r.attrs = { "data-task": t.id, "data-state": t.state };
        return r;
      }), "No tasks for this VM or its disks."));
    return out;
  }
}
