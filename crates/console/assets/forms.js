// What every page's forms and row actions share: the API's refusals shown next to the
// field they name, forms kept while the user types in them, buttons that ask twice before
// destroying, sizes with units, and a task's progress followed to its end.

import { h, replace } from "./dom.js";
import { waitTask } from "./api.js";

/** Says `text` to screen readers (the page's live region). */
export function announce(text) {
  const live = document.getElementById("live");
  if (live) live.textContent = text;
}

/** Runs `fn` for a form: clears old errors, shows the API's words next to the named field. */
export async function submit(form, fn) {
  for (const e of form.querySelectorAll(".field-error")) e.textContent = "";
  for (const e of form.querySelectorAll("[aria-invalid]")) e.removeAttribute("aria-invalid");
  const alert = form.querySelector(".form-error");
  if (alert) { alert.textContent = ""; alert.hidden = true; }
  const buttons = [...form.querySelectorAll("button")];
  buttons.forEach((b) => (b.disabled = true));
  form.dataset.busy = "1";
  try {
    await fn();
    form.reset();
  } catch (e) {
    showError(form, e);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
    delete form.dataset.busy;
  }
}

export function showError(form, e) {
  const input = e.field ? form.querySelector(`[name="${e.field}"]`) : null;
  if (input) {
    const slot = document.getElementById(`${input.id}-error`);
    if (slot) slot.textContent = e.message;
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return;
  }
  const alert = form.querySelector(".form-error");
  if (alert) {
    alert.textContent = e.message;
    alert.hidden = false;
  }
}

/**
 * The element already on the page under `id` if the user is working in it (focus inside,
 * something typed, a submit under way), else `fresh`: a refresh must not wipe a half-filled
 * form.
 */
export function keep(id, fresh) {
  const old = document.getElementById(id);
  if (!old) return fresh;
  const typed = [...old.querySelectorAll("input")].some((i) => i.value !== i.defaultValue || i.checked !== i.defaultChecked) ||
    [...old.querySelectorAll("select")].some((s) => {
      // A select without a `selected` option shows its first one.
      const d = [...s.options].findIndex((o) => o.defaultSelected);
      return s.options.length > 0 && s.selectedIndex !== Math.max(d, 0);
    });
  const editing = old.contains(document.activeElement) && document.activeElement.tagName !== "BUTTON";
  // A form whose change went through shows what it was made from: the next one is fresh.
  if (old.dataset.done) return fresh;
  return editing || old.dataset.busy || typed ? old : fresh;
}

export function formError() {
  return h("div.alert.form-error", { role: "alert", hidden: true });
}

/** A page-level message area for row actions. */
export function messages() {
  return document.getElementById("messages") ?? h("div#messages", { role: "alert" });
}

export function pageMessage(text, ok = false) {
  const box = document.getElementById("messages");
  if (!box) return;
  replace(box, h(ok ? "p.notice" : "p.alert", {}, text));
}

/** A button for a row action: runs `fn`, words the API's refusal in the message area. */
export function action(label, name, fn, cls = "secondary") {
  return h(`button.${cls}`, {
    type: "button",
    "aria-label": `${label} ${name}`,
    "data-action": label.toLowerCase(),
    onclick: async (ev) => {
      const b = ev.currentTarget;
      b.disabled = true;
      try {
        await fn();
      } catch (e) {
        pageMessage(`${label} ${name}: ${e.message}`);
      } finally {
        b.disabled = false;
      }
    },
  }, label);
}

/**
 * A destructive button that asks once more (a second press within 5 s) instead of a
 * dialog. The armed state is kept by name, so a refresh of the list in between keeps it.
 */
const armed = new Map();
export function confirmAction(label, name, fn) {
  const key = `${label} ${name}`;
  const isArmed = () => (armed.get(key) ?? 0) > Date.now();
  const b = action(label, name, async () => {
    if (!isArmed()) {
      armed.set(key, Date.now() + 5000);
      b.textContent = `Confirm ${label.toLowerCase()}`;
      setTimeout(() => { b.textContent = label; }, 5000);
      return;
    }
    armed.delete(key);
    await fn();
  }, "danger");
  if (isArmed()) b.textContent = `Confirm ${label.toLowerCase()}`;
  return b;
}

export function sizeInput(name = "size_bytes", id) {
  const n = h("input", { name, type: "number", min: "1", step: "any", value: "1", id });
  const unit = h("select", { name: `${name}_unit`, "aria-label": "Unit" },
    h("option", { value: String(2 ** 20) }, "MiB"),
    h("option", { value: String(2 ** 30), selected: true }, "GiB"),
    h("option", { value: String(2 ** 40) }, "TiB"));
  return { n, unit, bytes: () => Math.round(Number(n.value) * Number(unit.value)) };
}

export function nodeSelect(nodes, name = "node", blank = "This node") {
  return h("select", { name, id: `f-${name}-${Math.random().toString(36).slice(2, 7)}` },
    h("option", { value: "" }, blank),
    nodes.map((n) => h("option", { value: n.id }, n.name ?? n.id)));
}

export function nodeName(nodes, id) {
  if (!id) return "–";
  return nodes.find((n) => n.id === id)?.name ?? id;
}

/** A task's progress while it runs, then its outcome, in `slot`. */
export async function followTask(task, slot, what) {
  const bar = h("progress", { max: "100", value: String(task.progress ?? 0), "aria-label": `${what} progress` });
  const text = h("span", {}, ` ${what}: ${task.state}`);
  replace(slot, bar, text);
  const done = await waitTask(task.id, (t) => {
    bar.value = t.progress;
    text.textContent = ` ${what}: ${t.state} ${t.progress}%`;
  });
  replace(slot, h("span.notice", {}, `${what}: done`));
  announce(`${what}: done`);
  return done;
}
