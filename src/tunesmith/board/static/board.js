// tunesmith board: the page. Hash routes: #/ runs, #/run/NAME, #/compare?run=A&run=B&metric=M, #/launch, #/chat.
// Data comes from the board's JSON API, or, in a report.html opened from disk, from window.TUNESMITH_REPORT
// (the same run page, with the data written into the file).
(() => {
"use strict";

const {drawChart, formatNumber, formatSeconds} = window.tunesmithCharts;
const REPORT = window.TUNESMITH_REPORT || null;
const state = {timer: null, view: null, smoothing: 0, x: "step", selected: new Set(), sort: ["started", -1]};

async function api(path, options) {
  if (REPORT) return REPORT.api[path.split("&since")[0]];
  const response = await fetch(path, options);
  if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
  return response.json();
}

function el(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "onclick" || key === "oninput" || key === "onchange") element[key] = value;
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (value !== undefined && value !== null && value !== false) element.setAttribute(key, value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) element.append(child);
  return element;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

function runLink(name) {
  return "#/run/" + encodeURIComponent(name);
}

function statusBadge(run) {
  return el("span", {class: `status status-${run.status}`, title: run.error || ""}, run.status);
}

// Run `work` now and every `milliseconds` (once in a report); a failure is shown on the page and retried,
// since a run launched a moment ago may not have written its folder yet.
function every(milliseconds, work) {
  clearInterval(state.timer);
  const guarded = async () => {
    const notice = document.getElementById("notice");
    try {
      await work();
      notice.hidden = true;
    } catch (error) {
      notice.textContent = String(error.message).startsWith("404") ? "waiting for the run's folder to appear…" : String(error);
      notice.hidden = false;
    }
  };
  guarded();
  state.timer = REPORT ? null : setInterval(guarded, milliseconds);
}

// ---- runs list -------------------------------------------------------------------------------------
const COLUMNS = [["name", "run"], ["stage", "stage"], ["model", "model"], ["dataset", "dataset"],
                 ["status", "status"], ["step", "steps"], ["loss", "loss"], ["score", "score"],
                 ["tokens_per_second", "tokens/s"], ["started", "started"]];

function showRuns(main) {
  const filter = el("input", {id: "run-filter", placeholder: "filter: name, stage, model, dataset"});
  const statusFilter = el("select", {id: "status-filter"}, ["all", "running", "finished", "failed", "stopped", "unknown"]
    .map((s) => el("option", {value: s}, s)));
  const compare = el("button", {id: "compare-selected", onclick: () => {
    location.hash = "#/compare?" + new URLSearchParams([...state.selected].map((name) => ["run", name]));
  }}, "Compare selected");
  const table = el("table", {id: "runs", class: "runs"});
  main.append(el("div", {class: "toolbar"}, filter, statusFilter, compare), table);
  let runs = [];
  const render = () => {
    const text = filter.value.toLowerCase(), wanted = statusFilter.value;
    const [key, direction] = state.sort;
    const shown = runs.filter((r) => (wanted === "all" || r.status === wanted) &&
      [r.name, r.stage, r.model, r.dataset].join(" ").toLowerCase().includes(text))
      .sort((a, b) => direction * ((a[key] ?? -Infinity) > (b[key] ?? -Infinity) ? 1 : (a[key] ?? -Infinity) < (b[key] ?? -Infinity) ? -1 : 0));
    const head = el("tr", {}, el("th", {}, ""), COLUMNS.map(([k, label]) => el("th", {class: "sortable", dataset: {key: k},
      onclick: () => { state.sort = [k, state.sort[0] === k ? -state.sort[1] : 1]; render(); }},
      label + (key === k ? (direction > 0 ? " ▲" : " ▼") : ""))));
    const rows = shown.map((r) => el("tr", {class: "run-row", dataset: {run: r.name}},
      el("td", {}, el("input", {type: "checkbox", class: "pick", checked: state.selected.has(r.name), onchange: (e) => {
        e.target.checked ? state.selected.add(r.name) : state.selected.delete(r.name);
      }})),
      el("td", {class: "run-name"}, el("a", {href: runLink(r.name)}, r.name)),
      el("td", {}, r.stage), el("td", {class: "model"}, r.model || "–"), el("td", {}, r.dataset || "–"),
      el("td", {}, statusBadge(r)),
      el("td", {class: "steps"}, `${r.step ?? 0} / ${r.total_steps ?? "?"}`),
      el("td", {}, formatNumber(r.loss)), el("td", {}, formatNumber(r.score)),
      el("td", {}, formatNumber(r.tokens_per_second)), el("td", {}, when(r.started))));
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
    if (!shown.length) table.append(el("tbody", {}, el("tr", {}, el("td", {colspan: 11, class: "empty"},
      runs.length ? "no run matches" : "no runs under this root yet"))));
  };
  filter.oninput = render;
  statusFilter.onchange = render;
  every(2000, async () => { runs = (await api("/api/runs")).runs; render(); });
}

// ---- one run ---------------------------------------------------------------------------------------
function chartControls(redraw) {
  const smoothing = el("input", {type: "range", id: "smoothing", min: 0, max: 0.99, step: 0.01, value: state.smoothing});
  const label = el("span", {id: "smoothing-value"}, String(state.smoothing));
  smoothing.oninput = () => { state.smoothing = +smoothing.value; label.textContent = smoothing.value; redraw(); };
  const axis = el("select", {id: "x-axis"}, el("option", {value: "step"}, "x: step"), el("option", {value: "time"}, "x: time"));
  axis.value = state.x;
  axis.onchange = () => { state.x = axis.value; redraw(); };
  return el("div", {class: "toolbar"}, el("label", {}, "smoothing ", smoothing, label), axis);
}

function drawRunCharts(grid, payload) {
  grid.replaceChildren();
  for (const [chart, names] of Object.entries(payload.charts)) {
    const box = el("div", {class: "chart-box", dataset: {chart}});
    grid.append(el("div", {class: "card"}, el("h3", {}, chart), box));
    drawChart(box, names.map((name, i) => ({label: name, points: payload.series[name].points,
      count: payload.series[name].count, dashed: i > 0})), {x: state.x, smoothing: state.smoothing, title: chart});
  }
}

async function showRun(main, name) {
  const query = "?name=" + encodeURIComponent(name);
  const header = el("div", {class: "run-header"});
  const grid = el("div", {class: "charts", id: "charts"});
  const details = el("div", {class: "details"});
  const inside = el("div", {id: "inside"});
  let payload = null;
  main.append(header, chartControls(() => payload && drawRunCharts(grid, payload)), grid, inside, details);
  const refresh = async () => {
    const run = await api("/api/run" + query);
    renderRunHeader(header, run);
    renderDetails(details, run);
    const fresh = await api(`/api/metrics${query}&since=${payload ? payload.version : -1}`);
    if (!fresh.unchanged) { payload = fresh; drawRunCharts(grid, payload); }
    if (window.tunesmithInside) await window.tunesmithInside.refresh(inside, run, query);
  };
  every(1000, refresh);
}

function renderRunHeader(header, run) {
  const actions = [];
  if (window.tunesmithLaunch) actions.push(...window.tunesmithLaunch.runActions(run));
  header.replaceChildren(el("h2", {}, run.name, " ", statusBadge(run)),
    el("div", {class: "facts"}, `${run.stage} · ${run.model || "?"} · ${run.dataset || "?"} · step `,
      el("span", {id: "run-steps"}, `${run.step ?? 0} / ${run.total_steps ?? "?"}`),
      ` · started ${when(run.started)}`, run.error ? el("div", {class: "error"}, run.error) : null), ...actions);
}

function renderDetails(details, run) {
  const results = run.results ? el("table", {class: "kv", id: "final-metrics"}, Object.entries(run.results)
    .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, typeof v === "number" ? formatNumber(v) : String(v))))) :
    el("p", {class: "empty"}, "not finished yet");
  const checkpoints = run.checkpoints.length ? el("table", {class: "kv", id: "checkpoints"}, run.checkpoints.map((c) =>
    el("tr", {}, el("th", {}, c.name), el("td", {}, `${(c.bytes / 1e6).toFixed(1)} MB · ${when(c.written)}`)))) :
    el("p", {class: "empty"}, "no checkpoints");
  details.replaceChildren(
    el("div", {class: "card"}, el("h3", {}, "final metrics"), results),
    el("div", {class: "card"}, el("h3", {}, "checkpoints"), checkpoints),
    el("div", {class: "card wide"}, el("h3", {}, "config"), el("pre", {id: "config"}, run.config || "(none)")),
    el("div", {class: "card wide"}, el("h3", {}, "console"), el("pre", {id: "console"}, run.console || "(nothing yet)")));
}

