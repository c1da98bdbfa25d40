// Line and scatter charts as hand-written SVG, with hover titles and a legend.
// Why not a library: four small charts need axes, lines and points; a vendored chart library would be a large
// minified file with its own licence and updates to track, and SVG draws these with no dependency and no build.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// series: [{name, points: [{x, y, label?, highlight?}], dashed?, color?}]; opts: {xLabel, yLabel (hover text; the
// figure's caption names the axis), time (x is unix seconds), fromZero (default true), lines, width, height}
function drawChart(svg, series, opts) {
  opts = Object.assign({width: 420, height: 220, lines: true}, opts || {});
  const W = opts.width, H = opts.height, L = 48, R = 10, T = 10, B = 34;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const points = series.flatMap(s => s.points.filter(p => p.y !== null && p.y !== undefined));
  svg.dataset.points = String(points.length);
  svg.dataset.sum = String(points.reduce((a, p) => a + p.y, 0));
  if (!points.length) {
    svg.append(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, "no data yet"));
    return;
  }
  let [x0, x1] = [Math.min(...points.map(p => p.x)), Math.max(...points.map(p => p.x))];
  let [y0, y1] = [Math.min(opts.fromZero === false ? Infinity : 0, ...points.map(p => p.y)), Math.max(...points.map(p => p.y))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y1 = y0 + 1; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  const yDigits = Math.min(6, Math.max(0, Math.ceil(-Math.log10(y1 - y0)) + 1));  // enough to tell the ticks apart
  const tick = v => opts.time ? new Date(v * 1000).toLocaleTimeString() : fmt(v, Math.abs(v) < 10 ? 2 : 0);
  svg.append(svgEl("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}),
             svgEl("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  for (const f of [0, 0.5, 1]) {
    const xv = x0 + f * (x1 - x0), yv = y0 + f * (y1 - y0);
    svg.append(svgEl("text", {x: sx(xv), y: H - B + 14, "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle",
                              class: "tick"}, tick(xv)),
               svgEl("text", {x: L - 4, y: sy(yv) + 4, "text-anchor": "end", class: "tick"}, fmt(yv, yDigits)));
  }
  if (opts.xLabel) svg.append(svgEl("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "label"}, opts.xLabel));
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const pts = s.points.filter(p => p.y !== null && p.y !== undefined);
    if (opts.lines && pts.length > 1) {
      svg.append(svgEl("polyline", {points: pts.map(p => `${sx(p.x)},${sy(p.y)}`).join(" "), fill: "none",
                                    stroke: color, "stroke-width": 2, "stroke-dasharray": s.dashed ? "5 3" : "none",
                                    "data-series": s.name}));
    }
    for (const p of pts) {
      const dot = svgEl("circle", {cx: sx(p.x), cy: sy(p.y), r: p.highlight ? 5 : 3, fill: color,
                                   class: p.highlight ? "highlight" : ""});
      dot.append(svgEl("title", {}, `${s.name}: ${p.label ? p.label + " · " : ""}${opts.xLabel || "x"} ${tick(p.x)}, ` +
                                    `${opts.yLabel || "y"} ${fmt(p.y)}`));
      svg.append(dot);
    }
    svg.append(svgEl("text", {x: L + 6 + 110 * (i % 3), y: T + 12 * (1 + Math.floor(i / 3)), fill: color, class: "legend"},
                     s.name));
  });
}
