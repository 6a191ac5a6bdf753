// Time-series charts for the console: uPlot (vendor/, see docs/console.md), loaded on the
// first page that draws a chart so the other pages do not carry it.

let loading = null;

/** Loads uPlot's script and style sheet once (same origin: the CSP allows them). */
export function loadCharts() {
  if (window.uPlot) return Promise.resolve(window.uPlot);
  loading ??= new Promise((resolve, reject) => {
    const css = document.createElement("link");
    css.rel = "stylesheet";
    css.href = "/ui/vendor/uPlot.min.css";
    document.head.append(css);
    const s = document.createElement("script");
    s.src = "/ui/vendor/uPlot.iife.min.js";
    s.addEventListener("load", () => resolve(window.uPlot));
    s.addEventListener("error", () => {
      loading = null;
      s.remove();
      reject(new Error("the chart library did not load; reload the page"));
    });
    document.head.append(s);
  });
  return loading;
}

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706"];

/**
 * A line chart of time series in `box` (an element already in the page): `series` are
 * `{label, value: (point) => number|null}`, `fmt` formats a value for the axis and the
 * legend; `range` fixes the y axis. Returns `{set(points)}` to (re)draw with the given points (oldest first,
 * `t_ms` each; the box's `data-points` says how many are drawn) and `{destroy()}` to take
 * the chart out of its box (a chart whose series change is drawn anew).
 */
export function lineChart(uPlot, box, { series, fmt, range }) {
  const style = getComputedStyle(document.body);
  const fg = style.color;
  const grid = style.getPropertyValue("--line").trim() || "#8884";
  const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
  const opts = {
    width: Math.max(240, box.clientWidth || 600),
    height: 180,
    cursor: { drag: { x: false, y: false } },
    // From 0 up to a little above the highest value, or the fixed `range` (CPU: 0-100).
    scales: { x: { time: true }, y: { range: (u, lo, hi) => range ?? [0, hi > 0 ? hi * 1.1 : 1] } },
    axes: [axis, { ...axis, size: 70, values: (u, vals) => vals.map(fmt) }],
    series: [{}, ...series.map((s, i) => ({
      label: s.label,
      stroke: PALETTE[i % PALETTE.length],
      width: 2,
      spanGaps: false,
      value: (u, v) => (v === null || v === undefined ? "–" : fmt(v)),
    }))],
  };
  const data = (points) => [
    points.map((p) => p.t_ms / 1000),
    ...series.map((s) => points.map((p) => {
      const v = s.value(p);
      return v === undefined ? null : v;
    })),
  ];
  const plot = new uPlot(opts, data([]), box);
  let gone = false;
  const destroy = () => {
    if (gone) return;
    gone = true;
    resize.disconnect();
    plot.destroy();
  };
  const resize = new ResizeObserver(() => {
    if (!box.isConnected) { destroy(); return; }
    const w = Math.max(240, box.clientWidth);
    if (Math.abs(w - plot.width) > 2) plot.setSize({ width: w, height: 180 });
  });
  resize.observe(box);
  return {
    set(points) {
      plot.setData(data(points));
      box.dataset.points = String(points.length);
    },
    destroy,
  };
}
