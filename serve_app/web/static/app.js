"use strict";
// The flux-serve playground (docs/api.md): one page over the server's public API, no framework,
// no build step. When a key is set every call carries it in a header, so the event stream and the
// images are read with fetch() (an EventSource or a plain <img src> cannot send one) and images are
// shown from blob URLs. Text from the API only ever reaches the page through textContent.

const KEY_STORE = "flux-serve.api-key";
const RESULTS_STORE = "flux-serve.results";
const RESULTS_KEPT = 12;
const POLL_MS = 500;
const FINISHED = ["succeeded", "failed", "canceled"];
// The last part of an error's field path (`loc` or `details.field`) -> the id of the input at fault.
const FIELD_INPUTS = {
  model: "model", prompt: "prompt", trigger_word: "trigger", job_name: "job-name", loras: "lora", path: "lora",
  network_multiplier: "multiplier", width: "width", height: "height", sample_steps: "steps",
  guidance_scale: "guidance", seed: "seed", output_format: "format",
};

const $ = (id) => document.getElementById(id);
let models = [];
let running = null; // the job this page follows, {id, card}, while Cancel can end it

// ---- talking to the API -----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.details = error.details || {};
  }
}

const apiKey = () => localStorage.getItem(KEY_STORE) || "";

async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  const response = await fetch(path, { ...init, headers });
  if (!response.ok) throw new ApiError(response.status, await errorBody(response));
  return response;
}

async function errorBody(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.code === "string") return body.error;
  } catch (_) {
    // not our envelope (a proxy's error page, say)
  }
  return { code: `HTTP_${response.status}`, message: response.statusText || "the request failed" };
}

const getJson = async (path) => (await api(path)).json();

// Follows a job until it ends, calling onStatus at each change; returns the final status. The event
// stream is the way; a server without it (404 NOT_FOUND: no such route, unlike REQUEST_NOT_FOUND)
// or a stream that breaks off is polled instead.
async function follow(id, onStatus) {
  let response;
  try {
    response = await api(`v1/requests/${encodeURIComponent(id)}/events`, { headers: { Accept: "text/event-stream" } });
  } catch (error) {
    if (!(error instanceof ApiError && error.code === "NOT_FOUND")) throw error;
    return poll(id, onStatus);
  }
  try {
    for await (const message of serverSentEvents(response)) {
      if (message.event !== "status" && message.event !== "end") continue;
      const status = JSON.parse(message.data);
      onStatus(status);
      if (message.event === "end") return status;
    }
  } catch (error) {
    if (!(error instanceof TypeError)) throw error; // a TypeError: the connection broke
  }
  return poll(id, onStatus);
}

// Server-Sent Events read from a fetch() body: messages are separated by a blank line; each line is
// `field: value`; a line starting with ":" is a comment (the server's keep-alive).
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

