// Routing page: the gateway's recent route decisions (every 2 s) and the route-eval cost/quality curve.
"use strict";

async function loadRoutes() {
  const data = await api("/ui/api/routes");
  const rows = data.recent.map(d => el("tr", {},
    el("td", {}, new Date(d.t * 1000).toLocaleTimeString()), el("td", {}, d.asked), el("td", {}, d.router),
    el("td", {}, fmt(d.score)), el("td", {}, d.model),
    el("td", {class: d.path.length > 1 ? "bad" : ""}, d.path.join(" → ") || "–"), el("td", {}, d.reason)));
  document.querySelector("#routes-table tbody").replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", {colspan: 7}, "no routed request yet"))]));
  renderRouteEval(data.route_eval, data.route_eval_dir);
}

let shownEval = null;

function renderRouteEval(report, folder) {
  const key = JSON.stringify(report);
  if (key === shownEval) return;  // unchanged: keep the chart (and a hovered tooltip) as it is
  shownEval = key;
  const box = document.getElementById("route-eval");
  document.getElementById("route-eval-source").textContent = folder ? `(${folder})` : "(ui.route_eval_dir not set)";
  if (!report) { box.replaceChildren(NOT_PRESENT()); return; }
  if (report.error) { box.replaceChildren(el("p", {class: "error"}, report.error)); return; }
  const parts = [];
  for (const c of report.cascades) {
    const svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("class", "chart");
    const curve = c.curve.map(p => ({x: p.escalated, y: p.accuracy, label: `threshold ${p.threshold}`,
                                     highlight: typeof p.threshold === "string"}));
    parts.push(el("figure", {}, el("figcaption", {}, `cascade ${c.name}: ${c.small} → ${c.big} (${c.n} prompts)`), svg));
    drawChart(svg, [{name: c.name, points: curve.sort((a, b) => a.x - b.x)}],
              {xLabel: "fraction sent to the big model (cost)", yLabel: "accuracy"});
  }
  if (report.routers.length) {
    parts.push(el("table", {class: "data"},
      el("thead", {}, el("tr", {}, ["virtual model", "router", "accuracy", "prompts", "p50 ms", "p99 ms"].map(h => el("th", {}, h)))),
      el("tbody", {}, report.routers.map(r => el("tr", {}, el("td", {}, r.virtual_model), el("td", {}, `${r.kind}:${r.router}`),
        el("td", {}, fmt(r.accuracy)), el("td", {}, r.n), el("td", {}, fmt((r.latency_ms || {}).p50, 2)),
        el("td", {}, fmt((r.latency_ms || {}).p99, 2)))))));
  }
  box.replaceChildren(...(parts.length ? parts : [NOT_PRESENT()]));
}

document.addEventListener("DOMContentLoaded", () => every(2, loadRoutes));
