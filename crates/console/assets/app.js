// The Tessera web console: one page, a view per hash route, everything from the REST API.
// Plain ES modules, no build step; third-party code (vendor/) only where a page needs it.

import { h, replace, field, table, bytes, when, stateTag } from "./dom.js";
import { api, setHandlers, whoami, eventStream } from "./api.js";
import { vmPage } from "./vm.js";
import { networksPage } from "./networks.js";
import { nodesPage } from "./nodes.js";
import { twoFactorPage } from "./twofactor.js";
import {
  announce, submit, keep, formError, messages, pageMessage, action, confirmAction, sizeInput, nodeSelect, nodeName,
  followTask,
} from "./forms.js";
import { taskTable, eventTable, activityPages } from "./activity.js";
import { resizeForm } from "./resize.js";
import { vmsPage, VM_STATES } from "./vms.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const logoutButton = document.getElementById("logout");

const ROLES = ["auditor", "operator", "administrator"];

const session = {
  role: null, // null: not known to be logged in
  me: null, // GET /session: user, realm, role, expiry
  leave: [], // the current view's clean-ups when the user navigates away
  stream: null,
  timer: null,
  refresh: null, // the current view's reload
  onEvent: null, // the current view's live event hook
  pending: null,
  generation: 0, // bumps on every navigation: a late answer for an old view is dropped
};

const can = (least) => session.role && ROLES.indexOf(session.role) >= ROLES.indexOf(least);

// ---------------------------------------------------------------- session

async function startSession(me) {
  session.me = me;
  session.role = me.role;
  who.textContent = `${me.user} (${me.role})`;
  who.title = `${me.kind === "token" ? "API token" : "Session"} until ${when(me.expires_ms)}`;
  who.hidden = false;
  nav.hidden = false;
  logoutButton.hidden = false;
  document.getElementById("nav-access").hidden = !can("administrator");
  session.stream?.close();
  session.stream = eventStream((ev) => {
    if (session.onEvent) session.onEvent(ev);
    scheduleRefresh();
  }, (up) => document.body.classList.toggle("stream-down", !up));
}

function endSession() {
  session.role = null;
  session.me = null;
  session.stream?.close();
  session.stream = null;
  nav.hidden = true;
  who.hidden = true;
  logoutButton.hidden = true;
}

function scheduleRefresh() {
  // A view with its own event hook (Events) stays current without a reload.
  if (!session.refresh || session.onEvent || session.pending) return;
  session.pending = setTimeout(() => {
    session.pending = null;
    session.refresh?.().catch(() => {});
  }, 300);
}

setHandlers(() => {
  endSession();
  if (!location.hash.startsWith("#/login")) location.hash = "#/login";
}, () => {
  if (location.hash !== "#/password") location.hash = "#/password";
});

logoutButton.addEventListener("click", async () => {
  try {
    await api("POST", "logout", undefined, { quiet: true });
  } catch { /* already ended: the login page is the answer either way */ }
  endSession();
  sessionStorage.removeItem("tessera-user");
  location.hash = "#/login";
});

// ---------------------------------------------------------------- views

