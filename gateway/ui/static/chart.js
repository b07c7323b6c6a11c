// A small SVG line chart: a few series over the last N readings, its y axis from 0 to the largest
// value shown, a gap where a value is missing. Hand-written rather than a vendored library: six
// charts of a handful of lines need ~100 lines of code, nothing to vendor, update or license.

import { el } from "./common.js";

const SVG = "http://www.w3.org/2000/svg";
const W = 320;
const H = 130;
const PAD = { left: 44, right: 8, top: 8, bottom: 18 };
export const COLORS = ["#1d5fbf", "#c2410c", "#15803d", "#7e22ce"];

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

export class LineChart {
  /** series: [{key, label}]; format(value) -> text for the axis and legend. */
  constructor(parent, { id, title, series, format, points = 60 }) {
    this.series = series.map((s, i) => ({ ...s, color: s.color ?? COLORS[i % COLORS.length] }));
    this.format = format;
    this.points = points;
    this.data = []; // [{key: value|null}]
    this.svg = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": `${id}-title` });
    this.legend = el("div", { class: "legend" });
    this.values = {};
    for (const s of this.series) {
      this.values[s.key] = el("span", { class: "legend-value", "data-series": s.key }, "–");
      this.legend.append(el("span", {}, el("span", { class: "swatch", style: `background:${s.color}` }), `${s.label}: `, this.values[s.key]));
    }
    this.root = el("section", { class: "panel chart", id, "aria-labelledby": `${id}-title` }, el("h2", { id: `${id}-title` }, title), this.svg, this.legend);
    parent.append(this.root);
  }

  push(values) {
    this.data.push(values);
    if (this.data.length > this.points) this.data.shift();
    for (const s of this.series) this.values[s.key].textContent = this.format(values[s.key]);
    this.draw();
  }

  draw() {
    const all = this.data.flatMap((d) => this.series.map((s) => d[s.key])).filter((v) => typeof v === "number");
    const top = niceMax(Math.max(0, ...all));
    const x = (i) => PAD.left + ((W - PAD.left - PAD.right) * i) / Math.max(1, this.points - 1);
    const y = (v) => H - PAD.bottom - ((H - PAD.top - PAD.bottom) * v) / top;
    const nodes = [];
    for (const v of [0, top / 2, top]) {
      nodes.push(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), stroke: "#d5dae1", "stroke-width": 1 }));
      const label = svg("text", { x: PAD.left - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#505b6b" });
      label.textContent = this.format(v);
      nodes.push(label);
    }
    const offset = this.points - this.data.length; // newest reading at the right edge
    for (const s of this.series) {
      let path = "";
      let pen = false;
      let last = null;
      this.data.forEach((d, i) => {
        const v = d[s.key];
        if (typeof v !== "number") return void ((pen = false), (last = null));
        last = [x(i + offset), y(v)];
        path += `${pen ? "L" : "M"}${last[0].toFixed(1)},${last[1].toFixed(1)}`;
        pen = true;
      });
      nodes.push(svg("path", { d: path || "M0,0", fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.key }));
      // the newest reading as a dot (none when it has no value): a lone reading still shows
      if (last) nodes.push(svg("circle", { cx: last[0].toFixed(1), cy: last[1].toFixed(1), r: 2.5, fill: s.color }));
    }
    this.svg.replaceChildren(...nodes);
  }
}

/** A round upper bound for the axis: 1, 2 or 5 times a power of ten. */
export function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}
