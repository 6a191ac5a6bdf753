// Building DOM nodes without HTML strings, so API data is always text, never markup.

/** h("tag.class#id", {attrs}, ...children): an element; strings become text nodes. */
export function h(spec, attrs = {}, ...children) {
  const m = spec.match(/^([a-z0-9]+)((?:[.#][\w-]+)*)$/);
  const el = document.createElement(m ? m[1] : spec);
  if (m) {
    for (const part of m[2].match(/[.#][\w-]+/g) ?? []) {
      if (part[0] === ".") el.classList.add(part.slice(1));
      else el.id = part.slice(1);
    }
  }
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/**
 * Replaces the children of `el`. A child kept from before (a form being filled in, see
 * `keep`) is taken out and put back, and the browser moves focus out of an element taken
 * out of the page: the field keeps its focus and cursor, or the keys typed next would go
 * nowhere.
 */
export function replace(el, ...children) {
  const focused = el.contains(document.activeElement) ? document.activeElement : null;
  let cursor = null;
  try {
    if (focused && typeof focused.selectionStart === "number") {
      cursor = [focused.selectionStart, focused.selectionEnd, focused.selectionDirection];
    }
  } catch { /* an input without a text cursor (a number, a checkbox) */ }
  el.replaceChildren();
  append(el, children);
  if (focused && focused.isConnected && document.activeElement !== focused) {
    focused.focus({ preventScroll: true });
    try {
      if (cursor) focused.setSelectionRange(...cursor);
    } catch { /* as above */ }
  }
}

let fields = 0;

/**
 * A labelled input: <div><label for>…</label><input id name><span error></div>. Without an
 * id of its own the input gets one unique in the page: several forms share field names
 * (the Users page's "password" is in two), and a shared id sent the label and the API's
 * error message to the other form's field.
 */
export function field(label, input, hint) {
  const id = input.id || `f-${input.name}-${++fields}`;
  input.id = id;
  const err = h("span.field-error", { id: `${id}-error`, role: "status" });
  input.setAttribute("aria-describedby", `${id}-error`);
  return h("div", {}, h("label", { for: id }, label), input, hint ? h("span.muted", {}, hint) : null, err);
}

/** A table with a header row; `rows` are arrays of cells (nodes or text). */
export function table(caption, headers, rows, empty = "None.") {
  if (!rows.length) return h("p.muted", {}, empty);
  return h("div.table-wrap", {},
    h("table", {},
      h("caption.sr-only", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows.map((r) => h("tr", r.attrs ?? {}, r.map((c) => (c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c))))))));
}

export function bytes(n) {
  if (n === undefined || n === null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${u[i]}`;
}

export function when(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleString();
}

export function stateTag(s) {
  return h(`span.state-${String(s).replace(/[^a-z]/g, "")}`, {}, String(s));
}
