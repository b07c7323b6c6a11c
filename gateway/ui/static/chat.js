// The chat panel: a conversation streamed from /v1/chat/completions (fetch + SSE), the sampling
// settings, stop (AbortController) and regenerate.

import { api, el, errorMessage, formatSeconds } from "./common.js";
import { sseData } from "./sse.js";

function numberField(name, label, attrs) {
  return el(
    "div",
    { class: "field" },
    el("label", { for: `chat-${name}` }, label),
    el("input", { type: "number", id: `chat-${name}`, name, ...attrs }),
  );
}

function settingsForm() {
  return el(
    "form",
    { class: "settings", id: "chat-settings", "aria-label": "Sampling settings", onsubmit: (e) => e.preventDefault() },
    el(
      "div",
      { class: "field wide" },
      el("label", { for: "chat-system" }, "System prompt"),
      el("textarea", { id: "chat-system", name: "system", rows: 2, placeholder: "You are a helpful assistant." }),
    ),
    numberField("temperature", "Temperature", { min: 0, max: 2, step: 0.1, value: 0.7 }),
    numberField("top_p", "Top p", { min: 0.01, max: 1, step: 0.05, value: 1 }),
    numberField("max_tokens", "Max tokens", { min: 1, step: 1, value: 256 }),
    numberField("seed", "Seed", { step: 1, placeholder: "random" }),
    el(
      "div",
      { class: "field wide" },
      el("label", { for: "chat-stop" }, "Stop sequences ", el("small", {}, "(one per line)")),
      el("textarea", { id: "chat-stop", name: "stop", rows: 1 }),
    ),
  );
}

export class ChatPanel {
  constructor(root, model, onRequest) {
    this.model = model;
    this.onRequest = onRequest; // (body) => void: shows the request as code
    this.history = []; // [{role, content}] without the system prompt
    this.controller = null;
    this.messages = el("ol", { class: "messages", id: "messages", "aria-label": "Conversation" });
    this.input = el("textarea", { id: "chat-input", rows: 3, placeholder: "Ask something…" });
    this.status = el("p", { class: "muted", id: "chat-status", role: "status" });
    this.error = el("div", { id: "chat-error" });
    this.send = el("button", { type: "submit", id: "send" }, "Send");
    this.stop = el("button", { type: "button", id: "stop", class: "secondary", disabled: true, onclick: () => this.abort() }, "Stop");
    this.regen = el("button", { type: "button", id: "regenerate", class: "secondary", disabled: true, onclick: () => this.regenerate() }, "Regenerate");
    const clear = el("button", { type: "button", id: "clear", class: "secondary", onclick: () => this.clear() }, "Clear");
    const composer = el(
      "form",
      { "aria-label": "Message", onsubmit: (e) => (e.preventDefault(), this.submit()) },
      el("div", { class: "field" }, el("label", { for: "chat-input" }, "Message"), this.input),
      el("div", { class: "row" }, this.send, this.stop, this.regen, clear),
    );
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) (e.preventDefault(), this.submit());
    });
    this.settings = settingsForm();
    root.replaceChildren(
      el(
        "div",
        { class: "layout" },
        el("section", { class: "panel", "aria-labelledby": "chat-title" }, el("h2", { id: "chat-title" }, "Chat"), this.messages, this.error, composer, this.status),
        el("section", { class: "panel", "aria-labelledby": "settings-title" }, el("h2", { id: "settings-title" }, "Settings"), this.settings),
      ),
    );
  }

  body() {
    const f = this.settings.elements;
    const messages = [];
    if (f.system.value.trim()) messages.push({ role: "system", content: f.system.value.trim() });
    messages.push(...this.history);
    const body = { model: this.model, messages, stream: true, stream_options: { include_usage: true } };
    const number = (name) => (f[name].value === "" ? undefined : Number(f[name].value));
    body.temperature = number("temperature");
    body.top_p = number("top_p");
    body.max_tokens = number("max_tokens");
    body.seed = number("seed");
    const stop = f.stop.value.split("\n").filter((s) => s !== "");
    if (stop.length) body.stop = stop;
    for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
    return body;
  }

  bubble(role, content) {
    const text = el("div", { class: "content" }, content);
    const item = el("li", { class: `message ${role}` }, el("div", { class: "role" }, role), text);
    this.messages.append(item);
    return item;
  }

  submit() {
    const content = this.input.value.trim();
    if (!content || this.controller) return;
    this.input.value = "";
    this.history.push({ role: "user", content });
    this.bubble("user", content);
    this.complete();
  }

  regenerate() {
    if (this.controller || !this.history.length) return;
    if (this.history.at(-1).role === "assistant") {
      this.history.pop();
      this.messages.lastElementChild?.remove();
    }
    this.complete();
  }

  abort() {
    this.controller?.abort();
  }

  clear() {
    this.abort();
    this.history = [];
    this.messages.replaceChildren();
    this.error.replaceChildren();
    this.status.textContent = "";
    this.regen.disabled = true;
  }

  busy(on) {
    this.send.disabled = on;
    this.stop.disabled = !on;
    this.regen.disabled = on || !this.history.length;
  }

  async complete() {
    const body = this.body();
    this.onRequest(body);
    this.error.replaceChildren();
    const item = this.bubble("assistant", "");
    item.setAttribute("aria-busy", "true");
    const out = item.querySelector(".content");
    this.controller = new AbortController();
    this.busy(true);
    const started = performance.now();
    let firstAt = null;
    let usage = null;
    let finish = null;
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: this.controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const data of sseData(response.body, this.controller.signal)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (!choice) continue;
        if (choice.delta?.content) {
          firstAt ??= performance.now();
          out.textContent += choice.delta.content;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      this.history.push({ role: "assistant", content: out.textContent });
      this.report(started, firstAt, usage, finish);
    } catch (error) {
      if (error.name === "AbortError") {
        this.history.push({ role: "assistant", content: out.textContent });
        item.append(el("div", { class: "note", "data-stopped": "" }, "Stopped."));
        this.status.textContent = "Stopped by you.";
      } else {
        item.remove();
        this.error.replaceChildren(el("div", { class: "alert", role: "alert" }, error.message));
        this.status.textContent = "";
      }
    } finally {
      item.removeAttribute("aria-busy");
      this.controller = null;
      this.busy(false);
    }
  }

  report(started, firstAt, usage, finish) {
    const total = (performance.now() - started) / 1000;
    const parts = [`${formatSeconds(total)} in all`];
    if (firstAt !== null) parts.push(`first token after ${formatSeconds((firstAt - started) / 1000)}`);
    if (usage) {
      parts.push(`${usage.completion_tokens} tokens`);
      if (firstAt !== null && usage.completion_tokens > 1) {
        const rate = (usage.completion_tokens - 1) / ((performance.now() - firstAt) / 1000);
        parts.push(`${rate.toFixed(1)} tokens/s`);
      }
    }
    if (finish) parts.push(`finish: ${finish}`);
    this.status.textContent = parts.join(" · ");
  }
}
