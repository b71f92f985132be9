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

function renderSummary(s) {
  document.getElementById("run-id").textContent = s.run_id;
  document.getElementById("global-epoch").textContent = s.global_epoch;
  document.getElementById("samples-per-s").textContent = `${fmt(s.samples_per_s)} /s`;
  document.getElementById("eval-loss").textContent =
    s.latest_checkpoint_step >= 0 ? `${fmt(s.latest_eval_loss, 3)} @ ${s.latest_checkpoint_step}` : "-";
  document.getElementById("checkpoint-count").textContent = s.checkpoints;
  // how much of the training data the swarm has read (every finished pass counted)
  document.getElementById("data-read").textContent = s.dataset_sequences
    ? `${fmt(100 * s.dataset_sequences_read / s.dataset_sequences)}%` +
      (s.dataset_shards_sized < s.dataset_shards ? ` of ${s.dataset_shards_sized}/${s.dataset_shards} shards` : "")
    : "-";
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

function renderCheckpoints(list) {
  fillTable("checkpoints", list.slice().reverse().map((c) => {
    const tr = el("tr");
    const links = el("td");
    for (const name of Object.keys(c.files).sort()) {
      const a = el("a", name);
      a.href = `/checkpoints/${c.step}/${encodeURIComponent(name)}`;
      links.append(a, document.createTextNode(" "));
    }
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
}

// A small line chart: series = [{points: [[x, y], ...], color}], drawn into an SVG viewBox 600x220.
function lineChart(svg, series, yLabel) {
  svg.replaceChildren();
  const W = 600, H = 220, L = 48, R = 10, T = 10, B = 24;
  const all = series.flatMap((s) => s.points).filter(([, y]) => y !== null && Number.isFinite(y));
  if (!all.length) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", W / 2); t.setAttribute("y", H / 2); t.setAttribute("text-anchor", "middle");
    t.textContent = "no data yet";
    svg.append(t);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += 1; y0 -= 1; }
  const pad = (y1 - y0) * 0.08;
  y0 = y0 >= 0 && y0 - pad < 0 ? 0 : y0 - pad;  // rates and losses are never negative
  y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("class", "axis");
    line.setAttribute("x1", L); line.setAttribute("x2", W - R); line.setAttribute("y1", sy(y)); line.setAttribute("y2", sy(y));
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", L - 6); label.setAttribute("y", sy(y) + 4); label.setAttribute("text-anchor", "end");
    label.textContent = y.toFixed(y1 - y0 < 5 ? 2 : 0);
    svg.append(line, label);
  }
  const span = document.createElementNS(SVG, "text");
  span.setAttribute("x", W - R); span.setAttribute("y", H - 6); span.setAttribute("text-anchor", "end");
  span.textContent = `last ${((x1 - x0) / 60).toFixed(1)} min`;
  svg.append(span);
  for (const s of series) {
    const pts = s.points.filter(([, y]) => y !== null && Number.isFinite(y));
    if (!pts.length) continue;
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("class", "series");
    path.setAttribute("stroke", s.color);
    path.setAttribute("d", pts.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
    svg.append(path);
    for (const [x, y] of pts) {
      const c = document.createElementNS(SVG, "circle");
      c.setAttribute("class", "point");
      c.setAttribute("cx", sx(x)); c.setAttribute("cy", sy(y)); c.setAttribute("r", s.radius || 2);
      c.setAttribute("fill", s.color);
      svg.append(c);
    }
  }
}

function renderCharts(history) {
  const swarm = history.swarm;
  lineChart(document.getElementById("chart-throughput"),
    [{ points: swarm.map((h) => [h.t, h.samples_per_s]), color: "#16a34a" }]);
  lineChart(document.getElementById("chart-loss"), [
    { points: swarm.map((h) => [h.t, h.train_loss]), color: "#9ca3af", radius: 1.5 },
    { points: history.eval.map((e) => [e.t, e.eval_loss]), color: "#2563eb", radius: 3 },
  ]);
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  try {
    const [state, peers, history, contributors, checkpoints, rejections] = await Promise.all(
      ["state", "peers", "history", "contributors", "checkpoints", "rejections"].map((n) => getJSON(`/api/v1/${n}`)));
    renderSummary(state);
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

refresh();