function loginView() {
  const user = h("input", { name: "username", autocomplete: "username", required: true, value: sessionStorage.getItem("tessera-user") ?? "" });
  const pw = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  // The second step, shown when the API answers that this user needs a code.
  const totp = h("input", { name: "totp", autocomplete: "one-time-code", inputmode: "numeric", maxlength: "64" });
  const totpBox = h("div", { hidden: true }, field("Code", totp, "Your authenticator app's six digits, or a recovery code."));
  const form = h("form.card#login-form", {
    onsubmit: (ev) => {
      ev.preventDefault();
      const [u, p, code] = [user.value, pw.value, totp.value.trim()];
      submit(form, async () => {
        const body = { username: u, password: p };
        if (code) body.totp = code;
        let r;
        try {
          r = await api("POST", "login", body, { quiet: true });
        } catch (e) {
          if (e.status === 401 && /second factor/.test(e.message)) {
            // Password right, code missing or wrong: ask for the code (a refused submit
            // keeps what was typed).
            totpBox.hidden = false;
            throw Object.assign(new Error(e.message), { field: "totp" });
          }
          throw e;
        }
        sessionStorage.setItem("tessera-user", u);
        location.hash = r.must_change_password ? "#/password" : "#/";
      });
    },
  },
  h("h1", {}, "Log in"),
  field("User name", user, "A directory (LDAP) user logs in as name@realm; a local user by name alone."),
  field("Password", pw),
  totpBox,
  formError(),
  h("p", {}, h("button", { type: "submit" }, "Log in")));
  const help = h("section.card", {},
    h("h2", {}, "Trusting this node's certificate"),
    h("p", {}, "Every node's HTTPS certificate is issued by the cluster's own certificate authority. ",
      "Until your browser trusts that CA it warns about this page; import the CA once and every node is trusted."),
    h("ol", {},
      h("li", {}, "Get the CA certificate from any node: ", h("code", {}, "<data_dir>/tls/ca.crt"),
        " (the local dev cluster prints its path). Copy it over a channel you trust, e.g. ",
        h("code", {}, "scp root@node:/var/lib/tessera/tls/ca.crt ."), " with your data directory."),
      h("li", {}, "Check it: ", h("code", {}, "openssl x509 -in ca.crt -noout -subject -fingerprint -sha256"),
        " on a node and on your copy must print the same fingerprint."),
      h("li", {}, "Import it as an authority for websites: Firefox: Settings → Privacy & Security → Certificates → View Certificates → Authorities → Import. ",
        "Chromium, Chrome, Edge: Settings → Privacy and security → Security → Manage certificates → Authorities (Linux) or the system store. ",
        "macOS: Keychain Access → System → import, then Trust → Always Trust. Windows: certmgr.msc → Trusted Root Certification Authorities → Import.")),
    h("p.muted", {}, "Reload this page afterwards. Installing a certificate of your own organisation for the nodes' names is not possible yet."));
  replace(main, h("div.login", {}, form, help));
  user.value ? pw.focus() : user.focus();
}

function passwordView() {
  const old = h("input", { name: "old_password", type: "password", autocomplete: "current-password", required: true });
  const neu = h("input", { name: "new_password", type: "password", autocomplete: "new-password", required: true });
  const again = h("input", { name: "again", type: "password", autocomplete: "new-password", required: true });
  const form = h("form.card#password-form", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        if (neu.value !== again.value) {
          throw Object.assign(new Error("again: the two new passwords differ"), { field: "again" });
        }
        await api("POST", "password", { old_password: old.value, new_password: neu.value });
        announce("Password changed");
        location.hash = "#/";
      });
    },
  },
  h("h1", {}, "Change your password"),
  h("p", {}, "This account must choose a new password before it can do anything else (12 to 1024 characters)."),
  field("Current password", old),
  field("New password", neu),
  field("New password again", again),
  formError(),
  h("p", {}, h("button", { type: "submit" }, "Change password")));
  replace(main, h("div.login", {}, form));
  old.focus();
}

