// The Tasks and Events pages, and the task and event tables the dashboard shows too.

import { h, replace, field, table, when, stateTag } from "./dom.js";
import { api } from "./api.js";
import { nodeName } from "./forms.js";

const main = document.getElementById("main");

function opText(op) {
  const what = op?.name ?? op?.volume ?? "";
  return `${String(op?.type ?? "?").replace(/_/g, " ")} ${what}${op?.snapshot ? `@${op.snapshot}` : ""}`;
}

export function taskTable(tasks, nodes, empty = "No tasks.") {
  return table("Tasks", ["Task", "Node", "User", "State", "Progress", "Started", "Error / log"], tasks.map((t) => {
    const r = [
      h("span", { title: t.id }, opText(t.op)), nodeName(nodes, t.node), t.user, stateTag(t.state),
      h("progress", { max: "100", value: String(t.progress), "aria-label": `${opText(t.op)} progress` }, `${t.progress}%`),
      when(t.created_ms),
      h("div", {}, t.error ? h("span.state-failed", {}, t.error) : null,
        t.log?.length ? h("details", {}, h("summary", {}, `Log (${t.log.length})`),
          h("pre", {}, t.log.map((l) => `${new Date(l.time_ms).toLocaleTimeString()} ${l.message}\n`))) : null),
    ];
    r.attrs = { "data-task": t.id, "data-state": t.state };
    return r;
  }), empty);
}

export function eventTable(events) {
  return table("Events", ["Time", "Kind", "Target", "User", "Message"], events.map((e) => {
    const r = [when(e.time_ms), e.kind, e.target, e.user, e.message];
    r.attrs = { "data-event": e.id };
    return r;
  }), "No events.");
}

/**
 * The views for `#/tasks` and `#/events`. `env`: `current(gen)`, `refresh()`,
 * `onEvent(fn)` (the live stream's hook for the view shown).
 */
export function activityPages(env) {
  async function tasksView(gen) {
    const prev = document.getElementById("task-state")?.value ?? "";
    const q = prev ? `?state=${prev}` : "";
    const [tasks, nodes] = await Promise.all([api("GET", `tasks${q}`), api("GET", "nodes")]);
    if (!env.current(gen)) return undefined;
    const sel = document.getElementById("task-state") ?? h("select#task-state", { name: "state" }, h("option", { value: "" }, "Any state"),
      ["queued", "running", "succeeded", "failed"].map((s) => h("option", { value: s }, s)));
    sel.onchange = () => env.refresh();
    tasks.sort((a, b) => b.created_ms - a.created_ms);
    const row = sel.closest(".row") ?? h("div.row", {}, field("State", sel));
    const focused = document.activeElement;
    replace(main, h("h1", {}, "Tasks"), row, taskTable(tasks, nodes));
    if (focused && main.contains(focused)) focused.focus();
    // Progress is not an event: poll faster while something runs (bounded: 1 s).
    return tasks.some((t) => t.state === "running" || t.state === "queued") ? 1000 : 5000;
  }

  async function eventsView(gen) {
    const events = (await api("GET", "events?limit=500")).reverse();
    if (!env.current(gen)) return undefined;
    const text = h("input#event-filter", { type: "search", name: "filter", placeholder: "target, user or message" });
    const kinds = [...new Set(events.map((e) => e.kind))].sort();
    const kind = h("select#event-kind", { name: "kind" }, h("option", { value: "" }, "Any kind"), kinds.map((k) => h("option", { value: k }, k)));
    const list = h("div#event-list");
    const draw = () => {
      const q = text.value.trim().toLowerCase();
      replace(list, eventTable(events.filter((e) => (!kind.value || e.kind === kind.value) &&
        (!q || [e.target, e.user, e.message, e.kind, ...(e.nodes || [])].some((x) => String(x).toLowerCase().includes(q))))));
    };
    text.addEventListener("input", draw);
    kind.addEventListener("change", draw);
    draw();
    replace(main, h("h1", {}, "Events"), h("p.muted", {}, "Live: new events appear at the top as they happen."),
      h("div.row", { role: "search" }, field("Filter", text), field("Kind", kind)), list);
    env.onEvent((e) => {
      events.unshift(e);
      if (events.length > 2000) events.pop();
      if (![...kind.options].some((o) => o.value === e.kind)) kind.append(h("option", { value: e.kind }, e.kind));
      draw();
    });
    return "manual"; // the stream keeps it current
  }
  return { tasks: tasksView, events: eventsView };
}
