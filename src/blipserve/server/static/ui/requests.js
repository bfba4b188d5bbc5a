// What the page sends, and the same request as code to copy: pure functions, no DOM.
//
// A conversation is the image, the earlier turns ({question, answer}) and the new
// question (null: a caption). The page sends it to /v1/chat/completions; "show as code"
// writes it as the managed endpoint's /score payload (whose prompt is BLIP-2's chat prompt,
// built here as the server builds it) and as openai-client code.

const IMAGE = "__IMAGE__"; // stands for the image in code templates

/** Every whitespace run as one space, ends stripped (the server does the same). */
export function normalize(text) {
  return text.split(/\s+/).filter(Boolean).join(" ");
}

/** BLIP-2's prompt: "" for a caption, else "Question: q1 Answer: a1 ... Question: q Answer:". */
export function chatPrompt(turns, question) {
  if (question === null) return "";
  const asked = (q) => `Question: ${normalize(q)} Answer:`;
  const earlier = turns.map((t) => `${asked(t.question)} ${normalize(t.answer)}`);
  return [...earlier, asked(question)].join(" ");
}

/** OpenAI chat messages: the image in the first user message, then the turns. */
export function chatMessages(image, turns, question) {
  const picture = { type: "image_url", image_url: { url: image } };
  if (question === null) return [{ role: "user", content: [picture] }];
  const questions = [...turns.map((t) => t.question), question];
  const messages = [];
  questions.forEach((text, i) => {
    messages.push({
      role: "user",
      content: i === 0 ? [{ type: "text", text }, picture] : text,
    });
    if (i < turns.length) messages.push({ role: "assistant", content: turns[i].answer });
  });
  return messages;
}

/** Settings -> OpenAI request fields (absent when they are the server's default). */
export function chatOptions(settings) {
  const options = {};
  if (settings.maxNewTokens !== null) options.max_tokens = settings.maxNewTokens;
  if (settings.numBeams > 1) options.num_beams = settings.numBeams;
  if (settings.sample) {
    options.temperature = settings.temperature;
    options.top_p = settings.topP;
  }
  if (settings.seed !== null) options.seed = settings.seed;
  return options;
}

/** Settings -> /score "params" (transformers' generate names). */
export function scoreParams(settings) {
  const params = {};
  if (settings.maxNewTokens !== null) params.max_new_tokens = settings.maxNewTokens;
  if (settings.numBeams > 1) params.num_beams = settings.numBeams;
  if (settings.sample) {
    params.do_sample = true;
    params.temperature = settings.temperature;
    params.top_p = settings.topP;
  }
  if (settings.seed !== null) params.seed = settings.seed;
  return params;
}

/** The streamed /v1/chat/completions body the page sends. */
export function chatBody(model, conversation, settings) {
  const { image, turns, question } = conversation;
  return {
    model,
    messages: chatMessages(image.source, turns, question),
    ...chatOptions(settings),
    stream: true,
    stream_options: { include_usage: true },
  };
}

/** A Python literal of JSON-like data; the image placeholder becomes the variable `image`. */
function python(value) {
  if (value === IMAGE) return "image";
  if (Array.isArray(value)) return `[${value.map(python).join(", ")}]`;
  if (value !== null && typeof value === "object") {
    const items = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${python(v)}`);
    return `{${items.join(", ")}}`;
  }
  return JSON.stringify(value); // strings and numbers read the same in Python
}

/** A shell word: single-quoted, inner single quotes escaped. */
export function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** The /score request as a curl command. A file image is read and base64-encoded by the
 * shell where the file is (printf is a builtin: no argument-length limit). */
export function curlCommand(base, conversation, settings, needsKey) {
  const { image, turns, question } = conversation;
  const fromFile = image.fileName !== null;
  const row = [fromFile ? IMAGE : image.source, chatPrompt(turns, question)];
  const payload = { input_data: { columns: ["image", "text"], index: [0], data: [row] } };
  const params = scoreParams(settings);
  if (Object.keys(params).length) payload.params = params;
  const json = JSON.stringify(payload);
  const headers = [`-H 'Content-Type: application/json'`];
  if (needsKey) headers.push(`-H "Authorization: Bearer $BLIPSERVE_API_KEY"`);
  const curl = `curl -s ${base}/score ${headers.join(" ")}`;
  if (!fromFile) return `${curl} \\\n  -d ${shellQuote(json)}`;
  const format = json.replaceAll("\\", "\\\\").replaceAll("%", "%%").replace(`"${IMAGE}"`, `"%s"`);
  const encoded = `"$(base64 < ${shellQuote(image.fileName)} | tr -d '\\n')"`;
  return `printf ${shellQuote(format)} \\\n  ${encoded} |\n  ${curl} --data-binary @-`;
}

/** The same conversation as Python with the openai client, streamed. */
export function pythonCode(base, model, conversation, settings, needsKey) {
  const { image, turns, question } = conversation;
  const fromFile = image.fileName !== null;
  const lines = [];
  if (fromFile) lines.push("import base64");
  if (needsKey) lines.push("import os");
  lines.push("", "from openai import OpenAI", "");
  const key = needsKey ? `os.environ["BLIPSERVE_API_KEY"]` : `"unused"`;
  lines.push(`client = OpenAI(base_url=${JSON.stringify(base + "/v1")}, api_key=${key})`);
  if (fromFile) {
    lines.push(`with open(${JSON.stringify(image.fileName)}, "rb") as file:`);
    lines.push(`    image = "data:${image.mimeType};base64," + base64.b64encode(file.read()).decode()`);
  } else {
    lines.push(`image = ${JSON.stringify(image.source)}`);
  }
  const messages = chatMessages(IMAGE, turns, question).map((m) => `        ${python(m)},`);
  const options = chatOptions(settings);
  const beams = options.num_beams;
  delete options.num_beams;
  lines.push("stream = client.chat.completions.create(");
  lines.push(`    model=${JSON.stringify(model)},`);
  lines.push("    messages=[", ...messages, "    ],");
  for (const [name, value] of Object.entries(options)) lines.push(`    ${name}=${value},`);
  if (beams) lines.push(`    extra_body={"num_beams": ${beams}},  # blipserve's extension`);
  lines.push("    stream=True,", ")");
  lines.push("for chunk in stream:");
  lines.push(`    print(chunk.choices[0].delta.content or "", end="", flush=True)`);
  lines.push("print()");
  return lines.join("\n");
}