async function dashboardView(gen) {
  // The VMs by state come counted in the cluster's status: not every VM's record.
  const [cluster, nodes, tasks, events] = await Promise.all([
    api("GET", "cluster"), api("GET", "nodes"), api("GET", "tasks"), api("GET", "events?limit=10"),
  ]);
  if (gen !== session.generation) return;
  const byState = (xs, k) => xs.reduce((m, x) => ((m[x[k]] = (m[x[k]] ?? 0) + 1), m), {});
  const nodeStates = byState(nodes, "state");
  const voterUp = cluster.voters.filter((id) => nodes.some((n) => n.raft_id === id && n.state === "up")).length;
  const quorum = voterUp > cluster.voters.length / 2;
  const sum = (f) => nodes.reduce((a, n) => a + (Number(f(n)) || 0), 0);
  const disk = (n) => {
    const d = (n.metrics?.disks ?? []).reduce((best, x) => (!best || x.total > best.total ? x : best), null);
    return d ?? { total: 0, available: 0 };
  };
  const cpuAvg = nodes.length ? sum((n) => n.metrics?.cpu_percent) / nodes.length : 0;
  const memTotal = sum((n) => n.metrics?.memory_total);
  const memUsed = sum((n) => n.metrics?.memory_used);
  const diskTotal = sum((n) => disk(n).total);
  const diskFree = sum((n) => disk(n).available);
  const vmStates = cluster.vms ?? { total: 0 };
  const active = tasks.filter((t) => t.state === "running" || t.state === "queued");
  replace(main,
    h("h1", {}, "Dashboard"),
    h("div.grid", {},
      h("section.card#health", { "aria-labelledby": "h-health" },
        h("h2#h-health", {}, "Cluster"),
        h("p.stat", {}, quorum ? h("span.state-ok", {}, "Quorum") : h("span.state-down", {}, "No quorum")),
        h("p", {}, `Leader: ${cluster.leader_name ?? cluster.leader_node ?? "none"} · term ${cluster.term}`),
        h("p", {}, `Voters up: ${voterUp} of ${cluster.voters.length}`),
        h("p", {}, ["up", "suspect", "down"].map((s) => [stateTag(s), ` ${nodeStates[s] ?? 0}  `]))),
      h("section.card#capacity", { "aria-labelledby": "h-cap" },
        h("h2#h-cap", {}, "Capacity"),
        h("p", {}, `CPU: ${sum((n) => n.allocation?.cpus)} cores, ${sum((n) => n.allocation?.vcpus_allocated)} vCPUs given to VMs, ${cpuAvg.toFixed(0)}% busy on average`),
        h("p", {}, `Memory: ${bytes(memUsed)} used of ${bytes(memTotal)}; VMs placed take ${bytes(sum((n) => n.allocation?.memory_mib_allocated) * 2 ** 20)}`),
        h("p", {}, `Storage: ${bytes(diskTotal - diskFree)} used, ${bytes(diskFree)} free of ${bytes(diskTotal)}`),
        h("p.muted", {}, "Storage counts each node's largest filesystem.")),
      h("section.card#vm-states", { "aria-labelledby": "h-vms" },
        h("h2#h-vms", {}, h("a", { href: "#/vms" }, `VMs (${vmStates.total})`)),
        VM_STATES.filter((s) => vmStates[s]).map((s) => h("p", {}, h("a", { href: `#/vms?state=${s}` }, stateTag(s)), ` ${vmStates[s]}`)),
        vmStates.total ? null : h("p.muted", {}, "No VMs yet."))),
    h("h2", {}, "Nodes"),
    table("Nodes", ["Node", "State", "CPU", "Memory", "Storage", "VMs"], nodes.map((n) => [
      n.name ?? n.id, stateTag(n.state),
      `${(n.metrics?.cpu_percent ?? 0).toFixed?.(0) ?? "–"}% of ${n.metrics?.cpus ?? "?"}`,
      `${bytes(n.metrics?.memory_used)} / ${bytes(n.metrics?.memory_total)}`,
      h("span", {}, stateTag(n.storage?.state ?? "unknown"), n.storage?.reason ? ` ${n.storage.reason}` : "", ` · ${bytes(disk(n).available)} free`),
      String(n.allocation?.vms ?? 0),
    ])),
    h("h2", {}, h("a", { href: "#/tasks" }, "Running tasks")),
    taskTable(active, nodes, "No task is running."),
    h("h2", {}, h("a", { href: "#/events" }, "Recent events")),
    eventTable([...events].reverse()));
}

async function volumesView(gen) {
  const [volumes, nodes] = await Promise.all([api("GET", "volumes"), api("GET", "nodes")]);
  if (gen !== session.generation) return;
  const op = can("operator");
  const rows = volumes.map((v) => {
    const r = [
      v.name, bytes(v.size_bytes), nodeName(nodes, v.node), copiesText(v), stateTag(v.state),
      v.snapshots.length ? h("ul", {}, v.snapshots.map((s) => h("li", {}, `${s.name} `, stateTag(s.state), " ",
        op ? confirmAction("Delete", `snapshot ${v.name}@${s.name}`, async () => {
          const t = await api("DELETE", `volumes/${encodeURIComponent(v.name)}/snapshots/${encodeURIComponent(s.name)}`);
          pageMessage(`deleting snapshot ${v.name}@${s.name} (task ${t.id})`, true);
          session.refresh?.();
        }) : null))) : "–",
      v.attached_to ?? "–",
      v.origin ?? "–",
    ];
    if (op) {
      r.push(h("td.actions", {}, v.attached_to ? null : confirmAction("Delete", v.name, async () => {
        const t = await api("DELETE", `volumes/${encodeURIComponent(v.name)}`);
        pageMessage(`deleting ${v.name} (task ${t.id})`, true);
        session.refresh?.();
      })));
    }
    r.attrs = { "data-volume": v.name };
    return r;
  });
  const parts = [h("h1", {}, "Volumes"), messages(),
    table("Volumes", ["Name", "Size", "Node", "Copies", "State", "Snapshots", "Attached to", "Cloned from", op ? "Actions" : null].filter(Boolean), rows, "No volumes yet.")];
  if (op) {
    parts.push(h("div.grid", {}, keep("volume-create", volumeCreateForm(nodes)),
      keep("snapshot-create", snapshotForm(volumes)), keep("clone-create", cloneForm(volumes)),
      keep("volume-resize", resizeForm(volumes, () => session.refresh?.()))));
  }
  const focused = document.activeElement;
  replace(main, ...parts);
  if (focused && main.contains(focused)) focused.focus();
}