// ---- compare ---------------------------------------------------------------------------------------
async function showCompare(main, params) {
  const names = params.getAll("run");  // one parameter per run: names may hold commas or percent signs
  const picker = el("select", {id: "compare-metric"});
  const box = el("div", {class: "chart-box", id: "compare-chart"});
  main.append(el("h2", {}, "compare ", names.length, " runs"), chartControls(() => draw()),
    el("div", {class: "toolbar"}, el("label", {}, "metric ", picker)), el("div", {class: "card wide"}, box));
  let payloads = [];
  const draw = () => drawChart(box, payloads.map(([name, p]) => ({label: name,
    points: p.series[picker.value]?.points || [], count: p.series[picker.value]?.count || 0})),
    {x: state.x, smoothing: state.smoothing, title: picker.value});
  picker.onchange = () => { params.set("metric", picker.value); history.replaceState(null, "", "#/compare?" + params); draw(); };
  every(2000, async () => {
    payloads = await Promise.all(names.map(async (n) => [n, await api("/api/metrics?name=" + encodeURIComponent(n))]));
    const metrics = [...new Set(payloads.flatMap(([, p]) => Object.keys(p.series)))].sort();
    const current = picker.value || params.get("metric") || (metrics.includes("loss") ? "loss" : metrics[0]);
    picker.replaceChildren(...metrics.map((m) => el("option", {value: m}, m)));
    picker.value = current;
    draw();
  });
}

// ---- router ----------------------------------------------------------------------------------------
async function route() {
  clearInterval(state.timer);
  const main = document.getElementById("main");
  main.replaceChildren(el("div", {id: "notice", class: "message", hidden: true}));
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  try {
    if (REPORT) await showRun(main, REPORT.name);
    else if (path.startsWith("/run/")) await showRun(main, decodeURIComponent(path.slice(5)));
    else if (path === "/compare") await showCompare(main, params);
    else if (path === "/launch" && window.tunesmithLaunch) await window.tunesmithLaunch.showLaunch(main, params);
    else if (path === "/chat" && window.tunesmithChat) await window.tunesmithChat.showChat(main, params);
    else showRuns(main);
  } catch (error) {
    main.append(el("p", {class: "error"}, String(error)));
  }
}

window.tunesmithBoard = {api, el, every, state, runLink, statusBadge};
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
})();
