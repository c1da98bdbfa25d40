// Models page: the deployments' state (every 2 s) and the per-model metric series (at the gateway's sample interval).
"use strict";

function replicaCell(m) {
  if (m.kind !== "model") return "–";
  return m.replicas.map(r => el("span", {class: r.healthy ? "ok" : "bad", title: `fails ${r.fails}`},
    `#${r.index} ${r.healthy ? "healthy" : "cooling " + fmt(r.cooldown_left_s, 1) + " s"} (${r.active} busy) `));
}

async function loadModels() {
  const data = await api("/ui/api/models");
  const rows = data.models.map(m => el("tr", {"data-model": m.name},
    el("td", {}, m.name), el("td", {}, m.kind),
    el("td", {}, m.kind === "model" ? m.backend : `${m.router_kind} (${m.router})`),
    el("td", {}, m.state || "–"), el("td", {}, replicaCell(m)),
    el("td", {}, m.kind === "model" ? m.in_flight : "–"),
    el("td", {}, m.kind === "model" ? `${m.queued} / ${m.max_queue}` : "–"),
    el("td", {}, (m.kind === "model" ? m.fallbacks : m.targets).join(", ") || "–")));
  document.querySelector("#models-table tbody").replaceChildren(...rows);
}

async function loadMetrics() {
  const data = await api("/ui/api/metrics");
  const names = Object.keys(data.models).sort();
  const line = (key, suffix, dashed) => names.map(name => ({
    name: name + (suffix || ""), dashed,
    points: data.models[name].map(p => ({x: p.t, y: p[key]}))}));
  drawChart(document.getElementById("chart-rps"), line("requests_per_s"), {time: true, yLabel: "req/s"});
  drawChart(document.getElementById("chart-latency"),
            [...line("p50_ms", " p50", true), ...line("p95_ms", " p95")], {time: true, yLabel: "ms"});
  drawChart(document.getElementById("chart-tps"), line("tokens_per_s"), {time: true, yLabel: "tok/s"});
  document.getElementById("metrics-note").textContent = `(a point every ${data.interval_s} s)`;
  return data.interval_s;
}

document.addEventListener("DOMContentLoaded", async () => {
  every(2, loadModels);
  if (!haveAccess()) return;
  const interval = await loadMetrics().catch(e => { status(e.message, true); return 2; });
  every(interval, loadMetrics);
});
