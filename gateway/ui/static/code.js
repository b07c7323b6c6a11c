// The request the playground just sent, as code that sends it again: curl, OpenAI's Python SDK,
// huggingface_hub's InferenceClient. The key itself is never printed: the code reads an environment variable.

const KEY_ENV = "GATEWAY_API_KEY";

/** A JSON value as a Python literal. */
export function py(value, indent = 0) {
  const pad = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.some((v) => typeof v === "object" && v !== null)) return `[${value.map((v) => py(v)).join(", ")}]`;
    return `[\n${value.map((v) => `${pad}    ${py(v, indent + 4)},`).join("\n")}\n${pad}]`;
  }
  const items = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v, indent + 4)}`);
  return `{${items.join(", ")}}`;
}

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

function kwargs(args, indent) {
  const pad = " ".repeat(indent);
  return Object.entries(args)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${pad}${k}=${py(v, indent)},`)
    .join("\n");
}

function curl(url, { json, file, contentType, keyed, stream }) {
  const lines = [`curl ${stream ? "-N " : ""}${url}`];
  if (keyed) lines.push(`  -H "Authorization: Bearer $${KEY_ENV}"`);
  if (file) {
    lines.push(`  -H ${shellQuote(`Content-Type: ${contentType || "application/octet-stream"}`)}`);
    lines.push(`  --data-binary @${shellQuote(file)}`);
  } else {
    lines.push("  -H 'Content-Type: application/json'");
    lines.push(`  -d ${shellQuote(JSON.stringify(json))}`);
  }
  return lines.join(" \\\n");
}

function keyArg(keyed, name) {
  return keyed ? `${name}=os.environ["${KEY_ENV}"]` : `${name}="unused"`;
}

/** Code for a chat request body (as sent to /v1/chat/completions). */
export function chatCode(origin, body, keyed) {
  const { model, messages, stream, stream_options: _opts, ...sampling } = body;
  const imports = keyed ? "import os\n\n" : "";
  const settings = kwargs(sampling, 4);
  const openai = `${imports}from openai import OpenAI

client = OpenAI(base_url="${origin}/v1", ${keyArg(keyed, "api_key")})
stream = client.chat.completions.create(
    model=${py(model)},
    messages=${py(messages, 4)},${settings ? `\n${settings}` : ""}
    stream=True,
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
`;
  const hf = `${imports}from huggingface_hub import InferenceClient

client = InferenceClient(base_url="${origin}/models/${model}"${keyed ? `, ${keyArg(true, "api_key")}` : ""})
for chunk in client.chat_completion(
    messages=${py(messages, 4)},${settings ? `\n${settings}` : ""}
    stream=True,
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
`;
  return {
    curl: curl(`${origin}/v1/chat/completions`, { json: body, keyed, stream: true }),
    openai,
    hf,
  };
}

/** Code for an HF task call: `call` is {method, args: [...positional], kwargs: {...}}; `openaiCode` optional. */
export function taskCode(origin, model, request, call, openaiCode, keyed) {
  const imports = keyed ? "import os\n\n" : "";
  const positional = call.args.map((a) => `    ${py(a, 4)},`).join("\n");
  const hf = `${imports}from huggingface_hub import InferenceClient

client = InferenceClient(base_url="${origin}/models/${model}"${keyed ? `, ${keyArg(true, "api_key")}` : ""})
result = client.${call.method}(
${[positional, kwargs(call.kwargs || {}, 4)].filter(Boolean).join("\n")}
)
print(result)
`;
  const code = { curl: curl(`${origin}/models/${model}`, { ...request, keyed }), hf };
  if (openaiCode) {
    code.openai = `${imports}from openai import OpenAI

client = OpenAI(base_url="${origin}/v1", ${keyArg(keyed, "api_key")})
${openaiCode}
`;
  }
  return code;
}