// "in sync/asked" (e.g. "2/3"), and which copies are not in sync.
function copiesText(v) {
  const r = v.replication;
  const inSync = r.copies.filter((c) => c.state === "in_sync").length;
  const behind = r.copies.filter((c) => c.state !== "in_sync").map((c) => c.state.replace(/_/g, " "));
  return `${inSync}/${r.replicas}${behind.length ? ` (${behind.join(", ")})` : ""}`;
}

function volumeCreateForm(nodes) {
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const size = sizeInput();
  const node = nodeSelect(nodes);
  // Empty: the cluster's default, 3 copies when three nodes can hold one, else as many as can.
  const replicas = h("select", { name: "replicas" }, [
    h("option", { value: "" }, "Default (3 with 3 nodes up)"),
    ...[1, 2, 3].map((n) => h("option", { value: String(n) }, String(n))),
  ]);
  const status = h("div", { "aria-live": "polite" });
  const form = h("form.card#volume-create", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        const body = { name: name.value, size_bytes: size.bytes() };
        if (node.value) body.node = node.value;
        if (replicas.value) body.replicas = Number(replicas.value);
        const t = await api("POST", "volumes", body);
        session.refresh?.();
        await followTask(t, status, `volume ${body.name}`);
      });
    },
  }, h("h2", {}, "Create a volume"), field("Name", name), h("div.row", {}, field("Size", size.n), field("Unit", size.unit)),
  h("div.row", {}, field("Node", node, "For several copies, the primary's."), field("Copies", replicas)), formError(), status,
  h("p", {}, h("button", { type: "submit" }, "Create volume")));
  return form;
}

function snapshotForm(volumes) {
  const vol = h("select", { name: "volume" }, volumes.map((v) => h("option", { value: v.name }, v.name)));
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const status = h("div", { "aria-live": "polite" });
  const form = h("form.card#snapshot-create", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        const t = await api("POST", `volumes/${encodeURIComponent(vol.value)}/snapshots`, { name: name.value });
        session.refresh?.();
        await followTask(t, status, `snapshot ${vol.value}@${name.value}`);
      });
    },
  }, h("h2", {}, "Snapshot a volume"), field("Volume", vol), field("Snapshot name", name), formError(), status,
  h("p", {}, h("button", { type: "submit", disabled: !volumes.length }, "Take snapshot")));
  return form;
}

function cloneForm(volumes) {
  const snaps = volumes.flatMap((v) => v.snapshots.filter((s) => s.state === "ready").map((s) => [v.name, s.name]));
  const from = h("select", { name: "snapshot" }, snaps.map(([v, s]) => h("option", { value: `${v}@${s}` }, `${v}@${s}`)));
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const status = h("div", { "aria-live": "polite" });
  const form = h("form.card#clone-create", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        const [v, s] = from.value.split("@");
        const t = await api("POST", `volumes/${encodeURIComponent(v)}/clone`, { snapshot: s, name: name.value });
        session.refresh?.();
        await followTask(t, status, `clone ${name.value}`);
      });
    },
  }, h("h2", {}, "Clone a snapshot"), field("Snapshot", from, snaps.length ? null : "No snapshot yet."),
  field("New volume name", name), formError(), status,
  h("p", {}, h("button", { type: "submit", disabled: !snaps.length }, "Clone")));
  return form;
}

