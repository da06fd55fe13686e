// tunesmith board: inside RL and preference runs. Answers as text coloured token by token by a chosen
// quantity (advantage, KL, log-probs, value; a pair's log-ratio), the numbers on hover, stepping through
// training. Reads /api/rollouts (ppo, grpo) and /api/pairs (dpo, kto): an index of logged steps, then one step.
(() => {
"use strict";

const ROLLOUT_FIELDS = ["advantages", "kl", "logprobs", "ref_logprobs", "values", "sampler_logprobs", "is_weights"];
const PAIR_FIELDS = ["logratio", "logps", "ref_logps"];
const view = {name: null, kind: null, index: null, step: null, field: null, prompt: null, samePrompt: false, pair: 0};

function colour(value, scale) {
  if (value === null || value === undefined || !(scale > 0)) return "transparent";
  const t = Math.max(-1, Math.min(1, value / scale));
  const [r, g, b] = t >= 0 ? [220, 38, 38] : [37, 99, 235];
  return `rgba(${r}, ${g}, ${b}, ${(Math.abs(t) * 0.75).toFixed(3)})`;
}

function tokenTip() {
  let tip = document.getElementById("token-tip");
  if (!tip) {
    tip = Object.assign(document.createElement("div"), {id: "token-tip", className: "token-tip", hidden: true});
    document.body.append(tip);
  }
  return tip;
}

// One answer as coloured spans: values[field][t] colours token t; hovering shows every quantity at t.
function tokenLine(tokens, values, field, scale) {
  const {el} = window.tunesmithBoard;
  const line = el("div", {class: "tokens"});
  tokens.forEach((text, t) => {
    const numbers = Object.fromEntries(Object.entries(values).filter(([, v]) => v).map(([k, v]) => [k, v[t]]));
    const span = el("span", {class: "token", dataset: {index: String(t), value: String(numbers[field] ?? "")}}, text);
    span.style.background = colour(numbers[field], scale);
    span.onmouseenter = (event) => {
      const tip = tokenTip();
      tip.textContent = [`token ${t}: ${JSON.stringify(text)}`,
        ...Object.entries(numbers).map(([k, v]) => `${k}: ${v === null || v === undefined ? "–" : v}`)].join("\n");
      tip.style.left = `${event.clientX + 12}px`;
      tip.style.top = `${event.clientY + 14}px`;
      tip.hidden = false;
    };
    span.onmouseleave = () => { tokenTip().hidden = true; };
    line.append(span);
  });
  return line;
}

function scaleOf(lists) {
  const values = lists.flat().filter((v) => typeof v === "number");
  return values.length ? Math.max(...values.map(Math.abs)) : 0;
}

function stepControls(refresh) {
  const {el} = window.tunesmithBoard;
  const steps = view.index.steps;
  const picker = el("select", {id: "sample-step"}, steps.map((s) => el("option", {value: s}, `step ${s}`)));
  picker.value = view.step;
  picker.onchange = () => { view.step = +picker.value; refresh(); };
  const move = (direction) => () => {
    let i = steps.indexOf(view.step) + direction;
    while (view.samePrompt && i >= 0 && i < steps.length && !(view.index.prompts[steps[i]] || []).includes(view.prompt)) i += direction;
    if (i >= 0 && i < steps.length) { view.step = steps[i]; refresh(); }
  };
  const same = el("input", {type: "checkbox", id: "same-prompt", checked: view.samePrompt,
                            onchange: (e) => { view.samePrompt = e.target.checked; }});
  return [el("button", {id: "step-back", onclick: move(-1)}, "◀"), picker, el("button", {id: "step-next", onclick: move(1)}, "▶"),
          el("label", {}, same, " same prompt")];
}

function fieldPicker(fields, refresh) {
  const {el} = window.tunesmithBoard;
  const picker = el("select", {id: "colour-by"}, fields.map((f) => el("option", {value: f}, f)));
  picker.value = view.field;
  picker.onchange = () => { view.field = picker.value; refresh(); };
  return el("label", {}, "colour by ", picker, el("span", {class: "scale"}), el("span", {id: "colour-scale"}, ""));
}

function renderRollouts(box, records, refresh) {
  const {el} = window.tunesmithBoard;
  records = records.filter((r) => Array.isArray(r.tokens));
  const fields = ROLLOUT_FIELDS.filter((f) => records.some((r) => Array.isArray(r[f])));
  if (!fields.includes(view.field)) view.field = fields[0];
  const scale = scaleOf(records.map((r) => r[view.field] || []));
  const cards = records.map((r) => {
    if (view.prompt === null) view.prompt = r.prompt;
    const values = Object.fromEntries(fields.map((f) => [f, r[f]]));
    const facts = `reward ${r.reward ?? "–"}` + (r.score !== undefined ? ` · score ${r.score}` : "") +
      (r.rewards ? " · " + Object.entries(r.rewards).map(([k, v]) => `${k} ${v}`).join(" · ") : "") + (r.truncated ? " · truncated" : "");
    return el("div", {class: "card rollout", dataset: {sample: String(r.sample), group: String(r.group)}},
      el("h3", {}, `sample ${r.sample} (prompt ${r.group}) · ${facts}`),
      el("div", {class: "prompt", onclick: () => { view.prompt = r.prompt; }}, r.prompt),
      tokenLine(r.tokens, values, view.field, scale));
  });
  box.replaceChildren(el("div", {class: "toolbar"}, ...stepControls(refresh), fieldPicker(fields, refresh)), ...cards);
  box.querySelector("#colour-scale").textContent = `±${scale.toPrecision(3)}`;
}

function renderPairs(box, records, refresh) {
  const {el} = window.tunesmithBoard;
  const {drawChart} = window.tunesmithCharts;
  const sides = ["chosen", "rejected"].filter((s) => records.some((r) => r[`${s}_tokens`]));
  const fields = PAIR_FIELDS.filter((f) => records.some((r) => sides.some((s) => Array.isArray(r[`${s}_${f}`]))));
  if (!fields.includes(view.field)) view.field = fields[0];
  const pairs = [...new Set(records.map((r) => r.pair))];
  const pairPicker = el("select", {id: "pair-picker"}, pairs.map((p) => el("option", {value: p}, `pair ${p}`)));
  pairPicker.value = view.pair;
  pairPicker.onchange = () => { view.pair = +pairPicker.value; refresh(); };
  const record = records.find((r) => r.pair === view.pair) || records[0];
  if (!record) { box.replaceChildren(el("p", {class: "empty"}, `nothing logged at step ${view.step}`)); return; }
  const chart = el("div", {class: "chart-box", id: "pair-rewards"});
  const scale = scaleOf(sides.map((s) => record[`${s}_${view.field}`] || []));
  const answers = sides.map((s) => el("div", {class: "card", dataset: {side: s}},
    el("h3", {}, `${s}${record.desirable !== undefined ? (record.desirable ? " (desirable)" : " (undesirable)") : ""} · implicit reward ${record[`${s}_reward`] ?? "–"}`),
    tokenLine(record[`${s}_tokens`] || [], Object.fromEntries(fields.map((f) => [f, record[`${s}_${f}`]])), view.field, scale)));
  box.replaceChildren(el("div", {class: "toolbar"}, pairPicker, ...stepControls(refresh), fieldPicker(fields, refresh)),
    el("div", {class: "prompt"}, record.prompt), el("div", {class: "card"}, el("h3", {}, "implicit rewards over steps"), chart), ...answers);
  box.querySelector("#colour-scale").textContent = `±${scale.toPrecision(3)}`;
  const series = view.index.series || {};
  drawChart(chart, sides.map((s) => ({label: `${s} reward`, points: series[`${view.pair}/${s}`] || []})),
    {x: "step", smoothing: 0, title: `pair ${view.pair}`});
}

async function refresh(box, run, query) {
  const {api, el} = window.tunesmithBoard;
  const kind = ["dpo", "kto"].includes(run.stage) ? "pairs" : ["ppo", "grpo"].includes(run.stage) ? "rollouts" : null;
  if (!kind) return;
  const index = await api(`/api/${kind}${query}`);
  if (!index || !index.steps.length) {
    box.replaceChildren(el("p", {class: "empty"}, `no ${kind} logged yet (log_rollouts_steps)`));
    return;
  }
  const fresh = view.name !== run.name || !view.index || view.index.version !== index.version ||
    !box.querySelector("#samples");  // a page opened again starts with an empty box
  if (view.name !== run.name) Object.assign(view, {name: run.name, step: index.steps[index.steps.length - 1], prompt: null, pair: 0});
  if (!fresh) return;
  view.index = index;
  view.kind = kind;
  const draw = async () => {
    const payload = await api(`/api/${kind}${query}&step=${view.step}`);
    const target = box.querySelector("#samples") || box.appendChild(el("div", {id: "samples"}));
    (kind === "pairs" ? renderPairs : renderRollouts)(target, payload.records, draw);
  };
  if (!box.querySelector("h2")) box.replaceChildren(el("h2", {}, kind === "pairs" ? "inside: fixed pairs" : "inside: rollouts"));
  await draw();
}

window.tunesmithInside = {refresh, colour};
})();
