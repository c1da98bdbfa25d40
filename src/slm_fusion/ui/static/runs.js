// Runs page: the ReasonLite runs under ui.runs_dir; two of them side by side (config, loss, eval, accuracy vs
// tokens, the tune study's Pareto front). Read once per choice: a run folder changes when a stage finishes.
"use strict";

const COLUMNS = [["accuracy", 3], ["total", 0], ["mean_tokens", 1], ["p95_tokens", 0], ["seconds_per_question", 2],
                 ["exec_error_rate", 3], ["forced_rate", 3]];

function chart(caption, series, opts) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "chart");
  drawChart(svg, series, opts);
  return el("figure", {}, el("figcaption", {}, caption), svg);
}

function section(title, body) { return [el("h3", {}, title), body || NOT_PRESENT()]; }

function renderRun(run) {
  const parts = [el("h2", {}, run.name)];
  if (run.problems.length) parts.push(el("ul", {class: "error"}, run.problems.map(p => el("li", {}, p))));
  parts.push(...section("Stages", run.stages && el("p", {}, Object.entries(run.stages).map(([s, v]) => `${s}: ${v}`).join(" · "))));
  parts.push(...section("Config", el("details", {}, el("summary", {}, "config.yaml"), el("pre", {}, run.config))));
  parts.push(...section("Training", run.train && el("p", {}, Object.entries(run.train).map(([k, v]) => `${k} ${fmt(v)}`).join(" · "))));
  parts.push(...section("Loss", run.loss && run.loss.length &&
    chart(`loss (${run.loss_source})`, [{name: "loss", points: run.loss.map(p => ({x: p.step, y: p.loss}))}],
          {xLabel: "step", yLabel: "loss", fromZero: false})));
  parts.push(...section("Eval", run.eval && el("table", {class: "data eval"},
    el("thead", {}, el("tr", {}, el("th", {}, "split"), el("th", {}, "model"), COLUMNS.map(([c]) => el("th", {}, c)))),
    el("tbody", {}, run.eval.map(r => el("tr", {}, el("td", {}, r.split), el("td", {}, r.target),
      COLUMNS.map(([c, d]) => el("td", {}, fmt(r[c], d)))))))));
  parts.push(...section("Accuracy vs tokens", run.accuracy_vs_tokens && chart("one point per budget",
    run.accuracy_vs_tokens.map(s => ({name: s.name, points: s.points.map(p => ({
      x: p.mean_tokens, y: p.accuracy, label: `budget ${p.budget === null ? "none" : p.budget}, n ${p.n}`}))
      .sort((a, b) => a.x - b.x)})), {xLabel: "mean tokens", yLabel: "accuracy"})));
  const tune = run.tune;
  parts.push(...section("Tune: Pareto front", tune && tune.trials.length && chart(
    `study ${tune.study}: ${tune.objectives[0]} (${tune.directions[0]}) vs ${tune.objectives[1] || ""}`,
    [{name: "trials", color: "#9ca3af", points: tune.trials.filter(t => !t.pareto).map(t => trialPoint(t))},
     {name: "Pareto front", color: "#dc2626", points: tune.trials.filter(t => t.pareto).map(t => trialPoint(t, true))
       .sort((a, b) => a.x - b.x)}],
    {xLabel: tune.objectives[1] || "trial", yLabel: tune.objectives[0]})));
  return parts;
}

function trialPoint(t, pareto) {
  return {x: t.values.length > 1 ? t.values[1] : t.number, y: t.values[0], highlight: pareto,
          label: `trial ${t.number} ${JSON.stringify(t.params)}`};
}

async function show(select, column) {
  const box = document.getElementById(column);
  if (!select.value) { box.replaceChildren(el("p", {class: "absent"}, "pick a run to compare")); return; }
  box.replaceChildren(el("p", {}, "loading…"));
  try {
    box.replaceChildren(...renderRun(await api("/ui/api/runs/" + encodeURIComponent(select.value))));
  } catch (e) {
    box.replaceChildren(el("p", {class: "error"}, e.message));
  }
}

async function loadRuns() {
  const data = await api("/ui/api/runs");
  document.getElementById("runs-dir").textContent = data.runs_dir ? `(${data.runs_dir})` : "(ui.runs_dir not set)";
  const a = document.getElementById("run-a"), b = document.getElementById("run-b");
  const options = () => data.runs.map(r => el("option", {value: r.name}, r.name));
  a.replaceChildren(...options());
  b.replaceChildren(el("option", {value: ""}, "—"), ...options());
  if (data.runs.length > 1) b.value = data.runs[1].name;
  if (!data.runs.length) {
    document.getElementById("col-a").replaceChildren(el("p", {class: "absent"}, "no run folder (with a config.yaml) found"));
    return;
  }
  a.addEventListener("change", () => show(a, "col-a"));
  b.addEventListener("change", () => show(b, "col-b"));
  await Promise.all([show(a, "col-a"), show(b, "col-b")]);
}

document.addEventListener("DOMContentLoaded", () => {
  if (!haveAccess()) { status("Enter the API key (top right) to see the runs."); return; }
  loadRuns().catch(e => status(e.message, true));
});
