// crowdtrain: one peer's page (/peer/<id>), polling /api/v1/peers/<id>. No external scripts.
// Everything a peer can choose (its name, device, reason text) is inserted with textContent, never as HTML.
"use strict";

const CONTROL = /[\u0000-\u001f\u007f-\u009f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]/g;
const KEY = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const API = `/api/v1/peers/${encodeURIComponent(KEY)}`;

function text(id, value) {
  document.getElementById(id).textContent = String(value).replace(CONTROL, "");
}

function cell(value, cls) {
  const td = document.createElement("td");
  td.textContent = String(value ?? "-").replace(CONTROL, "");
  if (cls) td.className = cls;
  return td;
}

function ago(t) {
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 120 ? `${s.toFixed(0)}s ago` : s < 7200 ? `${(s / 60).toFixed(0)}m ago` : `${(s / 3600).toFixed(1)}h ago`;
}

function render(page) {
  const p = page.peer, s = page.standing;
  text("peer-name", p.name);
  const badge = document.getElementById("peer-state");
  badge.textContent = p.state;
  badge.className = `badge ${p.state.replace(/[^A-Z]/g, "")}`;
  text("peer-reason", p.reason);
  text("accepted", s.credited ? s.accepted_samples.toLocaleString() : "not credited yet");
  text("share", s.accepted_samples ? `${(100 * s.share).toFixed(1)}%` : "-");
  text("rank", s.rank ? `${s.rank} of ${s.ranked_peers}` : "-");
  text("rate", Number(p.samples_per_s).toFixed(1));
  text("epoch", p.local_epoch);
  const data = p.shard_sequences ? `shard ${p.shard_index}, sequence ${p.shard_position} of ${p.shard_sequences} (pass ${p.shard_pass + 1})` : "-";
  const network = p.client_mode ? "client mode (others cannot connect to it)" : (p.reachability || "not checked");
  const facts = [
    ["public id", p.peer_id], ["hivemind id", p.dht_peer_id || "-"], ["device", p.device], ["version", p.version || "-"],
    ["network", network], ["data", data], ["computed samples", p.computed_samples], ["loss", Number.isFinite(p.loss) ? p.loss.toFixed(3) : "-"],
    ["paused because", p.pause_reason || "-"], ["last seen", ago(p.last_seen_unix_s)],
  ];
  document.querySelector("#facts tbody").replaceChildren(...facts.map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.append(cell(k), cell(v));
    return tr;
  }));
  document.querySelector("#sessions tbody").replaceChildren(...page.sessions.map((v) => {
    const tr = document.createElement("tr");
    tr.append(cell(v.peer_id), cell(v.state), cell(v.reason), cell(v.computed_samples, "num"), cell(ago(v.last_seen_unix_s)));
    return tr;
  }));
}

async function refresh() {
  try {
    const response = await fetch(API, { cache: "no-store" });
    if (response.status === 404) {
      text("updated", "no such peer (yet): it appears once it has joined");
    } else if (!response.ok) {
      text("updated", `coordinator answered ${response.status}`);
    } else {
      render(await response.json());
      text("updated", `updated ${new Date().toLocaleTimeString()}`);
    }
  } catch (e) {
    text("updated", `coordinator unreachable (${e.message}); retrying`);
  }
  setTimeout(refresh, 5000);
}

document.getElementById("json-link").href = API;
refresh();