async function accessView(gen) {
  if (!can("administrator")) {
    replace(main, h("h1", {}, "Users and tokens"), h("p", {}, "Only administrators manage users and tokens."));
    return "manual";
  }
  const [users, tokens] = await Promise.all([api("GET", "users"), api("GET", "tokens")]);
  if (gen !== session.generation) return;
  const userRows = users.map((u) => {
    const role = h("select", { name: "role", "aria-label": `Role of ${u.username}` }, ROLES.map((r) => h("option", { value: r, selected: r === u.role }, r)));
    const r = [u.username, u.role, u.must_change_password ? "yes" : "no", h("td.actions", {}, role,
      action("Set role", u.username, async () => {
        await api("PATCH", `users/${encodeURIComponent(u.username)}`, { role: role.value });
        pageMessage(`${u.username} is now ${role.value}`, true);
        session.refresh?.();
      }),
      confirmAction("Delete", u.username, async () => {
        await api("DELETE", `users/${encodeURIComponent(u.username)}`);
        pageMessage(`${u.username} deleted`, true);
        session.refresh?.();
      }))];
    r.attrs = { "data-user": u.username };
    return r;
  });
  const tokenRows = tokens.map((t) => {
    const r = [t.id, t.user, t.role, when(t.expires_ms), h("td.actions", {}, confirmAction("Revoke", `token ${t.id}`, async () => {
      await api("DELETE", `tokens/${encodeURIComponent(t.id)}`);
      pageMessage(`token ${t.id} revoked`, true);
      session.refresh?.();
    }))];
    r.attrs = { "data-token": t.id };
    return r;
  });
  const secret = document.getElementById("token-secret");
  replace(main, h("h1", {}, "Users and tokens"), messages(),
    h("h2", {}, "Users"), table("Users", ["User", "Role", "Must change password", "Actions"], userRows),
    keep("user-create", userForm()),
    keep("password-reset", resetForm(users)),
    h("h2", {}, "API tokens"), secret ?? h("div#token-secret", { "aria-live": "polite" }),
    table("API tokens", ["Id", "User", "Role", "Expires", "Actions"], tokenRows, "No API tokens."),
    keep("token-create", tokenForm()));
}

function userForm() {
  const name = h("input", { name: "username", required: true, autocomplete: "off" });
  const pw = h("input", { name: "password", type: "password", required: true, autocomplete: "new-password" });
  const role = h("select", { name: "role" }, ROLES.map((r) => h("option", { value: r }, r)));
  const form = h("form.card#user-create", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        await api("POST", "users", { username: name.value, password: pw.value, role: role.value });
        pageMessage(`user ${name.value} created; they must change the password at their first login`, true);
        session.refresh?.();
      });
    },
  }, h("h2", {}, "Create a user"), h("div.row", {}, field("User name", name), field("Initial password", pw), field("Role", role)),
  formError(), h("p", {}, h("button", { type: "submit" }, "Create user")));
  return form;
}

/** An administrator sets another user's password; the user must change it at its next login. */
function resetForm(users) {
  const user = h("select", { name: "username" }, users.map((u) => h("option", { value: u.username }, u.username)));
  const pw = h("input", { name: "password", type: "password", required: true, autocomplete: "new-password" });
  const form = h("form.card#password-reset", {
    onsubmit: (ev) => {
      ev.preventDefault();
      const name = user.value;
      submit(form, async () => {
        await api("PATCH", `users/${encodeURIComponent(name)}`, { password: pw.value });
        pageMessage(`${name}'s password was reset: their sessions and tokens ended, and they must choose a new password at their next login`, true);
        session.refresh?.();
      });
    },
  }, h("h2", {}, "Reset a password"), h("div.row", {}, field("User", user), field("New password", pw, "12 to 1024 characters; tell the user over a channel you trust.")),
  formError(), h("p", {}, h("button", { type: "submit" }, "Reset password")));
  return form;
}

function tokenForm() {
  const role = h("select", { name: "role" }, ROLES.map((r) => h("option", { value: r }, r)));
  const exp = h("select", { name: "expires_in_s" },
    [["3600", "1 hour"], ["86400", "1 day"], ["2592000", "30 days"], ["31536000", "365 days"]].map(([v, t]) => h("option", { value: v, selected: v === "2592000" }, t)));
  const form = h("form.card#token-create", {
    onsubmit: (ev) => {
      ev.preventDefault();
      submit(form, async () => {
        const t = await api("POST", "tokens", { role: role.value, expires_in_s: Number(exp.value) });
        const box = document.getElementById("token-secret");
        replace(box, h("div.notice", {}, h("p", {}, `Token ${t.id} (${t.role}). Copy its secret now: it is shown only once.`),
          h("p.secret#new-token-secret", {}, t.token ?? "")));
        session.refresh?.();
      });
    },
  }, h("h2", {}, "Create an API token"), h("div.row", {}, field("Role", role, "At most your own."), field("Expires in", exp)),
  formError(), h("p", {}, h("button", { type: "submit" }, "Create token")));
  return form;
}

