// Outpost dashboard: rollouts and their waves, devices with version, health and
// attestation, the deny-list's affected set, SBOM search and the audit log, refreshed
// every two seconds from the admin API with the operator's or viewer's bearer token.
// Everything from the server is inserted as text, never as markup.
"use strict";

const REFRESH_MS = 2000;
let token = null;
let role = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "onclick") e.addEventListener("click", v);
    else e[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function table(headers, rows) {
  if (rows.length === 0) return el("p", { class: "empty" }, "none");
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + token } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  const text = await resp.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const msg = (data && data.message) || text || resp.statusText;
    const err = new Error(`${method} ${path}: ${resp.status} ${msg}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function stateText(r) {
  const st = r.state || {};
  let text = r.state_name;
  if (st.wave !== undefined) text += ` in wave ${st.wave}`;
  if (st.reason && st.reason.kind === "failure_threshold") {
    text += `: ${st.reason.failed} of ${st.reason.assigned} failed (threshold ${st.reason.threshold})`;
  } else if (st.reason && st.reason.kind === "operator") {
    text += ` by ${st.reason.by}`;
  } else if (r.state_name === "aborted") {
    text += ` by ${st.by}${st.roll_back ? " (rolling back)" : ""}`;
  }
  return text;
}

const ACTIONS = {
  draft: ["start", "abort"],
  running: ["pause", "advance", "abort"],
  awaiting_approval: ["advance", "pause", "abort"],
  paused: ["resume", "advance", "abort"],
};

async function act(id, action) {
  let body = {};
  if (action === "abort") {
    if (!window.confirm(`Abort rollout ${id}? No new device will be assigned.`)) return;
    body = { roll_back: window.confirm("Also assign the devices it reached their previous release back?") };
  }
  try {
    await api("POST", `/api/v1/rollouts/${encodeURIComponent(id)}/${action}`, body);
    showError(null);
  } catch (e) {
    showError(e.message);
  }
  refresh();
}

function renderRollouts(list) {
  const box = document.getElementById("rollouts");
  if (list.length === 0) {
    box.replaceChildren(el("p", { class: "empty" }, "no rollouts yet (outpost rollout create)"));
    return;
  }
  box.replaceChildren(...list.map((r) => {
    const buttons = role === "operator"
      ? (ACTIONS[r.state_name] || []).map((a) => el("button", { "data-action": a, "data-id": r.id, onclick: () => act(r.id, a) }, a))
      : [];
    const waves = table(
      ["wave", "percent", "assigned", "installing", "healthy", "rolled back", "attestation failed", "gates"],
      r.waves.map((w) => el("tr", { class: w.current ? "current" : "" },
        el("td", {}, w.current ? `▶ ${w.wave}` : w.wave), el("td", { class: "num" }, `${w.percent}%`),
        el("td", { class: "num" }, w.assigned), el("td", { class: "num" }, w.installing),
        el("td", { class: "num" }, w.healthy), el("td", { class: "num" }, w.rolled_back),
        el("td", { class: "num" }, w.attestation_failed),
        el("td", {}, `success ≥ ${w.success_threshold}, fail ≥ ${w.failure_threshold}, min ${w.min_devices}, soak ${w.soak_secs}s`))));
    waves.classList.add("waves");
    const last = (r.events || []).slice(-1)[0];
    return el("div", { class: "rollout", "data-id": r.id },
      el("h3", {}, el("span", { class: "mono" }, r.id), ` ${r.name} `,
        el("span", { class: `state state-${r.state_name}`, "data-state": r.state_name }, stateText(r))),
      el("p", {}, `release ${r.release.version} (${r.release.path}), class ${r.hardware_class}, labels ${JSON.stringify(r.labels)}, gate ${r.gate}`),
      waves,
      last ? el("p", { class: "hint" }, `last transition ${last.at}: ${last.from} → ${last.to}`) : null,
      el("div", {}, buttons));
  }));
}

function renderDevices(list) {
  document.getElementById("devices").replaceChildren(table(
    ["device", "class", "labels", "version", "slot", "health", "attestation", "reason", "last check-in"],
    list.map((d) => el("tr", { "data-device": d.device_id },
      el("td", { class: "mono" }, d.device_id), el("td", {}, d.hardware_class),
      el("td", {}, Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ")),
      el("td", {}, d.version || "–"), el("td", {}, d.slot || "–"), el("td", {}, d.health || "–"),
      el("td", { class: d.quarantined ? "quarantined" : d.attestation },
        d.quarantined ? "QUARANTINED" : d.attestation,
        (d.vulnerable || []).length ? el("span", { class: "vulnerable" }, ` VULNERABLE (${d.vulnerable.join(", ")})`) : null),
      el("td", {}, d.attestation_reason || ""), el("td", {}, d.last_checkin_at || "never")))));
}

function renderAffected(data) {
  const box = document.getElementById("affected");
  if (!data.denylist) {
    box.replaceChildren(el("p", { class: "empty" }, "no signed deny-list published"));
    return;
  }
  box.replaceChildren(el("p", { class: "hint" }, `deny-list ${data.denylist.target} (sha256 ${data.denylist.sha256})`),
    table(["advisory", "component", "affected", "releases", "devices"],
      data.entries.map((e) => el("tr", {},
        el("td", {}, e.entry.id), el("td", {}, e.entry.component || e.entry.purl || ""), el("td", {}, e.entry.affected || ""),
        el("td", {}, [...new Set(e.releases.map((r) => r.version))].join(", ") || "none"),
        el("td", { class: e.devices.length ? "vulnerable" : "" }, e.devices.map((d) => d.device_id).join(", ") || "none")))));
}

function renderAudit(entries) {
  document.getElementById("audit").replaceChildren(table(["at", "who", "what", "detail"],
    entries.slice(0, 50).map((e) => el("tr", {},
      el("td", {}, e.at), el("td", {}, e.actor), el("td", {}, e.action),
      el("td", { class: "mono" }, JSON.stringify(e.detail).slice(0, 200))))));
}

async function refresh() {
  if (!token) return;
  try {
    const [rollouts, devices, affected, audit] = await Promise.all([
      api("GET", "/api/v1/rollouts"), api("GET", "/api/v1/devices"),
      api("GET", "/api/v1/sbom/affected"), api("GET", "/api/v1/audit?limit=50")]);
    renderRollouts(rollouts.rollouts);
    renderDevices(devices.devices);
    renderAffected(affected);
    renderAudit(audit.entries);
    document.getElementById("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
    if (!document.getElementById("error").textContent.startsWith("POST")) showError(null);
  } catch (e) {
    showError(e.message);
    if (e.status === 401) signOut();
  }
}

async function search(event) {
  event.preventDefault();
  const q = document.getElementById("sbom-query").value.trim();
  if (!q) return;
  const box = document.getElementById("sbom-results");
  try {
    const r = await api("GET", "/api/v1/sbom/search?q=" + encodeURIComponent(q));
    box.replaceChildren(el("p", {}, `${r.release_count} release(s), ${r.device_count} device(s), ${r.took_ms.toFixed(1)} ms`),
      table(["component", "version", "release", "class"], r.releases.map((h) => el("tr", {},
        el("td", {}, h.component), el("td", {}, h.component_version || ""), el("td", {}, h.version), el("td", {}, h.hardware_class)))),
      table(["device", "release", "quarantined"], r.devices.map((d) => el("tr", {},
        el("td", { class: "mono" }, d.device_id), el("td", {}, d.release), el("td", {}, d.quarantined ? "yes" : "no")))));
  } catch (e) {
    box.replaceChildren(el("p", { class: "failed" }, e.message));
  }
}

function signOut() {
  token = null;
  sessionStorage.removeItem("outpost-token");
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("who").textContent = "not signed in";
}

async function signIn(t) {
  token = t;
  try {
    const me = await api("GET", "/api/v1/whoami");
    role = me.role;
    if (role === "pipeline") throw new Error("pipeline tokens only publish; sign in with an operator or viewer token");
    sessionStorage.setItem("outpost-token", t);
    document.getElementById("who").textContent = `${me.name} (${me.role})`;
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    showError(null);
    await refresh();
  } catch (e) {
    showError(e.message);
    signOut();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn(document.getElementById("token-input").value.trim());
  });
  document.getElementById("sbom-form").addEventListener("submit", search);
  // A token in the URL fragment (never sent to the server) signs in once and is removed.
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", location.pathname);
  const saved = fromHash || sessionStorage.getItem("outpost-token");
  if (saved) signIn(saved); else signOut();
  setInterval(refresh, REFRESH_MS);
});
