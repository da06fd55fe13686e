// tunesmith board: line charts as plain SVG (no library, no network).
// drawChart(element, series, options) draws every series of one metric chart:
//   series:  [{label, points: [[step, seconds, value], ...], count, color, dashed}]
//   options: {x: "step" | "time", smoothing: 0..0.999, title}
// Smoothing is TensorBoard's debiased exponential moving average; the raw line stays, faint.
(() => {
"use strict";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const SVG_NS = "http://www.w3.org/2000/svg";

function svgElement(tag, attributes) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes || {})) element.setAttribute(key, value);
  return element;
}

function smooth(values, weight) {
  if (!(weight > 0)) return values;
  let last = 0, debias = 0;
  return values.map((v) => {
    last = last * weight + (1 - weight) * v;
    debias = debias * weight + (1 - weight);
    return last / debias;
  });
}

function niceTicks(low, high, count) {
  // a range of a few float steps (0.3 and 0.30000000000000004) would give a step that cannot move t
  const floor = Math.max(Math.abs(low), Math.abs(high), 1e-12) * 1e-9;
  if (!(high - low > floor)) { high = high + floor * 1e3 + 1e-12; low = low - floor * 1e3 - 1e-12; }
  const raw = (high - low) / count;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const first = Math.ceil(low / step), ticks = [];
  for (let i = 0; i <= count * 3 && (first + i) * step <= high + step * 1e-9; i++) ticks.push(+((first + i) * step).toPrecision(12));
  return ticks;
}

function formatNumber(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude >= 1e5 || magnitude < 1e-3)) return value.toExponential(3);
  return String(+value.toPrecision(5));
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h${String(m).padStart(2, "0")}` : m ? `${m}m${String(s % 60).padStart(2, "0")}` : `${s}s`;
}

function drawChart(element, series, options) {
  const width = Math.max(element.clientWidth || 460, 260), height = 240;
  const margin = {left: 58, right: 14, top: 10, bottom: 28};
  const xIndex = options.x === "time" ? 1 : 0;
  const usable = series.map((s) => ({...s, points: s.points.filter((p) => p[xIndex] !== null && p[2] !== null)}));
  const all = usable.flatMap((s) => s.points);
  element.replaceChildren();
  element.dataset.metric = options.title || "";
  const legend = document.createElement("div");
  legend.className = "legend";
  usable.forEach((s, i) => {
    const item = document.createElement("span");
    item.className = "legend-item";
    item.dataset.series = s.label;
    item.dataset.count = String(s.count ?? s.points.length);
    item.style.setProperty("--swatch", s.color || PALETTE[i % PALETTE.length]);
    item.textContent = `${s.label} · ${s.count ?? s.points.length} points`;
    legend.append(item);
  });
  element.append(legend);
  if (!all.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "no points yet";
    element.append(empty);
    return;
  }
  const xs = all.map((p) => p[xIndex]), ys = all.map((p) => p[2]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => margin.left + (x - x0) / (x1 - x0) * (width - margin.left - margin.right);
  const sy = (y) => height - margin.bottom - (y - y0) / (y1 - y0) * (height - margin.top - margin.bottom);
  const svg = svgElement("svg", {width, height, viewBox: `0 0 ${width} ${height}`, class: "chart"});
  for (const t of niceTicks(y0, y1, 5)) {
    svg.append(svgElement("line", {x1: margin.left, x2: width - margin.right, y1: sy(t), y2: sy(t), class: "grid"}));
    const label = svgElement("text", {x: margin.left - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end"});
    label.textContent = formatNumber(t);
    svg.append(label);
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => xIndex || Number.isInteger(t))) {  // steps are whole
    const label = svgElement("text", {x: sx(t), y: height - 8, class: "tick", "text-anchor": "middle"});
    label.textContent = xIndex ? formatSeconds(t) : formatNumber(t);
    svg.append(label);
  }
  usable.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const values = s.points.map((p) => p[2]);
    const line = (vs) => s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[xIndex]).toFixed(1)},${sy(vs[j]).toFixed(1)}`).join("");
    const smoothed = smooth(values, options.smoothing);
    if (smoothed !== values) svg.append(svgElement("path", {d: line(values), stroke: color, class: "raw"}));
    svg.append(svgElement("path", {d: line(smoothed), stroke: color, class: "line" + (s.dashed ? " dashed" : ""),
                                   "data-series": s.label, "data-count": String(s.points.length)}));
    if (s.points.length < 60) {
      s.points.forEach((p, j) => svg.append(svgElement("circle", {cx: sx(p[xIndex]), cy: sy(smoothed[j]), r: 2.2,
                                                                  fill: color, class: "dot"})));
    }
  });
  attachHover(svg, element, usable, {sx, xIndex, margin, width, height});
  element.append(svg);
}

function attachHover(svg, element, series, geometry) {
  const cursor = svgElement("line", {y1: geometry.margin.top, y2: geometry.height - geometry.margin.bottom,
                                     class: "cursor", visibility: "hidden"});
  svg.append(cursor);
  const tip = document.createElement("div");
  tip.className = "chart-tip";
  tip.hidden = true;
  element.append(tip);
  svg.addEventListener("mousemove", (event) => {
    const box = svg.getBoundingClientRect();
    const mouse = event.clientX - box.left;
    let best = null;
    for (const s of series) {
      for (const p of s.points) {
        const distance = Math.abs(geometry.sx(p[geometry.xIndex]) - mouse);
        if (!best || distance < best.distance) best = {distance, x: p[geometry.xIndex]};
      }
    }
    if (!best) return;
    cursor.setAttribute("x1", geometry.sx(best.x));
    cursor.setAttribute("x2", geometry.sx(best.x));
    cursor.setAttribute("visibility", "visible");
    const rows = series.map((s) => {
      const hit = s.points.find((p) => p[geometry.xIndex] === best.x);
      return hit ? `${s.label}: ${hit[2]}` : null;  // the logged number itself, not rounded
    }).filter(Boolean);
    const xLabel = geometry.xIndex ? formatSeconds(best.x) : `step ${best.x}`;
    tip.textContent = [xLabel, ...rows].join("\n");
    tip.hidden = false;
    tip.style.left = `${Math.min(geometry.sx(best.x) + 12, geometry.width - 150)}px`;
  });
  svg.addEventListener("mouseleave", () => { tip.hidden = true; cursor.setAttribute("visibility", "hidden"); });
}

window.tunesmithCharts = {drawChart, formatNumber, formatSeconds, smooth, PALETTE};
})();
