// The Networks page (`#/networks`): the networks VMs attach NICs to (bridge, VLAN,
// uplink) and the VMs on each; Administrators create and delete them (the API's rule:
// networks are shared by every VM).

import { h, replace, field, table, when } from "./dom.js";
import { api, apiPage } from "./api.js";

const main = document.getElementById("main");
/** How many of a network's VMs the list names. */
const SHOWN = 20;

/**
 * The view for `#/networks`. `env`: `current(gen)`, `can(role)`, `messages()`,
 * `pageMessage(text, ok)`, `confirmAction(label, name, fn)`, `submit(form, fn)`,
 * `keep(id, fresh)`, `formError()`, `refresh()`.
 */
export function networksPage(env) {
  function createForm() {
    const name = h("input", { name: "name", required: true, autocomplete: "off" });
    const bridge = h("input", { name: "bridge", required: true, autocomplete: "off", placeholder: "br0" });
    const vlan = h("input", { name: "vlan", type: "number", min: "1", max: "4094", autocomplete: "off" });
    const uplink = h("input", { name: "uplink", autocomplete: "off", placeholder: "eno1" });
    const form = h("form.card#network-create", {
      onsubmit: (ev) => {
        ev.preventDefault();
        env.submit(form, async () => {
          const body = { name: name.value, bridge: bridge.value };
          if (vlan.value) body.vlan = Number(vlan.value);
          if (uplink.value) body.uplink = uplink.value;
          await api("POST", "networks", body);
          env.pageMessage(`network ${body.name} created`, true);
          env.refresh();
        });
      },
    }, h("h2", {}, "Create a network"),
    h("div.row", {}, field("Name", name), field("Bridge", bridge, "The Linux bridge on every node.")),
    h("div.row", {}, field("VLAN", vlan, "1-4094; needs an uplink."), field("Uplink", uplink)),
    env.formError(), h("p", {}, h("button", { type: "submit" }, "Create network")));
    return form;
  }

  return async function view(gen) {
    const networks = await api("GET", "networks");
    // Each network's first VMs and how many there are (the API filters by network): the
    // page never loads every VM of the cluster.
    const users = await Promise.all(networks.map((n) =>
      apiPage(`vms?network=${encodeURIComponent(n.name)}&limit=${SHOWN}`)));
    if (!env.current(gen)) return undefined;
    const admin = env.can("administrator");
    const rows = networks.map((n, i) => {
      const { items, total } = users[i];
      const names = items.map((v) => v.name).join(", ");
      const r = [n.name, n.bridge, n.vlan ?? "untagged", n.uplink ?? "–",
        total ? `${names}${total > items.length ? ` and ${total - items.length} more` : ""}` : "–",
        n.deleting ? "deleting" : when(n.created_ms)];
      if (admin) {
        r.push(h("td.actions", {}, n.deleting || total ? null : env.confirmAction("Delete", `network ${n.name}`, async () => {
          await api("DELETE", `networks/${encodeURIComponent(n.name)}`);
          env.pageMessage(`network ${n.name} deleted`, true);
          env.refresh();
        })));
      }
      r.attrs = { "data-network": n.name };
      return r;
    });
    const focused = document.activeElement;
    replace(main, h("h1", {}, "Networks"), env.messages(),
      table("Networks", ["Name", "Bridge", "VLAN", "Uplink", "VMs", "Created", admin ? "Actions" : null].filter(Boolean),
        rows, "No networks yet."),
      h("p.muted", {}, "A network in use by a VM cannot be deleted. Only administrators create and delete networks."),
      admin ? env.keep("network-create", createForm()) : null);
    if (focused && main.contains(focused)) focused.focus();
    return 5000;
  };
}
