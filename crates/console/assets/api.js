// The REST API as the console uses it: the session cookie (HttpOnly, set by login) carries
// the credentials; every change carries the X-Tessera-CSRF header the API requires.

/** An error answer, worded by the API; `field` when the message names one ("name: ..."). */
export class ApiError extends Error {
  constructor(status, message, outcome) {
    super(message);
    this.status = status;
    this.outcome = outcome;
    const m = /^([a-z_]+): /.exec(message);
    this.field = m ? m[1] : null;
  }
}

let onUnauthorized = () => {};
let onMustChange = () => {};

/** What to do when a call answers 401 (go to login) or 403 for the password change. */
export function setHandlers(unauthorized, mustChange) {
  onUnauthorized = unauthorized;
  onMustChange = mustChange;
}

/** Calls `/api/v1/<path>`; resolves with the JSON answer, rejects with an ApiError. */
export async function api(method, path, body, opts = {}) {
  return (await call(method, path, body, opts)).data;
}

/**
 * GETs one page of a list (`/api/v1/<path>` with its `limit`/`offset`/filters): resolves
 * with `{ items, total }`, `total` from the `X-Total-Count` header (every match, all pages).
 */
export async function apiPage(path) {
  const { data, response } = await call("GET", path);
  const total = Number(response.headers.get("x-total-count"));
  return { items: data, total: Number.isFinite(total) ? total : data.length };
}

async function call(method, path, body, { quiet = false } = {}) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (!["GET", "HEAD"].includes(method)) headers["x-tessera-csrf"] = "1";
  let r;
  try {
    r = await fetch(`/api/v1/${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, `this node did not answer (${e.message}); is it up?`);
  }
  let data = null;
  const text = await r.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = { error: text }; }
  }
  if (!r.ok) {
    const err = new ApiError(r.status, data?.error ?? `${r.status} ${r.statusText}`, data?.outcome);
    if (!quiet && r.status === 401) onUnauthorized(err);
    if (!quiet && r.status === 403 && /password change required/.test(err.message)) onMustChange(err);
    throw err;
  }
  return { data, response: r };
}

/** GET /tasks/{id} until it ends (bounded); calls `progress(task)` on each answer. */
export async function waitTask(id, progress = () => {}, limitMs = 120000) {
  const end = Date.now() + limitMs;
  for (;;) {
    const t = await api("GET", `tasks/${encodeURIComponent(id)}`);
    progress(t);
    if (t.state === "succeeded") return t;
    if (t.state === "failed") throw new ApiError(0, t.error ?? "the task failed");
    if (Date.now() > end) throw new ApiError(0, `task ${id} has not finished after ${limitMs / 1000} s; see Tasks`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/**
 * Who is calling (`GET /session`): user, realm, role in effect, kind of credentials,
 * expiry and whether the password must change first. Quiet: a 401 is the caller's to
 * handle (the login page).
 */
export function whoami() {
  return api("GET", "session", undefined, { quiet: true });
}

/** The live event stream (SSE); `onEvent(event)` for each, reconnecting from the last id. */
export function eventStream(onEvent, onState) {
  let es = null;
  let last = null;
  let closed = false;
  const open = () => {
    if (closed) return;
    const q = last ? `?since=${encodeURIComponent(last)}` : "";
    es = new EventSource(`/api/v1/events/stream${q}`);
    es.addEventListener("open", () => onState(true));
    es.addEventListener("event", (m) => {
      try {
        const ev = JSON.parse(m.data);
        last = ev.id;
        onEvent(ev);
      } catch { /* a malformed event is skipped, the stream goes on */ }
    });
    es.addEventListener("error", () => {
      onState(false);
      es.close();
      // Bounded back-off: the node restarting or the session ending.
      setTimeout(open, 5000);
    });
  };
  open();
  return { close() { closed = true; es?.close(); } };
}
