// The page: pick an image, caption it or ask about it, see the answer stream in.
// api.js talks to the server, images.js reads images, requests.js builds requests and code.

import { ApiError, fetchConfig, serverBase, streamChat } from "./api.js";
import { imageFromFile, imageFromUrl, megabytes } from "./images.js";
import { chatBody, curlCommand, pythonCode } from "./requests.js";

const KEY_STORAGE = "blipserve-api-key"; // sessionStorage: this tab only
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const state = {
  config: null,
  image: null, // see images.js
  turns: [], // {question, answer}: the conversation about the current image
  busy: false,
  key: sessionStorage.getItem(KEY_STORAGE),
  keyArrived: null, // resolves the request that waits for a key
};

// -- start-up -------------------------------------------------------------------------

async function start() {
  wireImagePicking();
  wireConversation();
  wireSettingsAndCode();
  for (;;) {
    try {
      state.config = await fetchConfig();
    } catch (error) {
      setStatus(`${error.message} Retrying…`);
      await sleep(2000);
      continue;
    }
    if (state.config.load_error) return setStatus(`The model did not load: ${state.config.load_error}`);
    if (state.config.ready) break;
    setStatus(`Loading the model ${state.config.model}…`);
    await sleep(2000);
  }
  showLimits(state.config);
  setStatus(`Model: ${state.config.model}. Choose an image, then press Caption or ask a question.`);
  if (state.config.api_key_required && !state.key) askForKey(false);
  refreshCode();
}

function setStatus(text) {
  $("status").textContent = text;
}

// -- the image ------------------------------------------------------------------------

function wireImagePicking() {
  const drop = $("drop");
  $("image").addEventListener("change", (event) => useFile(event.target.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) return useFile(file);
    const url = event.dataTransfer.getData("text/uri-list").split("\n")[0];
    if (url) useUrl(url);
  });
  document.addEventListener("paste", (event) => {
    const file = event.clipboardData && event.clipboardData.files[0];
    if (!file) return; // pasted text goes where the cursor is
    event.preventDefault();
    useFile(file);
  });
  $("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useUrl($("image-url").value);
  });
}

async function useFile(file) {
  if (!file) return;
  const maxBytes = state.config ? state.config.max_image_bytes : 20 * 2 ** 20;
  try {
    setImage(await imageFromFile(file, maxBytes), `${file.name || "pasted image"}, ${megabytes(file.size)}`);
  } catch (error) {
    showImageError(error.message);
  }
}

function useUrl(text) {
  try {
    const image = imageFromUrl(text);
    setImage(image, image.name);
  } catch (error) {
    showImageError(error.message);
  }
}

function setImage(image, description) {
  state.image = image;
  state.turns = [];
  showImageError(null);
  const thumbnail = $("thumbnail");
  thumbnail.hidden = !image.thumbnail;
  thumbnail.alt = `The image: ${image.name}`;
  thumbnail.onerror = () => {
    thumbnail.hidden = true;
    $("image-name").textContent = `${description} (no preview here; the server will fetch it)`;
  };
  if (image.thumbnail) thumbnail.src = image.thumbnail;
  $("image-name").textContent = description;
  addNote(`New image: ${image.name}. A new conversation starts.`);
  refreshCode();
}

function showImageError(message) {
  const box = $("image-error");
  box.hidden = !message;
  box.textContent = message || "";
}

// -- the conversation -----------------------------------------------------------------

function wireConversation() {
  $("message-form").addEventListener("submit", (event) => {
    event.preventDefault(); // Enter in the message box lands here too
    const question = $("message").value.trim();
    if (!question) return setStatus("Type a question first, or press Caption.");
    converse(question);
  });
  $("caption").addEventListener("click", () => converse(null));
  $("message").addEventListener("input", refreshCode);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    $("key-form").hidden = true;
    if (state.keyArrived) state.keyArrived();
  });
}

/** Ask `question` about the image (null: caption it) and stream the answer into the log. */
async function converse(question) {
  if (state.busy) return setStatus("Wait for the answer to finish.");
  if (!state.image) {
    showImageError("Choose an image first.");
    return $("image").focus();
  }
  const settings = readSettings();
  if (!settings) return;
  const conversation = { image: state.image, turns: state.turns, question };
  const body = chatBody(state.config.model, conversation, settings);
  addTurn("user", question === null ? "Caption" : question);
  const reply = addTurn("assistant", "");
  state.busy = true;
  $("log").setAttribute("aria-busy", "true");
  if (question !== null) $("message").value = "";
  try {
    const result = await withKey(body, {
      onDelta: (text) => {
        reply.answer.textContent += text;
        scrollLog();
      },
      onWait: (seconds, why) => {
        reply.stats.textContent = `${why}; retrying in ${seconds} s…`;
      },
      onKey: () => {
        reply.stats.textContent = "Waiting for the API key…";
      },
    });
    if (!result.text) reply.answer.textContent = "(an empty answer)";
    reply.stats.textContent = describe(result, settings);
    reply.element.dataset.finish = result.finishReason || "";
    if (question !== null) state.turns.push({ question, answer: result.text });
  } catch (error) {
    reply.element.classList.add("error");
    reply.answer.textContent = error.message;
    reply.stats.textContent = "";
  } finally {
    reply.element.classList.remove("pending");
    state.busy = false;
    $("log").removeAttribute("aria-busy");
    scrollLog();
    refreshCode();
  }
}

/** streamChat, asking for the API key whenever the server answers 401, then retrying. */
async function withKey(body, hooks) {
  for (;;) {
    try {
      return await streamChat(body, state.key, hooks);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) throw error;
      hooks.onKey();
      askForKey(Boolean(state.key));
      await new Promise((resolve) => {
        state.keyArrived = resolve;
      });
    }
  }
}

