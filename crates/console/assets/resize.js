// Growing a volume from the Volumes page (`POST /volumes/{name}/resize`): any ready volume
// (a replicated one grows on every copy, through the replication stream), and only to a
// larger size.

import { h, field, bytes } from "./dom.js";
import { api } from "./api.js";
import { submit, formError, sizeInput, followTask } from "./forms.js";

const MIB = 2 ** 20;
const GIB = 2 ** 30;

/** The form; `refresh()` reloads the page after the resize is queued. */
export function resizeForm(volumes, refresh) {
  const fit = volumes.filter((v) => v.state === "ready");
  const copies = (v) => v.replication?.replicas ?? 1;
  const vol = h("select", { name: "volume", id: "f-resize-volume" },
    fit.map((v) => h("option", { value: v.name },
      `${v.name} (${bytes(v.size_bytes)}${copies(v) > 1 ? `, ${copies(v)} copies` : ""})`)));
  const size = sizeInput("size_bytes", "f-resize-size");
  // Start from the volume's size, in the unit it reads best in.
  const prefill = () => {
    const v = fit.find((x) => x.name === vol.value);
    if (!v) return;
    const unit = v.size_bytes >= GIB && v.size_bytes % (GIB / 4) === 0 ? GIB : MIB;
    // As defaults: a refresh may replace the form until the user changes something.
    for (const o of size.unit.options) o.defaultSelected = o.value === String(unit);
    size.unit.value = String(unit);
    size.n.defaultValue = String(v.size_bytes / unit);
    size.n.value = size.n.defaultValue;
  };
  vol.addEventListener("change", prefill);
  prefill();
  const status = h("div", { "aria-live": "polite" });
  const form = h("form.card#volume-resize", {
    onsubmit: (ev) => {
      ev.preventDefault();
      const name = vol.value;
      submit(form, async () => {
        const t = await api("POST", `volumes/${encodeURIComponent(name)}/resize`, { size_bytes: size.bytes() });
        refresh();
        await followTask(t, status, `resize ${name}`);
        // Its sizes are old now: the next refresh brings a fresh form.
        form.dataset.done = "1";
        refresh();
      });
    },
  }, h("h2", {}, "Resize a volume"),
  field("Volume", vol, fit.length ? null : "No ready volume."),
  h("div.row", {}, field("New size", size.n), field("Unit", size.unit)),
  h("p.muted", {}, "Volumes only grow. Every copy of a volume grows; a copy out of sync grows when it catches up. ",
    "A VM using the volume sees the new size after its next start."),
  formError(), status,
  h("p", {}, h("button", { type: "submit", disabled: !fit.length }, "Resize")));
  return form;
}
