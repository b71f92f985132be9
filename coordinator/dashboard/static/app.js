// crowdtrain dashboard: polls the coordinator's JSON API and redraws. No external scripts.
// Everything a peer can choose (its name, device, reason text) is inserted with textContent, never as HTML.
"use strict";

const REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh")) || 2000;
const SVG = "http://www.w3.org/2000/svg";

// Control and format characters (C0/C1, bidi overrides, line separators) never reach the page, even
// from a database written before the coordinator cleaned display text at input.
const CONTROL = /[\u0000-\u001f\u007f-\u009f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]/g;

function clean(text) {
  return String(text).replace(CONTROL, "");
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = clean(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(x, digits = 1) {
  return x === null || x === undefined || Number.isNaN(x) ? "-" : Number(x).toFixed(digits);
}

function duration(s) {  // seconds as "42s", "5m", "1.5h"
  if (s < 120) return `${s.toFixed(0)}s`;
  if (s < 7200) return `${(s / 60).toFixed(0)}m`;
  return `${(s / 3600).toFixed(1)}h`;
}

function ago(t) {
  return `${duration(Math.max(0, Date.now() / 1000 - t))} ago`;
}

function bytes(n) {
  return n > 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n > 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(0)} kB`;
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

// The headline numbers come from /api/v1/dashboard (`n`), each defined once on the coordinator
// (coordinator/dashboard/numbers.py) and shared with `crowdtrain status`: no arithmetic here.
function renderSummary(s, n) {
  document.getElementById("run-id").textContent = s.run_id;
  document.getElementById("global-epoch").textContent = n.epoch;
  document.getElementById("epoch-source").textContent =
    n.epoch_source === "checkpoint" ? "the latest checkpoint's (no swarm records now)" : "the swarm's progress records";
  document.getElementById("samples-per-s").textContent = `${fmt(n.swarm_samples_per_s)} /s`;
  document.getElementById("eval-loss").textContent =
    s.latest_checkpoint_step >= 0 ? `${fmt(s.latest_eval_loss, 3)} @ ${s.latest_checkpoint_step}` : "-";
  document.getElementById("checkpoint-count").textContent = s.checkpoints;
  // a share only once every shard is sized (it never falls); before, sequences read and shards sized
  const read = document.getElementById("data-read");
  read.textContent = n.data_read ? n.data_read.card : "-";
  read.title = n.data_read ? n.data_read.text : "no peer has reported a shard's size yet";
  document.getElementById("data-read-note").textContent = n.data_read ? n.data_read.note : "";
  const states = document.getElementById("peer-states");
  states.replaceChildren();
  for (const [state, n] of Object.entries(s.peers_by_state)) {
    if (!n) continue;
    const badge = el("span", `${n} ${state}`, `badge ${state}`);
    badge.style.marginRight = "4px";
    states.append(badge);
  }
  if (!states.childElementCount) states.textContent = "none";
}

function renderPeers(peers) {
  fillTable("peers", peers.map((p) => {
    const tr = el("tr");
    tr.dataset.peer = p.peer_id;  // the public id (`crowdtrain ban` takes it); never the session id
    tr.dataset.state = p.state;
    const reason = el("td", p.reason, p.state === "ONLINE" && !p.contributing ? "warn" : "");
    tr.append(
      (() => {  // links to the peer's own page, by its public id
        const td = el("td", null, "name"), a = el("a", p.name);
        a.href = `/peer/${encodeURIComponent(p.peer_id)}`;
        td.title = `id ${clean(p.peer_id)}`;
        td.append(a);
        return td;
      })(),
      (() => { const td = el("td"); td.append(el("span", p.state, `badge ${p.state}`)); return td; })(),
      reason,
      el("td", p.device),
      el("td", p.version || "-"),
      el("td", p.client_mode ? "client mode" : p.reachability || "-", p.reachability === "unreachable" ? "warn" : ""),
      el("td", p.shard_sequences ? `${p.shard_index}: ${p.shard_position}/${p.shard_sequences}` : "-", "num"),
      el("td", fmt(p.samples_per_s), "num"),
      el("td", p.local_epoch, "num"),
      el("td", fmt(p.loss, 3), "num"),
      el("td", p.computed_samples, "num"),
      el("td", p.contributed_samples, "num"),
      // reports of refused contributions against it; enough distinct reporters ban it (see reason)
      el("td", p.rejections_against || "-", p.rejections_against ? "num warn" : "num"),
      el("td", p.swarm_size || "-", "num"),
      el("td", p.uptime_s ? duration(p.uptime_s) : "-", "num"),  // 0: no heartbeat yet (or DHT-only)
      el("td", ago(p.last_seen_unix_s)),
    );
    return tr;
  }));
}

function renderContributors(rows) {
  const total = rows.reduce((a, r) => a + r.samples, 0) || 1;
  fillTable("contributors", rows.slice(0, 20).map((r, i) => {
    const tr = el("tr");
    tr.append(el("td", i + 1), el("td", r.name), el("td", r.samples, "num"), el("td", `${(100 * r.samples / total).toFixed(1)}%`, "num"));
    return tr;
  }));
}

// A command in a <code> with a copy button (the button copies its code element's text).
function commandBox(text, id) {
  const box = el("div", null, "cmd"), code = el("code", text), button = el("button", "copy");
  if (id) code.id = id;
  button.type = "button";
  button.addEventListener("click", () => copyText(code, button));
  box.append(code, button);
  return box;
}

// navigator.clipboard exists only in a secure context (https, localhost): elsewhere select and copy.
function copyText(code, button) {
  const done = () => { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1500); };
  const fallback = () => {
    const range = document.createRange();
    range.selectNodeContents(code);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    if (document.execCommand("copy")) done(); else button.textContent = "select and copy";
  };
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(code.textContent).then(done, fallback);
  else fallback();
}

let join = null;  // /api/v1/join, fetched until the coordinator has announced its gRPC API

function renderJoin(j) {
  document.getElementById("join-command").textContent = j.join_command;
  document.getElementById("invite-command").textContent = j.invite_command;
  document.getElementById("invite-hint").hidden = !j.invite_command;
  document.getElementById("tls-hint").hidden = !j.tls;
  document.getElementById("allowlist-hint").hidden = j.admission !== "allowlist";
  document.getElementById("run-key").textContent = j.run_key;
  document.getElementById("run-key-line").hidden = !j.run_key;
  fillTable("ports", j.ports.map((p) => {
    const tr = el("tr");
    tr.append(el("td", p.name), el("td", p.port, "num"), el("td", p.use));
    return tr;
  }));
  document.getElementById("join").hidden = false;
}

function renderCheckpoints(list) {
  document.getElementById("checkpoints-empty").hidden = list.length > 0;
  document.getElementById("checkpoints").hidden = list.length === 0;
  fillTable("checkpoints", list.slice().reverse().map((c) => {
    const tr = el("tr");
    tr.dataset.step = c.step;
    const links = el("td");
    if (join) links.append(commandBox(join.pull_command.replace("--step STEP", `--step ${c.step}`)));
    const files = el("div", "files: ", "files muted");
    for (const name of Object.keys(c.files).sort()) {
      const a = el("a", name);
      a.href = `/checkpoints/${c.step}/${encodeURIComponent(name)}`;
      files.append(a, document.createTextNode(" "));
    }
    links.append(files);
    const size = Object.values(c.files).reduce((a, f) => a + f.size_bytes, 0);
    tr.append(el("td", c.step, "num"), el("td", new Date(c.created_unix_s * 1000).toLocaleString()),
      el("td", fmt(c.eval_loss, 3), "num"), el("td", bytes(size), "num"), links);
    return tr;
  }));
}

// Evidence against peers and the automatic bans it led to (the publisher's refusals are shown apart).
function renderEvidence(rows) {
  const shown = rows.filter((r) => r.source !== "publisher").slice(0, 20);
  fillTable("evidence", shown.map((r) => {
    const tr = el("tr");
    tr.dataset.source = r.source;
    const what = r.source === "automatic_ban" ? el("span", "BANNED", "badge BANNED") : el("span", r.kind);
    const whatCell = el("td");
    whatCell.append(what);
    tr.append(el("td", ago(r.t)), whatCell, el("td", r.offender, "name"), el("td", r.reason));
    return tr;
  }));
  document.getElementById("evidence-empty").hidden = shown.length > 0;
  document.getElementById("evidence").hidden = shown.length === 0;
}

// Line charts over one shared time window, with a time axis and a hover cursor shown on both at the
// same instant. series = [{name, points: [[t, y], ...], color, digits}], drawn in a 600x230 viewBox.
const GEOM = { W: 600, H: 230, L: 48, R: 10, T: 10, B: 34 };
const charts = {};  // svg id -> what the cursor needs: scales and series
let hoverT = null;  // the instant under the mouse, in seconds since the epoch (null: none)

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function timeLabel(t, span) {  // local time; seconds for a short window, the day for a long one
  const d = new Date(t * 1000);
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", ...(span < 600 ? { second: "2-digit" } : {}) });
  return span > 86400 ? `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${hm}` : hm;
}

function finite(p) {
  return p[1] !== null && Number.isFinite(p[1]);
}

function lineChart(svg, series, [x0, x1]) {
  svg.replaceChildren();
  const { W, H, L, R, T, B } = GEOM;
  const ys = series.flatMap((s) => s.points.filter(finite).map((p) => p[1]));
  charts[svg.id] = null;
  if (!ys.length) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return;
  }
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 === y0) { y1 += 1; y0 -= 1; }
  const pad = (y1 - y0) * 0.08;
  y0 = y0 >= 0 && y0 - pad < 0 ? 0 : y0 - pad;  // rates and losses are never negative
  y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svg.append(svgEl("line", { class: "axis", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }),
      svgEl("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, y.toFixed(y1 - y0 < 5 ? 2 : 0)));
  }
  for (let i = 0; i <= 4; i++) {  // the time axis: the same five instants on every chart
    const x = x0 + (x1 - x0) * i / 4, anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
    svg.append(svgEl("line", { class: "tick", x1: sx(x), x2: sx(x), y1: H - B, y2: H - B + 4 }),
      svgEl("text", { class: "tick-x", x: sx(x), y: H - B + 16, "text-anchor": anchor }, timeLabel(x, x1 - x0)));
  }
  svg.append(svgEl("line", { class: "baseline", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  for (const s of series) {
    const pts = s.points.filter(finite);
    if (!pts.length) continue;
    svg.append(svgEl("path", { class: "series", stroke: s.color,
      d: pts.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") }));
    for (const [x, y] of pts) {
      svg.append(svgEl("circle", { class: "point", cx: sx(x), cy: sy(y), r: s.radius || 2, fill: s.color }));
    }
  }
  const cursor = svgEl("g", { class: "cursor", visibility: "hidden" });
  cursor.append(svgEl("line", { y1: T, y2: H - B }), svgEl("text", { class: "cursor-label", y: T + 12 }));
  const overlay = svgEl("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "transparent" });
  overlay.addEventListener("mousemove", (e) => {
    const box = svg.getBoundingClientRect();
    const x = (e.clientX - box.left) * W / box.width;
    hover(x0 + (x - L) / (W - L - R) * (x1 - x0));
  });
  overlay.addEventListener("mouseleave", () => hover(null));
  svg.append(cursor, overlay);
  charts[svg.id] = { series, sx, x0, x1, cursor };
}

function nearest(points, t) {
  let best = null;
  for (const p of points) if (finite(p) && (best === null || Math.abs(p[0] - t) < Math.abs(best[0] - t))) best = p;
  return best;
}

// The cursor at instant t on every chart, each labelled with its series' values nearest to t.
function hover(t) {
  hoverT = t;
  for (const c of Object.values(charts)) {
    if (!c) continue;
    c.cursor.setAttribute("visibility", t === null ? "hidden" : "visible");
    if (t === null) continue;
    const x = c.sx(t), [line, label] = c.cursor.children;
    line.setAttribute("x1", x); line.setAttribute("x2", x);
    const values = c.series.map((s) => [s, nearest(s.points, t)]).filter(([, p]) => p)
      .map(([s, p]) => `${s.name} ${fmt(p[1], s.digits)}`);
    label.textContent = `${timeLabel(t, c.x1 - c.x0)}  ${values.join(", ")}`;
    label.setAttribute("x", x > GEOM.W / 2 ? x - 6 : x + 6);
    label.setAttribute("text-anchor", x > GEOM.W / 2 ? "end" : "start");
  }
}

function renderCharts(history) {
  const swarm = history.swarm;
  const throughput = [{ name: "samples/s", points: swarm.map((h) => [h.t, h.samples_per_s]), color: "#16a34a", digits: 1 }];
  const loss = [
    { name: "training", points: swarm.map((h) => [h.t, h.train_loss]), color: "#9ca3af", radius: 1.5, digits: 3 },
    { name: "held-out", points: history.eval.map((e) => [e.t, e.eval_loss]), color: "#2563eb", radius: 3, digits: 3 },
  ];
  const ts = [...throughput, ...loss].flatMap((s) => s.points.filter(finite).map((p) => p[0]));
  const window = ts.length ? [Math.min(...ts), Math.max(...ts)] : [0, 1];
  if (window[1] === window[0]) window[1] = window[0] + 1;
  lineChart(document.getElementById("chart-throughput"), throughput, window);
  lineChart(document.getElementById("chart-loss"), loss, window);
  if (hoverT !== null) hover(hoverT);  // keep the cursor where the mouse is across refreshes
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  try {
    if (!join) join = await getJSON("/api/v1/join").then((j) => { renderJoin(j); return j; }, () => null);
    const [state, numbers, peers, history, contributors, checkpoints, rejections] = await Promise.all(
      ["state", "dashboard", "peers", "history", "contributors", "checkpoints", "rejections"].map((n) => getJSON(`/api/v1/${n}`)));
    renderSummary(state, numbers);
    renderPeers(peers);
    renderCharts(history);
    renderContributors(contributors);
    renderCheckpoints(checkpoints);
    renderEvidence(rejections);
    document.getElementById("rejection").textContent =
      state.last_rejection ? `refused to publish ${state.last_rejection}` : "";
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.ready = "1";
  } catch (e) {
    document.getElementById("updated").textContent = `coordinator unreachable (${e.message}); retrying`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

for (const button of document.querySelectorAll("button[data-copy]")) {
  button.addEventListener("click", () => copyText(document.getElementById(button.dataset.copy), button));
}
refresh();
