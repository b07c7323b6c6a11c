// The dashboard page: polls GET /ui/api/dashboard every few seconds (?every=N to change it) and
// draws the numbers the server computed over its sliding window.

import { LineChart } from "./chart.js";
import { api, el, errorMessage, formatNumber, formatSeconds } from "./common.js";

const every = Math.max(0.5, Number(new URLSearchParams(window.location.search).get("every")) || 2);
const rate = (v) => (v === null || v === undefined ? "–" : `${formatNumber(v, v < 10 ? 2 : 1)}/s`);
const count = (v) => (v === null || v === undefined ? "–" : Number.isInteger(v) ? String(v) : v.toFixed(1));

const TILES = [
  ["requests", "Requests/s", (d) => sum(d.window.rates, ["requests.2xx", "requests.4xx", "requests.5xx"]), rate],
  ["errors", "Errors/s (5xx)", (d) => d.window.rates["requests.5xx"], rate],
  ["tokens", "Output tokens/s", (d) => d.window.rates.output_tokens, rate],
  ["ttft", "TTFT p50", (d) => d.window.latency.ttft.p50, formatSeconds],
  ["itl", "ITL p50", (d) => d.window.latency.itl.p50, formatSeconds],
  ["waiting", "Queue", (d) => d.queue.waiting, count],
  ["running", "Running batch", (d) => d.queue.running, count],
  ["total", "Requests (all)", (d) => sum(d.totals, ["requests.2xx", "requests.4xx", "requests.5xx"]), count],
];

function sum(object, keys) {
  const present = keys.map((k) => object[k]).filter((v) => typeof v === "number");
  return present.length ? present.reduce((a, b) => a + b, 0) : null;
}

const tiles = {};
const tileRoot = document.getElementById("tiles");
for (const [key, label] of TILES) {
  tiles[key] = el("div", { class: "value", "data-tile": key }, "–");
  tileRoot.append(el("div", { class: "tile" }, el("div", { class: "label" }, label), tiles[key]));
}

const chartsRoot = document.getElementById("charts");
const CHARTS = [
  {
    chart: new LineChart(chartsRoot, {
      id: "chart-requests",
      title: "Requests/s by status",
      format: rate,
      series: [
        { key: "2xx", label: "2xx", color: "#15803d" },
        { key: "4xx", label: "4xx", color: "#a16207" },
        { key: "5xx", label: "5xx", color: "#b91c1c" },
      ],
    }),
    values: (d) => ({ "2xx": d.window.rates["requests.2xx"], "4xx": d.window.rates["requests.4xx"], "5xx": d.window.rates["requests.5xx"] }),
  },
  latencyChart("ttft", "Time to first token"),
  latencyChart("itl", "Inter-token latency"),
  {
    chart: new LineChart(chartsRoot, { id: "chart-tokens", title: "Output tokens/s", format: rate, series: [{ key: "tokens", label: "tokens/s" }] }),
    values: (d) => ({ tokens: d.window.rates.output_tokens }),
  },
  {
    chart: new LineChart(chartsRoot, {
      id: "chart-queue",
      title: "Queue depth and running batch",
      format: count,
      series: [
        { key: "waiting", label: "waiting" },
        { key: "running", label: "running" },
      ],
    }),
    values: (d) => ({ waiting: d.queue.waiting, running: d.queue.running }),
  },
  {
    chart: new LineChart(chartsRoot, {
      id: "chart-upstream",
      title: "Upstream retries and fallbacks",
      format: rate,
      series: [
        { key: "retries", label: "retries/s" },
        { key: "fallbacks", label: "fallbacks/s" },
      ],
    }),
    values: (d) => ({ retries: d.window.rates.upstream_retries, fallbacks: d.window.rates.upstream_fallbacks }),
  },
];

function latencyChart(key, title) {
  return {
    chart: new LineChart(chartsRoot, {
      id: `chart-${key}`,
      title,
      format: formatSeconds,
      series: [
        { key: "p50", label: "p50" },
        { key: "p90", label: "p90" },
        { key: "p99", label: "p99" },
      ],
    }),
    values: (d) => d.window.latency[key],
  };
}

function badge(state) {
  return el("span", { class: `badge ${state}` }, state.replace("_", " "));
}

function renderModels(models) {
  const rows = models.map((m) =>
    el(
      "tr",
      { "data-model": m.name },
      el("th", { scope: "row" }, m.name),
      el("td", {}, m.task ?? "–"),
      el("td", {}, badge(m.state), m.error ? el("div", { class: "muted" }, m.error) : null),
      el("td", {}, count(m.waiting)),
      el("td", {}, count(m.running)),
      el(
        "td",
        {},
        m.deployments.length
          ? el("ul", { class: "bars" }, m.deployments.map((d) => el("li", { "data-deployment": d.name }, `${d.name} (${d.backend}) `, badge(d.state))))
          : m.backend,
      ),
    ),
  );
  document.querySelector("#models tbody").replaceChildren(...rows);
}

let failures = 0;

async function poll() {
  const status = document.getElementById("updated");
  try {
    const response = await api("/ui/api/dashboard");
    if (!response.ok) throw new Error(await errorMessage(response));
    const data = await response.json();
    for (const [key, , pick, format] of TILES) tiles[key].textContent = format(pick(data));
    for (const { chart, values } of CHARTS) chart.push(values(data));
    renderModels(data.models);
    const span = data.window.seconds;
    document.getElementById("window").textContent = span ? `(over the last ${span.toFixed(1)} s)` : "(rates from the next reading on)";
    status.textContent = `Updated ${new Date(data.time * 1000).toLocaleTimeString()} · every ${every} s`;
    failures = 0;
  } catch (error) {
    failures += 1;
    status.textContent = `Could not read the dashboard: ${error.message}`;
  }
  setTimeout(poll, every * 1000 * Math.min(failures + 1, 5));
}

poll();
