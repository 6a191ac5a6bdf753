// Editing a VM from its page (`PATCH /vms/{name}`): what an operator changes day to day.
// vCPUs and memory only while the VM is stopped (a running VMM keeps what it started
// with); the stop timeout, restart policy and HA at any time. The edit names the VM's
// generation, so a change made meanwhile by someone else is refused (409), not
// overwritten.

import { h, field } from "./dom.js";
import { api } from "./api.js";
import { submit, formError, pageMessage } from "./forms.js";

const POLICIES = [
  ["never", "Leave it crashed"],
  ["on-crash", "Restart after a crash"],
  ["always", "Restart whenever it ends"],
];

/** The form for `vm`; `refresh()` reloads the page after a change. */
export function vmEditForm(vm, refresh) {
  const stopped = vm.actual_state === "stopped" || vm.actual_state === "crashed";
  const sized = stopped && vm.desired_state === "stopped";
  const num = (name, min, max, value) =>
    h("input", { name, id: `f-edit-${name}`, type: "number", min, max, step: "1", required: true, value: String(value) });
  const vcpus = sized ? num("vcpus", "1", "32", vm.vcpus) : null;
  const mem = sized ? num("memory_mib", "16", "1048576", vm.memory_mib) : null;
  const timeout = num("stop_timeout_s", "1", "3600", vm.stop_timeout_s ?? 30);
  const policy = h("select", { name: "restart_policy", id: "f-edit-restart_policy" },
    POLICIES.map(([v, t]) => h("option", { value: v, selected: v === vm.restart_policy }, t)));
  const ha = h("input", { type: "checkbox", name: "ha", id: "f-edit-ha", checked: vm.ha });
  const priority = num("priority", "0", "1000", vm.priority ?? 0);
  const form = h("form.card#vm-edit", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        // Only what changed, at the generation shown.
        const body = { generation: vm.generation };
        const set = (k, v, old) => { if (v !== old) body[k] = v; };
        if (sized) {
          set("vcpus", Number(vcpus.value), vm.vcpus);
          set("memory_mib", Number(mem.value), vm.memory_mib);
        }
        set("stop_timeout_s", Number(timeout.value), vm.stop_timeout_s ?? 30);
        set("restart_policy", policy.value, vm.restart_policy);
        set("ha", ha.checked, vm.ha);
        set("priority", Number(priority.value), vm.priority ?? 0);
        if (Object.keys(body).length === 1) {
          pageMessage(`${vm.name}: nothing changed`, true);
          return;
        }
        const after = await api("PATCH", `vms/${encodeURIComponent(vm.name)}`, body);
        form.dataset.done = "1";
        pageMessage(`${vm.name} changed (generation ${after.generation})`, true);
        refresh();
      });
    },
  }, h("h2", {}, "Edit"),
  sized ? h("div.row", {}, field("vCPUs", vcpus), field("Memory (MiB)", mem))
    : h("p.muted#edit-size-note", {}, "vCPUs and memory can be changed while the VM is stopped."),
  h("div.row", {}, field("Stop timeout (s)", timeout, "From the next stop on."), field("After it ends unasked", policy)),
  h("div.row", {}, h("label.check", { for: "f-edit-ha" }, ha, " High availability (restarted elsewhere when its node fails)"),
    field("HA priority", priority, "0-1000, higher first.")),
  formError(),
  h("p", {}, h("button", { type: "submit" }, "Save changes")));
  return form;
}
