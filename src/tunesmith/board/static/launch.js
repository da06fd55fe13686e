// tunesmith board: launch a run from a form generated from the config schema, stop it, chat with a finished run.
(() => {
"use strict";

const board = () => window.tunesmithBoard;
const OPEN_SECTIONS = new Set(["task", "model", "adapter", "data", "train", "output"]);

function yamlValue(text) {
  return text.trim();
}

function composeYaml(form) {
  const lines = [];
  for (const input of form.querySelectorAll("input[data-key]")) {
    if (input.value.trim() !== "") lines.push(`${input.dataset.key}: ${yamlValue(input.value)}`);
  }
  const extra = form.querySelector("#extra-keys").value.trim();
  return lines.join("\n") + (extra ? "\n" + extra : "") + "\n";
}

async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"content-type": "application/json"},
                                      body: JSON.stringify(body)});
  const payload = await response.json().catch(() => ({error: `${response.status}`}));
  if (!response.ok) throw new Error(payload.error || payload.detail || String(response.status));
  return payload;
}

function keyField(entry) {
  const {el} = board();
  const input = el("input", {id: `key-${entry.key}`, "data-key": entry.key,
                             placeholder: entry.default === null ? "unset" : String(entry.default)});
  return el("div", {class: "field"}, el("label", {for: `key-${entry.key}`}, el("code", {}, entry.key)), input,
    el("span", {class: "help"}, `${entry.type}. ${entry.doc}`));
}

async function showLaunch(main, params) {
  const {el, api} = board();
  const [schema, runs, examples] = await Promise.all([api("/api/schema"), api("/api/runs"), api("/api/examples")]);
  const message = el("div", {id: "launch-message", class: "message", hidden: true});
  const preview = el("pre", {id: "launch-yaml"});
  const form = el("form", {class: "launch", id: "launch-form"});
  const source = el("select", {id: "launch-from"}, el("option", {value: ""}, "an empty config"),
    Object.keys(examples.examples).map((e) => el("option", {value: "example:" + e}, `example ${e}`)),
    runs.runs.map((r) => el("option", {value: r.name}, `the config of ${r.name}`)));
  for (const section of schema.sections) {
    const details = el("details", {open: OPEN_SECTIONS.has(section.name)},
      el("summary", {}, `${section.name}${section.note ? " (" + section.note + ")" : ""}`),
      el("p", {class: "help"}, section.doc), section.keys.map(keyField));
    form.append(el("fieldset", {}, details));
  }
  form.append(el("fieldset", {}, el("legend", {}, "other keys (YAML, one `key: value` per line)"),
    el("textarea", {id: "extra-keys", placeholder: "learning_rate: 1.0e-4"})));
  const show = (text, good) => {
    message.hidden = false;
    message.className = "message " + (good ? "good" : "bad");
    message.textContent = text;
  };
  const check = el("button", {type: "button", id: "check-config", onclick: async () => {
    try { show(`valid: the run will write to ${(await post("/api/check", {config: composeYaml(form)})).output_dir}`, true); }
    catch (error) { show(error.message, false); }
  }}, "Check");
  const start = el("button", {type: "button", id: "start-run", class: "primary", onclick: async () => {
    try { location.hash = board().runLink((await post("/api/launch", {config: composeYaml(form)})).run); }
    catch (error) { show(error.message, false); }
  }}, "Start");
  form.oninput = () => { preview.textContent = composeYaml(form); };
  source.onchange = async () => {
    const example = source.value.startsWith("example:") ? source.value.slice(8) : null;
    if (example) fill(form, examples.examples[example], example.replace(/\.yaml$/, ""));
    else if (source.value) fill(form, (await api("/api/run?name=" + encodeURIComponent(source.value))).config_values, source.value + "-again");
    preview.textContent = composeYaml(form);
  };
  main.append(el("h2", {}, "launch a run"), el("div", {class: "toolbar"}, el("label", {}, "start from ", source), check, start),
    message, form, el("div", {class: "card"}, el("h3", {}, "the YAML that will run"), preview));
  if (params.get("from")) { source.value = params.get("from"); await source.onchange(); }
}