// ---------------------------------------------------------------- routing

const activity = activityPages({ current: (gen) => gen === session.generation, refresh: () => session.refresh?.(),
  onEvent: (f) => { session.onEvent = f; } });

const vms = vmsPage({ current: (gen) => gen === session.generation, can, refresh: () => session.refresh?.() });

const VIEWS = {
  "": dashboardView, vms: vms.view, volumes: volumesView, tasks: activity.tasks, events: activity.events, access: accessView,
  vm: vmPage({ current: (gen) => gen === session.generation, can, messages, vmActions: vms.vmActions, nodeName,
    onLeave: (f) => session.leave.push(f), refresh: () => session.refresh?.() }),
  networks: networksPage({ current: (gen) => gen === session.generation, can, messages, pageMessage, confirmAction,
    submit, keep, formError, refresh: () => session.refresh?.() }),
  nodes: nodesPage({ current: (gen) => gen === session.generation, can, messages, pageMessage, confirmAction,
    refresh: () => session.refresh?.() }),
  "two-factor": twoFactorPage({ current: (gen) => gen === session.generation, messages, pageMessage, submit, formError }),
};

async function route() {
  const gen = ++session.generation;
  clearTimeout(session.timer);
  session.refresh = null;
  session.onEvent = null;
  for (const f of session.leave.splice(0)) f();
  // `#/<page>/<item>` or `#/<page>?<query>` (the VM list's filter and page).
  const page = location.hash.replace(/^#\/?/, "").split(/[/?]/)[0];
  for (const a of nav.querySelectorAll("a")) {
    const here = (a.dataset.page === "dashboard" ? "" : a.dataset.page) === (page === "vm" ? "vms" : page);
    here ? a.setAttribute("aria-current", "page") : a.removeAttribute("aria-current");
  }
  document.title = `Tessera · ${page || "dashboard"}`;
  if (page === "login") { endSession(); loginView(); return; }
  if (!session.role) {
    let me;
    try {
      me = await whoami();
    } catch (e) {
      if (gen !== session.generation) return;
      if (e.status === 401) { location.hash = "#/login"; return; }
      replace(main, h("h1", {}, "The cluster did not answer"), h("p.alert", { role: "alert" }, e.message));
      session.timer = setTimeout(route, 5000);
      return;
    }
    if (gen !== session.generation) return;
    if (me.must_change_password || page === "password") { passwordView(); return; }
    await startSession(me);
    if (gen !== session.generation) return;
  }
  if (page === "password") { passwordView(); return; }
  const view = VIEWS[page];
  if (!view) { replace(main, h("h1", {}, "No such page"), h("p", {}, h("a", { href: "#/" }, "Dashboard"))); return; }
  const loadOnce = async () => {
    clearTimeout(session.timer);
    let next = 5000;
    try {
      next = (await view(gen)) ?? 5000;
    } catch (e) {
      if (gen !== session.generation) return;
      if (e.status !== 401) replace(main, h("h1", {}, "This page could not load"), h("p.alert", { role: "alert" }, e.message));
    }
    // Polling for what has no event (node metrics, task progress), bounded to one load per
    // interval; events refresh sooner through the stream.
    if (gen === session.generation && next !== "manual") session.timer = setTimeout(load, next);
  };
  // One load at a time: two in flight could finish out of order and the older answer
  // would be drawn last (a user just created gone from the list, a form rebuilt from it
  // under the person typing). A refresh asked for meanwhile runs once after it.
  let running = null;
  let again = false;
  const load = () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await loadOnce();
        } while (again && gen === session.generation);
      } finally {
        running = null;
      }
    })();
    return running;
  };
  session.refresh = load;
  await load();
  main.dataset.page = page || "dashboard";
}

window.addEventListener("hashchange", route);
route();
