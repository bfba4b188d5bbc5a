// The server's routes as the page uses them: its settings (config.json) and a streamed
// chat completion, with the retries a busy or loading server asks for. URLs are relative
// to the page (/ui/), so the page works under a reverse proxy's path prefix.

const CHAT_URL = "../v1/chat/completions";
const MAX_RETRIES = 30; // 429 / 503 answers waited out before giving up

/** An error to show as it is: `message` is written for people. */
export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

/** The server's address, as clients outside the browser would write it (no trailing /). */
export function serverBase() {
  return new URL("..", window.location.href).href.replace(/\/$/, "");
}

/** The page's settings from the server: model, limits, whether it has loaded. */
export async function fetchConfig() {
  const response = await fetch("config.json", { cache: "no-store" });
  if (!response.ok) throw new ApiError(`The server answered ${response.status} for its settings.`);
  return response.json();
}

/**
 * POST a streamed chat completion and read its events.
 * hooks.onDelta(text) for each piece of the answer; hooks.onWait(seconds, why) before a
 * retry. Resolves with {text, finishReason, tokens, started, firstAt, endedAt} (times from
 * performance.now(), of the attempt that was answered); rejects with an ApiError.
 */
export async function streamChat(body, key, hooks) {
  for (let attempt = 0; ; attempt++) {
    const started = performance.now();
    let response;
    try {
      response = await fetch(CHAT_URL, {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          ...(key ? { Authorization: `Bearer ${key}` } : {}),
        },
        body: JSON.stringify(body),
      });
    } catch {
      throw new ApiError("Could not reach the server. Is it still running?");
    }
    if ((response.status === 429 || response.status === 503) && attempt < MAX_RETRIES) {
      const seconds = Number(response.headers.get("Retry-After")) || 1;
      const why = response.status === 429 ? "The server is busy" : "The model is still loading";
      hooks.onWait(seconds, why);
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      continue;
    }
    if (!response.ok) throw await errorOf(response);
    return readEvents(response, started, hooks.onDelta);
  }
}

async function readEvents(response, started, onDelta) {
  const result = { text: "", finishReason: null, tokens: null, started, firstAt: null, endedAt: null };
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") {
        result.endedAt = performance.now();
        return result;
      }
      if (data) apply(JSON.parse(data), result, onDelta);
    }
  }
  throw new ApiError("The answer was cut off: the server closed the connection.");
}

function apply(chunk, result, onDelta) {
  if (chunk.error) throw new ApiError(humanMessage(500, chunk.error));
  if (chunk.usage) result.tokens = chunk.usage.completion_tokens;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const text = choice.delta && choice.delta.content;
  if (text) {
    if (result.firstAt === null) result.firstAt = performance.now();
    result.text += text;
    onDelta(text);
  }
  if (choice.finish_reason) result.finishReason = choice.finish_reason;
}

async function errorOf(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    // not JSON: a proxy's error page, say; the status says enough
  }
  return new ApiError(humanMessage(response.status, error), response.status);
}

/** The server's error, in words for the person at the page. */
export function humanMessage(status, error) {
  const message = (error.message || `HTTP ${status}`).replace(/[.\s]+$/, "");
  if (error.type === "invalid_image") {
    const reason = message.replace(/^messages\[\d+\]\.content\[\d+\]\.image_url: /, "");
    return `The server could not read the image: ${reason}.`;
  }
  if (status === 401) return "The server needs its API key.";
  if (status === 413) return `The image is too large for this server: ${message}.`;
  if (status === 408) return `The answer took too long: ${message}.`;
  if (status === 429) return "The server is still busy; try again in a moment.";
  if (status >= 500) return `The server failed: ${message}.`;
  return `The server refused the request: ${message}.`;
}
