// A VM's serial console in the page: xterm.js (vendored, same origin) over the API's
// console WebSocket (`/api/v1/vms/{name}/console`: the output as text messages, what is
// sent is typed into the VM's serial port).
//
// The policy allows no inline style, and xterm.js writes its per-terminal rules (font,
// colours, cursor, row layout) into <style> elements, which the browser then ignores. So
// each such element's text is moved into a constructed style sheet
// (`document.adoptedStyleSheets`), which is made by this script (script-src 'self'), not
// parsed from the page; the rules are xterm's own, built from the options below.

import { h, replace } from "./dom.js";

let xtermModule = null;

/** Loads xterm.js and its style sheet once. */
async function loadXterm() {
  if (!xtermModule) {
    const css = h("link", { rel: "stylesheet", href: "/ui/vendor/xterm.css" });
    document.head.append(css);
    xtermModule = import("./vendor/xterm.mjs");
  }
  return xtermModule;
}

/** Mirrors the text of xterm's <style> elements under `root` into constructed sheets. */
function adoptStyles(root) {
  const sheets = new Map();
  const sync = () => {
    for (const el of root.querySelectorAll("style")) {
      let s = sheets.get(el);
      if (!s) {
        s = { sheet: new CSSStyleSheet(), text: null };
        sheets.set(el, s);
        document.adoptedStyleSheets = [...document.adoptedStyleSheets, s.sheet];
      }
      if (s.text !== el.textContent) {
        s.text = el.textContent;
        s.sheet.replaceSync(s.text);
      }
    }
  };
  const watch = new MutationObserver(sync);
  watch.observe(root, { subtree: true, childList: true, characterData: true });
  sync();
  return () => {
    watch.disconnect();
    const mine = new Set([...sheets.values()].map((s) => s.sheet));
    document.adoptedStyleSheets = document.adoptedStyleSheets.filter((s) => !mine.has(s));
  };
}

function colors() {
  const s = getComputedStyle(document.body);
  const dark = matchMedia("(prefers-color-scheme: dark)").matches;
  return {
    background: dark ? "#0b0d10" : "#fbfbfc",
    foreground: s.color,
    cursor: s.color,
    selectionBackground: dark ? "#3b4252" : "#c7d2fe",
  };
}

/**
 * Opens the console of VM `name` in `box`: a status line, the terminal, a Reconnect
 * button when the connection ends. Returns `close()`, which ends it all.
 */
export async function openConsole(box, name) {
  const status = h("p.muted#console-status", { role: "status" }, "Connecting…");
  const screen = h("div.terminal#console-screen", { "aria-label": `Serial console of ${name}` });
  const again = h("button.secondary#console-reconnect", { type: "button", hidden: true }, "Reconnect");
  replace(box, status, screen, h("p", {}, again));
  const { Terminal } = await loadXterm();
  const term = new Terminal({
    convertEol: true, // the guest may end lines with a bare \n
    cursorBlink: true,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
    fontSize: 14,
    rows: 24,
    cols: 80,
    scrollback: 5000,
    screenReaderMode: false,
    theme: colors(),
  });
  const unadopt = adoptStyles(screen);
  term.open(screen);
  let ws = null;
  let closed = false;
  const connect = () => {
    again.hidden = true;
    status.textContent = "Connecting…";
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/api/v1/vms/${encodeURIComponent(name)}/console`);
    ws.addEventListener("open", () => {
      status.textContent = "Connected: what you type goes to the VM's serial port.";
      screen.dataset.connected = "1";
    });
    ws.addEventListener("message", (m) => {
      if (typeof m.data === "string") term.write(m.data);
    });
    ws.addEventListener("close", () => {
      delete screen.dataset.connected;
      if (closed) return;
      // The browser does not tell why a WebSocket upgrade was refused: the VM not
      // running (409), the session ended (401), a role below Operator (403).
      status.textContent = "Disconnected (the VM stopped, or the node or the session ended).";
      again.hidden = false;
    });
  };
  term.onData((d) => {
    if (ws?.readyState === WebSocket.OPEN) ws.send(d);
  });
  again.addEventListener("click", connect);
  connect();
  return {
    focus: () => term.focus(),
    close() {
      closed = true;
      ws?.close();
      term.dispose();
      unadopt();
    },
  };
}