async function poll(id, onStatus) {
  for (;;) {
    const status = await getJson(`v1/requests/${encodeURIComponent(id)}/status`);
    onStatus(status);
    if (FINISHED.includes(status.status)) return status;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// ---- the form ---------------------------------------------------------------------------------

async function loadModels() {
  clearErrors();
  try {
    models = (await getJson("v1/models")).models;
  } catch (error) {
    showError(error);
    return false;
  }
  $("key-section").hidden = !apiKey();
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  const wanted = [chosen, "flux"].find((id) => models.some((m) => m.id === id));
  select.value = wanted || models[0].id;
  const model = selectedModel();
  if (!$("width").value) $("width").value = model.default_width;
  if (!$("height").value) $("height").value = model.default_height;
  applyModelDefaults();
  $("generate").disabled = false;
  return true;
}

const selectedModel = () => models.find((m) => m.id === $("model").value);

// Steps and guidance are per model, so a change of model brings its own; the size default is the API's.
function applyModelDefaults() {
  const model = selectedModel();
  $("model-description").textContent = `${model.kind}: ${model.description}`;
  $("steps").value = model.default_steps;
  $("guidance").value = model.default_guidance_scale;
  $("job-name-field").hidden = model.kind !== "preview";
}

// The server's own LoRA files, offered by the LoRA field (any other path or URL can still be typed). A
// server without the route, or an answer that fails, offers none: suggestions are no reason for an error.
async function suggestLoras() {
  let files = [];
  try {
    files = (await getJson("v1/loras")).loras;
  } catch (_) {
    // no suggestions
  }
  $("lora-files").replaceChildren(...files.map((f) => el("option", { value: f.path, label: sizeText(f.size_bytes) })));
}

function sizeText(bytes) {
  const units = ["KiB", "MiB", "GiB"];
  let size = bytes;
  let unit = "bytes";
  for (const next of units) {
    if (size < 1024) break;
    size /= 1024;
    unit = next;
  }
  return unit === "bytes" ? `${bytes} bytes` : `${size.toFixed(1)} ${unit}`;
}

// An empty field is left out (the API's default). Anything else is sent as typed, so the API judges it
// and its error lands beside the field; seeds past 2^53 go as digit strings, which JSON numbers in
// JavaScript would round.
function numberOrText(text) {
  const value = text.trim();
  if (value === "") return undefined;
  const number = Number(value);
  if (Number.isFinite(number) && (!/^-?\d+$/.test(value) || Number.isSafeInteger(number))) return number;
  return value;
}

function buildRequest() {
  const prompt = { prompt: $("prompt").value };
  const numbers = { width: "width", height: "height", sample_steps: "steps", guidance_scale: "guidance", seed: "seed" };
  for (const [field, id] of Object.entries(numbers)) {
    const value = numberOrText($(id).value);
    if (value !== undefined) prompt[field] = value;
  }
  const body = { model: $("model").value };
  if ($("trigger").value.trim()) body.trigger_word = $("trigger").value.trim();
  if (!$("job-name-field").hidden && $("job-name").value.trim()) body.job_name = $("job-name").value.trim();
  body.prompts = [prompt];
  if ($("lora").value.trim()) {
    const lora = { path: $("lora").value.trim() };
    const multiplier = numberOrText($("multiplier").value);
    if (multiplier !== undefined) lora.network_multiplier = multiplier;
    body.loras = [lora];
  }
  body.output_format = $("format").value;
  return body;
}

// The request exactly as sent, for a shell; the key stays a variable, never its value.
function curlCommand(url, bodyText) {
  const quote = (text) => `'${text.replace(/'/g, "'\\''")}'`;
  const lines = [`curl -X POST ${quote(url)}`, "-H 'Content-Type: application/json'"];
  if (apiKey()) lines.push('-H "Authorization: Bearer $FLUX_SERVE_API_KEY"');
  lines.push(`-d ${quote(bodyText)}`);
  return lines.join(" \\\n  ");
}

async function generate(event) {
  event.preventDefault();
  clearErrors();
  const body = buildRequest();
  const bodyText = JSON.stringify(body);
  const url = new URL("v1/inference", document.baseURI).href;
  $("generate").disabled = true;
  showProgress({ status: "submitting" });
  try {
    const job = await (await api(url, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: bodyText,
    })).json();
    const entry = {
      request_id: job.request_id, model: body.model, prompt: body.prompts[0].prompt,
      curl: curlCommand(url, bodyText), status: "in_queue", images: [],
    };
    const card = addCard(entry);
    card.querySelector("details").open = true; // the request just sent, ready to copy
    running = { id: job.request_id, card };
    $("cancel").disabled = false;
    $("cancel").hidden = false;
    const final = await follow(job.request_id, (status) => {
      showProgress(status);
      setCardStatus(card, status);
    });
    entry.status = final.status;
    if (final.status === "succeeded") {
      const result = await getJson(`v1/requests/${encodeURIComponent(job.request_id)}/result`);
      entry.images = result.outputs.images.map(({ index, seed, width, height, format, url: src }) =>
        ({ index, seed, width, height, format, url: src }));
    } else {
      entry.error_code = final.error_code;
      entry.error = final.error;
      // A cancel is what someone asked for: the progress line and the card say so, not the form's errors.
      if (final.status !== "canceled") {
        showError(new ApiError(0, { code: final.error_code || final.status.toUpperCase(), message: final.error || "" }));
      }
    }
    remember(entry);
    fillCard(card, entry);
  } catch (error) {
    showProgress({ status: "failed" });
    showError(error);
  } finally {
    running = null;
    $("cancel").hidden = true;
    $("generate").disabled = false;
  }
}

// DELETE ends the job wherever it is (queued work never runs; a running image stops at its next step); its
// answer is the job's status, now canceled, and the event stream then ends the job here as well.
async function cancel() {
  if (!running) return;
  const { id, card } = running;
  $("cancel").disabled = true;
  try {
    const status = await (await api(`v1/requests/${encodeURIComponent(id)}`, { method: "DELETE" })).json();
    showProgress(status);
    setCardStatus(card, status);
  } catch (error) {
    showError(error);
    $("cancel").disabled = false;
  }
}

function showProgress(status) {
  const bar = $("progress");
  const p = status.progress;
  let text = status.status.replace("_", " ");
  if (status.status === "succeeded") {
    bar.value = 1;
  } else if (FINISHED.includes(status.status)) {
    if (!bar.hasAttribute("value")) bar.value = 0; // no longer indeterminate
    text += status.error_code ? `: ${status.error_code}` : "";
  } else if (p && p.images && p.steps) {
    bar.value = (p.images_done + p.step / p.steps) / p.images;
    text += `: step ${p.step} of ${p.steps}, image ${Math.min(p.images_done + 1, p.images)} of ${p.images}`;
  } else {
    bar.removeAttribute("value"); // indeterminate until the server reports steps
  }
  $("progress-text").textContent = text;
}

// ---- errors: the API's code and message, beside the field at fault, as text -----------------

function inputFor(path) {
  const parts = Array.isArray(path) ? path.map(String) : String(path || "").split(/[.[\]]+/);
  const part = parts.reverse().find((p) => p in FIELD_INPUTS);
  return part ? FIELD_INPUTS[part] : "form";
}

function inputForError(error) {
  if (error.code === "UNAUTHORIZED") return "api-key";
  if (error.code === "MODEL_NOT_FOUND") return "model";
  if (/^LORA_|^SINGLE_LORA_ONLY$/.test(error.code) || error.details.path) return "lora";
  return inputFor(error.details.field);
}

function showError(error) {
  if (!(error instanceof ApiError)) {
    say("form", `${error.name}: ${error.message}`); // the server could not be reached
    return;
  }
  if (error.code === "UNAUTHORIZED") $("key-section").hidden = false;
  const problems = error.code === "VALIDATION_ERROR" && Array.isArray(error.details.errors) ? error.details.errors : [];
  if (!problems.length) {
    say(inputForError(error), `${error.code}: ${error.message}`);
    return;
  }
  for (const problem of problems) {
    const where = (problem.loc || []).slice(1).join(".");
    say(inputFor(problem.loc), `${error.code}: ${where ? `${where}: ` : ""}${problem.msg}`);
  }
}

function say(input, text) {
  const box = $(`${input}-error`) || $("form-error");
  box.textContent = box.textContent ? `${box.textContent}\n${text}` : text;
  if ($(input)) $(input).setAttribute("aria-invalid", "true");
}

function clearErrors() {
  for (const box of document.querySelectorAll(".field-error")) box.textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

// ---- results: this browser's last few, kept in local storage, images fetched again ------------

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function storedResults() {
  try {
    const list = JSON.parse(localStorage.getItem(RESULTS_STORE));
    return Array.isArray(list) ? list : [];
  } catch (_) {
    return [];
  }
}

function remember(entry) {
  const list = [entry, ...storedResults().filter((e) => e.request_id !== entry.request_id)];
  localStorage.setItem(RESULTS_STORE, JSON.stringify(list.slice(0, RESULTS_KEPT)));
}

function addCard(entry, atEnd = false) {
  const curl = el("textarea", { className: "curl", readOnly: true, rows: 8, value: entry.curl,
                                ariaLabel: "The request as a curl command" });
  const copy = el("button", { type: "button", textContent: "Copy" });
  copy.addEventListener("click", () => copyText(curl, copy));
  const card = el("li", { className: "card" }, [
    el("div", { className: "images" }),
    el("p", { className: "meta" }, [el("strong", { textContent: entry.model }), ` ${entry.prompt}`]),
    el("p", { className: "status", textContent: entry.status }),
    el("details", {}, [el("summary", { textContent: "Request as curl" }), curl, copy]),
  ]);
  card.dataset.requestId = entry.request_id;
  const list = $("results");
  if (atEnd) list.append(card);
  else list.prepend(card);
  while (list.children.length > RESULTS_KEPT) dropCard(list.lastElementChild);
  return card;
}

function dropCard(card) {
  for (const link of card.querySelectorAll("a[download]")) URL.revokeObjectURL(link.href);
  card.remove();
}

function setCardStatus(card, status) {
  const error = status.error_code ? `: ${status.error_code}: ${status.error || ""}` : "";
  card.querySelector(".status").textContent =
    `${status.status.replace("_", " ")}${error} · request ${card.dataset.requestId}`;
}

async function fillCard(card, entry) {
  setCardStatus(card, entry);
  const box = card.querySelector(".images");
  for (const image of entry.images) {
    const figure = el("figure");
    box.append(figure);
    try {
      const src = URL.createObjectURL(await (await api(image.url)).blob());
      const name = `${entry.request_id}-${image.index}.${image.format === "jpeg" ? "jpg" : image.format}`;
      figure.append(
        el("img", { className: "result", src, width: image.width, height: image.height,
                    alt: `${entry.model}, seed ${image.seed}: ${entry.prompt}` }),
        el("figcaption", {}, [`seed ${image.seed} · ${image.width}×${image.height} · `,
                              el("a", { href: src, download: name, textContent: "download" })]),
      );
    } catch (error) {
      const text = error.code === "REQUEST_NOT_FOUND"
        ? `seed ${image.seed}: expired on the server (it keeps results for a limited time)`
        : `seed ${image.seed}: ${error.code || error.name}: ${error.message}`;
      figure.append(el("p", { className: "note", textContent: text }));
    }
  }
}

async function copyText(textarea, button) {
  try {
    await navigator.clipboard.writeText(textarea.value);
    button.textContent = "Copied";
  } catch (_) {
    // the Clipboard API needs a secure context (https or localhost): leave it selected instead
    textarea.select();
    button.textContent = "Selected: press Ctrl+C";
  }
}

function showStoredResults() {
  for (const card of [...$("results").children]) dropCard(card);
  for (const entry of storedResults()) fillCard(addCard(entry, true), entry);
}

// ---- start --------------------------------------------------------------------------------

async function start() {
  if (!(await loadModels())) {
    $("lora-files").replaceChildren(); // a forgotten or refused key takes the server's file names with it
    return;
  }
  showStoredResults();
  suggestLoras();
}

async function useKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  await start();
}

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
$("model").addEventListener("change", applyModelDefaults);
$("save-key").addEventListener("click", () => useKey($("api-key").value.trim()));
$("forget-key").addEventListener("click", () => useKey(""));
$("api-key").addEventListener("keydown", (event) => {
  if (event.key !== "Enter") return;
  event.preventDefault(); // Enter here means "use this key", not "generate"
  useKey($("api-key").value.trim());
});
start();
