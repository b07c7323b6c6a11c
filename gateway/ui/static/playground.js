// The playground page: a model picker over /v1/models, then the chat panel for text-generation
// models or the task's form for the others, and the last request as code.

import { ChatPanel } from "./chat.js";
import { api, apiKey, el, errorMessage } from "./common.js";
import { chatCode, taskCode } from "./code.js";
import { MODES, TASKS } from "./tasks.js";

const origin = window.location.origin;
const workspace = document.getElementById("workspace");
const picker = document.getElementById("model");
const info = document.getElementById("model-info");
let models = [];
let chat = null; // the chat panel shown, whose stream a change of model stops

// code panel ------------------------------------------------------------------------------------
const TAB_NAMES = { curl: "curl", openai: "OpenAI Python", hf: "InferenceClient" };
let code = null;
let tab = "curl";

function showCode(next) {
  code = next;
  if (!(tab in code)) tab = "curl";
  const tabs = document.getElementById("code-tabs");
  tabs.replaceChildren(
    ...Object.keys(TAB_NAMES)
      .filter((name) => name in code)
      .map((name) =>
        el(
          "button",
          {
            type: "button",
            role: "tab",
            id: `tab-${name}`,
            "aria-selected": String(name === tab),
            "aria-controls": "code",
            onclick: () => ((tab = name), showCode(code)),
          },
          TAB_NAMES[name],
        ),
      ),
  );
  const pre = document.getElementById("code");
  pre.setAttribute("role", "tabpanel");
  pre.setAttribute("aria-labelledby", `tab-${tab}`);
  pre.textContent = code[tab];
  document.getElementById("code-panel").hidden = false;
}

// task forms ----------------------------------------------------------------------------------------
function field(spec, id) {
  const label = el("label", { for: id }, spec.label, spec.hint ? el("small", {}, ` (${spec.hint})`) : null);
  if (spec.kind === "checkbox") {
    return el("div", { class: "field row" }, el("input", { type: "checkbox", id, name: spec.name, checked: spec.value }), label);
  }
  let input;
  if (spec.kind === "textarea") input = el("textarea", { id, name: spec.name, rows: 3 }, spec.value);
  else if (spec.kind === "select") input = el("select", { id, name: spec.name }, spec.options.map((o) => el("option", { value: o, selected: o === spec.value }, o)));
  else if (spec.kind === "file") input = el("input", { type: "file", id, name: spec.name, accept: "image/*", required: true });
  else input = el("input", { type: "text", id, name: spec.name, value: spec.value });
  return el("div", { class: "field" }, label, input);
}

function values(form, spec) {
  const out = {};
  for (const f of spec.fields) {
    const input = form.elements[f.name];
    out[f.name] = f.kind === "checkbox" ? input.checked : f.kind === "file" ? input.files[0] : input.value;
  }
  return out;
}

async function runTask(model, task, form, result) {
  const spec = TASKS[task];
  const v = values(form, spec);
  if (spec.fields.some((f) => f.kind === "file") && !v.image) return;
  const request = spec.request(v);
  const call = spec.call(v);
  showCode(taskCode(origin, model, request, call, spec.openai?.(model, v), Boolean(apiKey())));
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  result.replaceChildren(el("p", { class: "muted" }, "Running…"));
  try {
    const response = await api(`/models/${encodeURI(model)}`, {
      method: "POST",
      headers: { "Content-Type": request.blob ? request.contentType : "application/json" },
      body: request.blob ?? JSON.stringify(request.json),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    result.replaceChildren(spec.render(await response.json(), v));
    // the code shows the key once the page holds one (asked for on a 401)
    showCode(taskCode(origin, model, request, call, spec.openai?.(model, v), Boolean(apiKey())));
  } catch (error) {
    result.replaceChildren(el("div", { class: "alert", role: "alert" }, error.message));
  } finally {
    button.disabled = false;
  }
}

function taskPanel(model, task) {
  const spec = TASKS[task];
  const result = el("div", { id: "task-result", "aria-live": "polite" });
  const form = el(
    "form",
    { id: "task-form", "aria-label": task },
    spec.fields.map((f) => field(f, `task-${f.name}`)),
    el("button", { type: "submit", id: "run" }, "Run"),
  );
  const preview = el("div");
  form.addEventListener("submit", (e) => (e.preventDefault(), runTask(model, task, form, result)));
  form.addEventListener("change", (e) => {
    if (e.target.type !== "file" || !e.target.files[0]) return;
    preview.replaceChildren(el("img", { class: "preview", alt: "The chosen image", src: URL.createObjectURL(e.target.files[0]) }));
  });
  return el(
    "div",
    { class: "layout" },
    el("section", { class: "panel", "aria-labelledby": "task-title" }, el("h2", { id: "task-title" }, task), form, preview),
    el("section", { class: "panel", "aria-labelledby": "result-title" }, el("h2", { id: "result-title" }, "Result"), result),
  );
}

function showTask(model, task) {
  const modes = MODES[task];
  if (!modes) {
    workspace.replaceChildren(taskPanel(model, task));
    return;
  }
  const holder = el("div");
  const choose = (mode) => {
    for (const b of bar.querySelectorAll("button")) b.setAttribute("aria-selected", String(b.dataset.mode === mode));
    holder.replaceChildren(taskPanel(model, mode));
  };
  const bar = el(
    "div",
    { class: "tabs", role: "tablist", "aria-label": "Task" },
    modes.map((mode) => el("button", { type: "button", role: "tab", "data-mode": mode, onclick: () => choose(mode) }, mode)),
  );
  workspace.replaceChildren(bar, holder);
  choose(modes[0]);
}

// models --------------------------------------------------------------------------------------------
function select(name) {
  const model = models.find((m) => m.id === name);
  if (!model) return;
  const where = model.deployments ? `${model.deployments.length} deployments` : model.backend;
  info.textContent = `${model.task ?? "unknown task"} · ${model.state} · ${where}`;
  document.getElementById("code-panel").hidden = true;
  chat?.abort();
  chat = null;
  history.replaceState(null, "", `?model=${encodeURIComponent(name)}`);
  if (model.state === "failed") {
    workspace.replaceChildren(el("div", { class: "alert", role: "alert" }, `This model failed to load: ${model.error ?? "unknown error"}`));
  } else if (model.task === "text-generation" || !model.task) {
    chat = new ChatPanel(workspace, model.id, (body) => showCode(chatCode(origin, body, Boolean(apiKey()))));
  } else if (TASKS[model.task] || MODES[model.task]) {
    showTask(model.id, model.task);
  } else {
    workspace.replaceChildren(el("p", {}, `The playground has no form for the task ${model.task}.`));
  }
}

async function load() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    models = (await response.json()).data;
  } catch (error) {
    workspace.replaceChildren(el("div", { class: "alert", role: "alert" }, `Could not list the models: ${error.message}`));
    return;
  }
  picker.replaceChildren(...models.map((m) => el("option", { value: m.id }, `${m.id} — ${m.task ?? "?"} (${m.state})`)));
  picker.disabled = false;
  picker.addEventListener("change", () => select(picker.value));
  const wanted = new URLSearchParams(window.location.search).get("model");
  picker.value = models.some((m) => m.id === wanted) ? wanted : models[0]?.id;
  select(picker.value);
}

load();