function askForKey(refused) {
  $("key-note").textContent = refused
    ? "The server refused that key. Enter the right one; it is kept for this tab only."
    : "This server needs its API key. It is kept for this tab only.";
  $("key-form").hidden = false;
  $("api-key").value = "";
  $("api-key").focus();
}

function describe(result, settings) {
  const parts = [];
  if (result.firstAt !== null) {
    parts.push(`first token ${seconds(result.firstAt - result.started)}`);
  }
  if (result.tokens) {
    // Decoding speed after the first token; a beam search answer arrives at once, so its
    // speed is over the whole answer.
    const streamed = settings.numBeams === 1 && result.tokens > 1 && result.firstAt !== null;
    const span = streamed ? result.endedAt - result.firstAt : result.endedAt - result.started;
    const count = streamed ? result.tokens - 1 : result.tokens;
    if (span > 0) parts.push(`${((count * 1000) / span).toFixed(1)} tokens/s`);
    parts.push(`${result.tokens} tokens`);
  }
  parts.push(`finish: ${result.finishReason || "unknown"}`);
  return parts.join(" · ");
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function addTurn(role, text) {
  const element = document.createElement("div");
  element.className = `turn ${role}${role === "assistant" ? " pending" : ""}`;
  const answer = document.createElement("p");
  answer.className = role === "assistant" ? "answer" : "question";
  answer.textContent = text;
  element.append(answer);
  const stats = document.createElement("p");
  if (role === "assistant") {
    stats.className = "stats";
    element.append(stats);
  }
  $("log").append(element);
  scrollLog();
  return { element, answer, stats };
}

function addNote(text) {
  const note = document.createElement("div");
  note.className = "turn note";
  note.textContent = text;
  $("log").append(note);
  scrollLog();
}

function scrollLog() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

// -- settings and code ------------------------------------------------------------------

function wireSettingsAndCode() {
  $("do-sample").addEventListener("change", () => {
    const off = !$("do-sample").checked;
    $("temperature").disabled = off;
    $("top-p").disabled = off;
  });
  $("settings-form").addEventListener("input", refreshCode);
  $("settings-form").addEventListener("submit", (event) => event.preventDefault());
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copy(button));
  }
}

function showLimits(config) {
  const { limits } = config;
  const inputs = {
    "max-new-tokens": limits.max_new_tokens,
    "num-beams": limits.num_beams,
    temperature: limits.temperature,
    "top-p": limits.top_p,
    seed: limits.seed,
  };
  for (const [id, limit] of Object.entries(inputs)) {
    $(id).min = limit.min;
    $(id).max = limit.max;
  }
  $("max-new-tokens").placeholder = `model default (${config.default_max_new_tokens})`;
  $("limits").textContent =
    `Limits: max new tokens ${limits.max_new_tokens.min}–${limits.max_new_tokens.max} ` +
    `(the image, the conversation and the answer share the model's ${config.context_length} ` +
    `positions), beams ${limits.num_beams.min}–${limits.num_beams.max} (not with sampling), ` +
    `temperature ${limits.temperature.min}–${limits.temperature.max} (0: greedy), ` +
    `top-p ${limits.top_p.min}–${limits.top_p.max}, seed ${limits.seed.min}–${limits.seed.max}.`;
}

/** The settings, checked against the server's limits; null (and a message) if one is off. */
function readSettings({ quiet = false } = {}) {
  const problems = [];
  const number = (id, label, { integer = false, optional = false } = {}) => {
    const input = $(id);
    const raw = input.value.trim();
    if (raw === "" && optional) return null;
    const value = Number(raw);
    const { min, max } = input;
    if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      problems.push(`${label} must be ${integer ? "a whole number" : "a number"}.`);
    } else if (value < Number(min) || value > Number(max)) {
      problems.push(`${label} must be between ${min} and ${max}.`);
    }
    return value;
  };
  const sample = $("do-sample").checked;
  const settings = {
    maxNewTokens: number("max-new-tokens", "Max new tokens", { integer: true, optional: true }),
    numBeams: number("num-beams", "Beams", { integer: true }),
    sample,
    temperature: sample ? number("temperature", "Temperature") : null,
    topP: sample ? number("top-p", "Top-p") : null,
    seed: number("seed", "Seed", { integer: true, optional: true }),
  };
  if (sample && settings.numBeams > 1) {
    problems.push("Beam search does not sample: set Beams to 1 or turn Sampling off.");
  }
  if (quiet) return problems.length ? null : settings;
  const box = $("settings-error");
  box.hidden = !problems.length;
  box.textContent = problems.join(" ");
  if (!problems.length) return settings;
  $("settings").open = true;
  return null;
}

function refreshCode() {
  let curl = "Choose an image first.";
  let python = curl;
  const settings = state.config && readSettings({ quiet: true });
  if (state.image && !settings) curl = python = "Fix the settings first.";
  if (state.image && settings) {
    const question = $("message").value.trim() || null;
    const conversation = { image: state.image, turns: state.turns, question };
    const needsKey = state.config.api_key_required;
    curl = curlCommand(serverBase(), conversation, settings, needsKey);
    python = pythonCode(serverBase(), state.config.model, conversation, settings, needsKey);
  }
  $("code-curl").textContent = curl;
  $("code-python").textContent = python;
}

async function copy(button) {
  const text = $(button.dataset.copy).textContent;
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text); // needs a secure context (https or localhost)
    button.textContent = "Copied";
  } catch {
    const range = document.createRange(); // elsewhere: select it for Ctrl+C
    range.selectNodeContents($(button.dataset.copy));
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => {
    button.textContent = label;
  }, 2000);
}

start();
