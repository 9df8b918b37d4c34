// The dashboard: reads the agent's JSON every REFRESH_MS and redraws.
// Read-only: it only sends GET requests. Every figure cell carries a
// data-k key (e.g. "vip/web/packets") so tools can read the page.
"use strict";

const REFRESH_MS = 2000;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

const fmt = (x) => (x === null || x === undefined ? "–" : String(x));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(0) + "%");
const num = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(2));

function table(headers, rows) {
  const t = el("table", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h))));
  for (const r of rows) {
    t.append(el("tr", {}, ...r.map(([text, key, cls]) => el("td", { "data-k": key, class: cls }, text))));
  }
  return t;
}

function renderVips(status) {
  const box = document.getElementById("vips");
  box.replaceChildren();
  if (!status.vips.length) box.append(el("p", { class: "muted" }, "No VIP is configured."));
  for (const v of status.vips) {
    const k = "vip/" + v.name;
    box.append(el("h3", {}, `${v.name} `, el("span", { class: "muted" }, `${v.protocol} ${v.address}:${v.port}`)));
    box.append(table(
      ["packets", "bytes in", "bytes out", "new flows", "closed fin", "closed rst"],
      [[
        [v.counters.packets, k + "/packets"],
        [v.counters.bytes, k + "/bytes"],
        [v.counters.bytes_out, k + "/bytes_out"],
        [v.counters.new_flows, k + "/new_flows"],
        [v.counters.closed_fin, k + "/closed_fin"],
        [v.counters.closed_rst, k + "/closed_rst"],
      ]],
    ));
    box.append(table(
      ["backend", "state", "health", "weight", "effective weight", "load", "active flows", "maglev slots", "up to date", "drain"],
      v.backends.map((b) => {
        const bk = `backend/${v.name}/${b.address}`;
        return [
          [b.address, bk + "/address"],
          [b.state, bk + "/state", b.state],
          [b.health, bk + "/health", b.health],
          [b.weight, bk + "/weight"],
          [b.effective_weight, bk + "/effective_weight"],
          [num(b.load), bk + "/load"],
          [b.active_flows, bk + "/active_flows"],
          [b.maglev_slots, bk + "/maglev_slots"],
          [b.up_to_date ? "yes" : "no", bk + "/up_to_date"],
          [pct(b.drain_progress), bk + "/drain_progress"],
        ];
      }),
    ));
  }
  if (status.backends.length) {
    box.append(el("h3", {}, "Backend hosts"));
    box.append(table(
      ["backend", "packets", "new flows", "active flows", "next hop", "MTU"],
      status.backends.map((b) => {
        const hk = "host/" + b.address;
        return [
          [b.address, hk + "/address"],
          [b.counters.packets, hk + "/packets"],
          [b.counters.new_flows, hk + "/new_flows"],
          [b.active_flows, hk + "/active_flows"],
          [b.next_hop ? b.next_hop.mac : "unresolved", hk + "/next_hop"],
          [b.next_hop ? b.next_hop.mtu : "–", hk + "/mtu"],
        ];
      }),
    ));
  }
}

function renderMaintenance(vips) {
  const box = document.getElementById("maintenance");
  box.replaceChildren();
  const rows = [];
  for (const v of vips) {
    const r = v.rollout;
    const running = r && r.finished_ms == null && r.cancelled_ms == null;
    const busy = Object.entries(v.backends).filter(([, b]) => b.phase !== "active" || b.disabled);
    if (!running && !busy.length) continue;
    const total = Object.keys(v.backends).length;
    const done = Object.values(v.backends).filter((b) => b.generation >= v.generation && b.phase === "active").length;
    const what = running ? `rollout to generation ${v.generation}: ${done}/${total} backends done` : "no rollout";
    rows.push([[v.name, `maint/${v.name}/vip`], [what, `maint/${v.name}/rollout`], [v.held || "", `maint/${v.name}/held`]]);
    for (const [addr, b] of busy) {
      const drain = b.phase === "draining" && b.flows_at_drain
        ? ` (${b.flows} of ${b.flows_at_drain} flows left)` : "";
      const state = (b.disabled ? "disabled " : "") + b.phase + drain;
      rows.push([[`  ${addr}`, `maint/${v.name}/${addr}/address`], [state, `maint/${v.name}/${addr}/phase`, b.phase], [b.last_error || "", `maint/${v.name}/${addr}/error`]]);
    }
  }
  box.append(rows.length ? table(["VIP / backend", "what", "note"], rows)
    : el("p", { class: "muted" }, "No rollout or drain in progress."));
}

// Rates between consecutive samples of `series(sample)` for each name.
function rates(samples, pick, field) {
  const out = new Map();
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i];
    const dt = (b.at_ms - a.at_ms) / 1000;
    if (dt <= 0) continue;
    for (const [name, p] of Object.entries(pick(b))) {
      const q = pick(a)[name];
      if (!q || p[field] < q[field]) continue;
      if (!out.has(name)) out.set(name, []);
      out.get(name).push([b.at_ms, (p[field] - q[field]) / dt]);
    }
  }
  return out;
}