// The form's fields set to `values` (a key at its default stays empty), extra keys in "other keys", and
// output_dir a fresh folder under the root.
function fill(form, values, outputDir) {
  for (const input of form.querySelectorAll("input[data-key]")) {
    const value = values[input.dataset.key];
    const shown = Array.isArray(value) ? value.join(",") : value === null || value === undefined ? "" :
      typeof value === "object" ? JSON.stringify(value) : String(value);
    input.value = shown === input.placeholder ? "" : shown;
  }
  const known = new Set([...form.querySelectorAll("input[data-key]")].map((input) => input.dataset.key));
  form.querySelector("#extra-keys").value = Object.entries(values).filter(([k]) => !known.has(k))
    .map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join("\n");
  form.querySelector("#key-output_dir").value = outputDir;
}

function runActions(run) {
  const {el} = board();
  const actions = [];
  if (run.status === "running") {
    actions.push(el("button", {id: "stop-run", onclick: async (event) => {
      try { await post("/api/stop?name=" + encodeURIComponent(run.name), {}); event.target.textContent = "stopping…"; }
      catch (error) { event.target.replaceWith(el("span", {class: "error"}, error.message)); }
    }}, "Stop"));
  }
  if (run.status === "finished") actions.push(el("a", {href: "#/chat?run=" + encodeURIComponent(run.name), class: "action"}, "Chat"));
  actions.push(el("a", {href: "#/launch?from=" + encodeURIComponent(run.name), class: "action"}, "Launch from this config"));
  return [el("div", {class: "toolbar"}, actions)];
}

async function showChat(main, params) {
  const {el, api} = board();
  const finished = (await api("/api/runs")).runs.filter((r) => r.status === "finished");
  const picker = el("select", {id: "chat-run"}, finished.map((r) => el("option", {value: r.name}, r.name)));
  if (params.get("run")) picker.value = params.get("run");
  const log = el("div", {class: "chat-log", id: "chat-log"});
  const input = el("input", {id: "chat-input", placeholder: "message", style: "flex: 1"});
  let history = [];
  const send = async () => {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    history.push({role: "user", content: text});
    log.append(el("div", {class: "bubble user"}, text));
    const answer = el("div", {class: "bubble assistant"});
    log.append(answer);
    try {
      const response = await fetch("/api/chat", {method: "POST", headers: {"content-type": "application/json"},
        body: JSON.stringify({name: picker.value, messages: history})});
      if (!response.ok) {
        const text = await response.text();
        answer.textContent = (() => { try { return JSON.parse(text).error; } catch { return text; } })();
        answer.classList.add("error");
        return;
      }
      const reader = response.body.getReader(), decoder = new TextDecoder();
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        answer.textContent += decoder.decode(value, {stream: true});
        answer.dataset.chunks = String(+(answer.dataset.chunks || 0) + 1);
      }
    } catch (error) {
      answer.textContent += ` [${error.message}]`;
      answer.classList.add("error");
    }
    answer.dataset.done = "true";
    history.push({role: "assistant", content: answer.textContent});
  };
  input.onkeydown = (event) => { if (event.key === "Enter") send(); };
  picker.onchange = () => { history = []; log.replaceChildren(); };
  main.append(el("h2", {}, "chat with a finished run"), el("div", {class: "toolbar"}, el("label", {}, "run ", picker)), log,
    el("div", {class: "toolbar"}, input, el("button", {id: "chat-send", class: "primary", onclick: send}, "Send")));
  if (!finished.length) log.append(el("p", {class: "empty"}, "no finished run under this root yet"));
}

window.tunesmithLaunch = {showLaunch, runActions};
window.tunesmithChat = {showChat};
})();
