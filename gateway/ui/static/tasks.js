// One form and one result view per Hugging Face task (POST /models/{id}, the hosted Inference API's
// shapes). Each task: fields (what the form asks), request(values) -> the body, call(values) -> the
// InferenceClient call reproducing it, render(output, values) -> the result as the task's users expect.

import { el, formatNumber } from "./common.js";

const text = (name, label, value, extra = {}) => ({ name, label, value, kind: "textarea", ...extra });
const line = (name, label, value, extra = {}) => ({ name, label, value, kind: "text", ...extra });

/** Score bars, best first: [{label, score}] (any key for the label). */
export function scoreBars(items, labelOf = (item) => item.label) {
  const sorted = [...items].sort((a, b) => b.score - a.score);
  return el(
    "ul",
    { class: "bars", "data-result": "scores" },
    sorted.map((item) => {
      const pct = Math.max(0, Math.min(1, item.score)) * 100;
      return el(
        "li",
        { class: "bar" },
        el("span", { class: "name" }, labelOf(item)),
        el(
          "span",
          { class: "track", role: "img", "aria-label": `${labelOf(item)}: ${pct.toFixed(1)}%` },
          el("span", { class: "fill", style: `width:${pct.toFixed(2)}%; display:block` }),
        ),
        el("span", { class: "value" }, `${pct.toFixed(1)}%`),
      );
    }),
  );
}

/** `source` with [start, end) spans marked, each with its tag (token classification, QA). */
export function highlighted(source, spans) {
  const parts = [];
  let at = 0;
  for (const span of [...spans].sort((a, b) => a.start - b.start)) {
    if (span.start < at || span.end <= span.start) continue; // overlapping or empty: skip
    parts.push(source.slice(at, span.start));
    parts.push(
      el(
        "mark",
        { title: `${span.tag} (${formatNumber(span.score, 3)})` },
        source.slice(span.start, span.end),
        el("span", { class: "tag" }, span.tag),
      ),
    );
    at = span.end;
  }
  parts.push(source.slice(at));
  return el("p", { class: "spans", "data-result": "spans" }, parts);
}

function generated(key) {
  return (out) => el("p", { class: "spans", "data-result": "text" }, (out[0] || {})[key] ?? JSON.stringify(out));
}

function generateParams(values) {
  const max = Number(values.max_new_tokens);
  return max > 0 ? { generate_parameters: { max_new_tokens: max } } : {};
}

const seq2seq = (key, method) => ({
  fields: [text("text", "Text", "the game tonight was great and i love it"), line("max_new_tokens", "Max new tokens", "20")],
  request: (v) => ({ json: { inputs: v.text, parameters: generateParams(v) } }),
  call: (v) => ({ method, args: [v.text], kwargs: method === "text_generation" ? {} : generateParams(v) }),
  render: generated(key),
});