function chart(title, series, key) {
  const W = 420, H = 150, L = 48, B = 18;
  const box = el("div", { class: "chart", "data-chart": key }, el("div", {}, title));
  const s = svg("svg", { width: W, height: H + B });
  const points = [...series.values()].flat();
  const now = Date.now();
  // At most five minutes; less while the agent has fewer samples.
  const first = Math.min(now - 30 * 1000, ...points.map((p) => p[0]));
  const t0 = Math.max(now - 5 * 60 * 1000, first);
  const ymax = Math.max(1, ...points.map((p) => p[1]));
  const x = (t) => L + ((t - t0) / (now - t0)) * (W - L - 4);
  const y = (v) => 4 + (1 - v / ymax) * (H - 8);
  s.append(svg("line", { x1: L, y1: y(0), x2: W - 4, y2: y(0), stroke: "#9ca3af" }));
  s.append(svg("line", { x1: L, y1: 4, x2: L, y2: y(0), stroke: "#9ca3af" }));
  for (const [v, label] of [[ymax, ymax.toPrecision(3)], [0, "0"]]) {
    const t = svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7280" });
    t.textContent = label;
    s.append(t);
  }
  const span = Math.round((now - t0) / 1000);
  const ago = span >= 120 ? `${Math.round(span / 60)} min ago` : `${span} s ago`;
  for (const [tx, label] of [[t0, ago], [now, "now"]]) {
    const t = svg("text", { x: x(tx), y: H + B - 4, "text-anchor": tx === now ? "end" : "start", "font-size": 11, fill: "#6b7280" });
    t.textContent = label;
    s.append(t);
  }
  const legend = el("div", { class: "legend" });
  let i = 0;
  for (const [name, pts] of series) {
    const color = COLORS[i++ % COLORS.length];
    const kept = pts.filter((p) => p[0] >= t0);
    if (kept.length) {
      s.append(svg("polyline", {
        points: kept.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: color, "stroke-width": 1.5, "data-series": name,
      }));
      const [lx, ly] = kept[kept.length - 1];
      s.append(svg("circle", { cx: x(lx).toFixed(1), cy: y(ly).toFixed(1), r: 2.5, fill: color }));
    }
    const last = pts.length ? pts[pts.length - 1][1] : 0;
    legend.append(el("span", { style: `color:${color}` }, `■ ${name} ${last.toFixed(1)}/s`));
  }
  if (!series.size) legend.append(el("span", { class: "muted" }, "no samples yet"));
  box.append(s, legend);
  return box;
}

function renderCharts(history) {
  const box = document.getElementById("charts");
  const s = history.samples;
  box.replaceChildren(
    chart("VIP packets/s", rates(s, (x) => x.vips, "packets"), "vip-packets"),
    chart("VIP new flows/s", rates(s, (x) => x.vips, "new_flows"), "vip-new-flows"),
    chart("Backend packets/s", rates(s, (x) => x.backends, "packets"), "backend-packets"),
    chart("Backend new flows/s", rates(s, (x) => x.backends, "new_flows"), "backend-new-flows"),
  );
}

function renderFlows(flows) {
  const box = document.getElementById("flows");
  box.replaceChildren(el("p", { class: "muted", "data-k": "flows/matched" }, `${flows.matched} flows; the largest:`));
  box.append(table(
    ["client", "VIP", "backend", "state", "packets", "bytes", "age s"],
    flows.flows.map((f, i) => [
      [f.client, `flow/${i}/client`], [f.vip, `flow/${i}/vip`], [fmt(f.backend), `flow/${i}/backend`],
      [f.state, `flow/${i}/state`], [f.client_to_lb.packets, `flow/${i}/packets`],
      [f.client_to_lb.bytes, `flow/${i}/bytes`], [f.age_s.toFixed(1), `flow/${i}/age_s`],
    ]),
  ));
}

function renderOutcomes(status) {
  const box = document.getElementById("outcomes");
  const rows = status.outcomes.map((o) => [[o.outcome, `outcome/${o.outcome}/name`], [o.packets, `outcome/${o.outcome}/packets`], [o.bytes, `outcome/${o.outcome}/bytes`]]);
  rows.push([["mss clamped", "outcome/mss_clamped/name"], [status.mss_clamped, "outcome/mss_clamped/packets"], ["", "outcome/mss_clamped/bytes"]]);
  box.replaceChildren(table(["outcome", "packets", "bytes"], rows));
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(`${path}: ${body.error || r.status}`);
  return body;
}

let refreshes = 0;
async function refresh() {
  const error = document.getElementById("error");
  try {
    const [status, maintenance, flows, history] = await Promise.all(
      ["/api/status", "/api/maintenance", "/api/flows", "/api/history"].map(getJson));
    renderVips(status);
    renderMaintenance(maintenance);
    renderCharts(history);
    renderFlows(flows);
    renderOutcomes(status);
    refreshes += 1;
    const updated = document.getElementById("updated");
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    updated.dataset.refreshes = refreshes;
    error.hidden = true;
  } catch (e) {
    error.textContent = `cannot read the agent: ${e.message}`;
    error.hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
