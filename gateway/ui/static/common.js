// Shared by the pages: DOM building (text only: model output is never parsed as HTML), the API key
// (asked for when the gateway answers 401, kept in sessionStorage for this browser tab only), fetch.

const KEY_STORE = "gateway.apiKey";

/** el("div", {class: "x", onclick: f}, child, "text", ...): an element; strings become text nodes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

let pendingKey = null; // one prompt at a time, however many calls were refused

/** Show the key form in `#key-slot` and resolve with the key once it is submitted. */
function askKey(message) {
  if (pendingKey) return pendingKey;
  pendingKey = new Promise((resolve) => {
    const slot = document.getElementById("key-slot");
    const input = el("input", { type: "password", id: "api-key", autocomplete: "off", spellcheck: "false" });
    const form = el(
      "form",
      { class: "panel keybox", "aria-labelledby": "key-title" },
      el("h2", { id: "key-title" }, "API key required"),
      el("p", {}, message, " It is kept in this browser tab only (sessionStorage)."),
      el("div", { class: "field" }, el("label", { for: "api-key" }, "API key"), input),
      el("button", { type: "submit" }, "Use key"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      form.remove();
      pendingKey = null;
      resolve(key);
    });
    slot.replaceChildren(form);
    input.focus();
  });
  return pendingKey;
}

/** fetch() with the stored key as a Bearer header; on 401 asks for a key and tries again. */
export async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    const why = key ? "The key was refused." : "This gateway needs an API key.";
    sessionStorage.removeItem(KEY_STORE);
    await askKey(why);
  }
}

/** The message of an error answer in either envelope: OpenAI's {error: {message}} or HF's {error: "..."}. */
export async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error ?? body.detail ?? body;
    if (typeof error === "string") return `${response.status}: ${error}`;
    if (error && typeof error.message === "string") return `${response.status}: ${error.message}`;
  } catch {
    // not JSON: the text itself
  }
  return `${response.status}: ${text || response.statusText}`;
}

/** Seconds as "850 ms" or "1.25 s"; "–" for nothing. */
export function formatSeconds(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return value < 1 ? `${(value * 1000).toFixed(value < 0.01 ? 1 : 0)} ms` : `${value.toFixed(2)} s`;
}

export function formatNumber(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return value.toFixed(digits);
}