export const TASKS = {
  "text-classification": {
    fields: [text("text", "Text", "I love using this gateway!")],
    request: (v) => ({ json: { inputs: v.text } }),
    call: (v) => ({ method: "text_classification", args: [v.text] }),
    render: (out) => scoreBars(Array.isArray(out[0]) ? out[0] : out),
  },
  "token-classification": {
    fields: [
      text("text", "Text", "My name is Sarah and I live in London"),
      { name: "aggregation_strategy", label: "Aggregation", kind: "select", options: ["simple", "first", "average", "max", "none"], value: "simple" },
    ],
    request: (v) => ({ json: { inputs: v.text, parameters: { aggregation_strategy: v.aggregation_strategy } } }),
    call: (v) => ({ method: "token_classification", args: [v.text], kwargs: { aggregation_strategy: v.aggregation_strategy } }),
    render: (out, v) =>
      el(
        "div",
        {},
        highlighted(v.text, out.map((e) => ({ start: e.start, end: e.end, tag: e.entity_group ?? e.entity, score: e.score }))),
        out.length ? null : el("p", { class: "muted" }, "No entities found."),
      ),
  },
  "zero-shot-classification": {
    fields: [
      text("text", "Text", "The game tonight was great"),
      line("labels", "Candidate labels", "sports, politics, cooking", { hint: "comma-separated" }),
      { name: "multi_label", label: "Several labels may be true (multi_label)", kind: "checkbox", value: false },
    ],
    request: (v) => ({
      json: { inputs: v.text, parameters: { candidate_labels: splitLabels(v.labels), multi_label: v.multi_label } },
    }),
    call: (v) => ({
      method: "zero_shot_classification",
      args: [v.text],
      kwargs: { candidate_labels: splitLabels(v.labels), multi_label: v.multi_label },
    }),
    render: (out) => scoreBars(out),
  },
  "fill-mask": {
    fields: [text("text", "Text with a mask token", "life is [MASK] .", { hint: "the model's mask token: [MASK] for BERT, <mask> for RoBERTa" })],
    request: (v) => ({ json: { inputs: v.text } }),
    call: (v) => ({ method: "fill_mask", args: [v.text] }),
    render: (out) => {
      const masks = Array.isArray(out[0]) ? out : [out]; // one list per mask token
      return el("div", {}, masks.map((list) => scoreBars(list, (item) => item.token_str)));
    },
  },
  "question-answering": {
    fields: [
      line("question", "Question", "Where do I live?"),
      text("context", "Context", "My name is Clara and I live in Berkeley"),
    ],
    request: (v) => ({ json: { inputs: { question: v.question, context: v.context } } }),
    call: (v) => ({ method: "question_answering", args: [], kwargs: { question: v.question, context: v.context } }),
    render: (out, v) => {
      const answers = Array.isArray(out) ? out : [out];
      const best = answers[0];
      return el(
        "div",
        {},
        el("p", {}, "Answer: ", el("strong", { "data-result": "answer" }, best.answer), ` (score ${formatNumber(best.score, 3)})`),
        highlighted(v.context, [{ start: best.start, end: best.end, tag: "answer", score: best.score }]),
      );
    },
  },
  "feature-extraction": {
    fields: [text("text", "Text", "A cat sits on the mat.")],
    request: (v) => ({ json: { inputs: v.text } }),
    call: (v) => ({ method: "feature_extraction", args: [v.text] }),
    openai: (model, v) =>
      `data = client.embeddings.create(model=${JSON.stringify(model)}, input=${JSON.stringify(v.text)}).data\nprint(len(data[0].embedding), data[0].embedding[:8])`,
    render: (out) => {
      const vector = Array.isArray(out[0]) ? out[0] : out;
      const flat = Array.isArray(vector[0]) ? vector[0] : vector; // token-level output: its first token
      return el(
        "div",
        {},
        el("p", {}, "Dimensions: ", el("strong", { "data-result": "dimensions" }, String(flat.length))),
        el(
          "p",
          { class: "vector", "data-result": "vector" },
          `[${flat.slice(0, 8).map((x) => x.toFixed(4)).join(", ")}${flat.length > 8 ? ", …" : ""}]`,
        ),
      );
    },
  },
  "sentence-similarity": {
    fields: [
      line("source", "Source sentence", "A man is playing a guitar."),
      text("sentences", "Compare with (one sentence per line)", "Someone plays an instrument.\nThe stock market fell."),
    ],
    request: (v) => ({ json: { inputs: { source_sentence: v.source, sentences: splitLines(v.sentences) } } }),
    call: (v) => ({ method: "sentence_similarity", args: [v.source], kwargs: { other_sentences: splitLines(v.sentences) } }),
    render: (out, v) => {
      const sentences = splitLines(v.sentences);
      return el(
        "ul",
        { class: "bars", "data-result": "similarity" },
        out.map((score, i) =>
          el("li", { class: "bar" }, el("span", { class: "name" }, sentences[i] ?? `#${i + 1}`), el("span", { class: "bignum" }, score.toFixed(3))),
        ),
      );
    },
  },
  "image-classification": {
    fields: [{ name: "image", label: "Image", kind: "file" }],
    request: (v) => ({ file: v.image.name, blob: v.image, contentType: v.image.type || "application/octet-stream" }),
    call: (v) => ({ method: "image_classification", args: [v.image.name] }),
    render: (out) => scoreBars(out),
  },
  summarization: seq2seq("summary_text", "summarization"),
  translation: seq2seq("translation_text", "translation"),
  "text2text-generation": seq2seq("generated_text", "text_generation"),
};

// embedding models serve sentence-similarity too (cosine similarity of their embeddings)
export const MODES = { "feature-extraction": ["feature-extraction", "sentence-similarity"] };

export function splitLabels(value) {
  return value.split(",").map((s) => s.trim()).filter(Boolean);
}

export function splitLines(value) {
  return value.split("\n").map((s) => s.trim()).filter(Boolean);
}
