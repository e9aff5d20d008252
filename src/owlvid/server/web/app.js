// owlvid web page: upload a video or images, see the frames the model gets, chat with streamed answers.
// Talks only to this server's own API (/v1/...): no build step, no third-party code, works offline.

const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem("owlvid-api-key") || "",
  model: null,
  limits: null, // {max_bytes, ttl} of uploads
  media: [], // uploads: {id, url, kind, filename, ...}
  history: [], // the OpenAI messages of the conversation so far
  controller: null, // AbortController of the answer being streamed
  uploadSeq: 0, // only the latest media choice may update the page
  previewSeq: 0, // only the latest preview may update the frame strip
};

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// -- talking to the server -------------------------------------------------------------------------

function authHeaders(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : { ...extra };
}

function errorFromBody(status, text) {
  try {
    const err = JSON.parse(text).error || {};
    return new ApiError(status, err.message || `HTTP ${status}`, err.code);
  } catch {
    return new ApiError(status, `the server answered HTTP ${status}`);
  }
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let res;
  try {
    res = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network");
  }
  const text = await res.text();
  if (!res.ok) throw errorFromBody(res.status, text);
  return JSON.parse(text);
}

function uploadFile(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/uploads?filename=${encodeURIComponent(file.name || "upload")}`);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(errorFromBody(xhr.status, xhr.responseText));
    };
    xhr.onerror = () => reject(new ApiError(0, "network"));
    xhr.send(file); // the browser streams the file: never read whole into the page
  });
}

// -- errors in plain words -------------------------------------------------------------------------

function plainWords(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err.message || err}`;
  const m = err.message;
  if (err.code === "upload_not_found") return "The uploaded file is gone (it expired). Choose it again.";
  switch (err.status) {
    case 0: return "The server cannot be reached. Is it still running?";
    case 401: return "The server needs a valid API key. Enter it above.";
    case 413: return `The file is too large for this server. (${m})`;
    case 415: return `This type of file is not supported: choose a video or images. (${m})`;
    case 503: return "The server is busy right now. Please try again in a moment.";
    case 504: return "The answer took too long and was stopped by the server.";
    default:
      if (err.code === "invalid_media") return `The file could not be read. (${m})`;
      return m;
  }
}

function showError(err) {
  $("error-text").textContent = typeof err === "string" ? err : plainWords(err);
  $("error").hidden = false;
  if (err instanceof ApiError && err.status === 401) askForKey();
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// -- API key ---------------------------------------------------------------------------------------

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

async function connect() {
  try {
    const [models, limits] = await Promise.all([api("/v1/models"), api("/v1/uploads")]);
    state.model = models.data[0].id;
    state.limits = limits;
    $("key-form").hidden = true;
    $("model-name").textContent = state.model; // last: the page is ready
    return true;
  } catch (err) {
    if (err.status === 401) {
      askForKey();
      if (state.key) showError("That API key was refused. Enter the server's API key.");
    } else {
      showError(err);
    }
    return false;
  }
}

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  clearError();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("owlvid-api-key", state.key);
  if (await connect()) $("prompt").focus();
});

// -- media -----------------------------------------------------------------------------------------

function setStatus(text) {
  $("media-status").textContent = text;
}

function samplingOptions() {
  const preset = $("preset").value;
  const opts = {};
  if (preset) opts.sampling = preset;
  const frames = $("num-frames").valueAsNumber;
  if (Number.isFinite(frames)) {
    // a count is a cap for the rate-based presets, an exact number for the even ones
    opts[["owl3", "fps", "all"].includes(preset) ? "max_frames" : "num_frames"] = Math.round(frames);
  }
  for (const id of ["fps", "start", "end"]) {
    const v = $(id).valueAsNumber;
    if (Number.isFinite(v)) opts[id] = v;
  }
  return opts;
}

function updateSamplingFields() {
  const preset = $("preset").value;
  $("fps").disabled = !["", "owl3", "fps"].includes(preset);
  $("num-frames").disabled = false;
}

function describeMedia(media) {
  if (!media.length) return "";
  if (media[0].kind === "video") {
    const v = media[0];
    return `${v.filename}: ${v.duration.toFixed(1)} s, ${v.total_frames} frames at ${v.fps.toFixed(2)} fps`;
  }
  return media.length === 1 ? `${media[0].filename}: ${media[0].width}×${media[0].height} image`
    : `${media.length} images`;
}

async function useMedia(load) {
  // `load` uploads the chosen media and returns the server's upload records
  clearError();
  const seq = ++state.uploadSeq;
  newConversation();
  state.media = [];
  $("frames").replaceChildren();
  try {
    const media = await load((text) => { if (seq === state.uploadSeq) setStatus(text); });
    if (seq !== state.uploadSeq) return;
    if (media.length > 1 && media.some((m) => m.kind === "video")) {
      throw new Error("choose one video, or one or more images");
    }
    state.media = media;
    setStatus(describeMedia(media));
    await refreshFrames();
  } catch (err) {
    if (seq !== state.uploadSeq) return;
    setStatus("");
    showError(err);
  }
}

function chooseFiles(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  const limit = state.limits && state.limits.max_bytes;
  const big = limit && files.find((f) => f.size > limit);
  if (big) {
    showError(`The file ${big.name} is too large for this server (${big.size} bytes; the limit is ${limit}).`);
    return;
  }
  useMedia(async (progress) => {
    const out = [];
    for (const [i, file] of files.entries()) {
      const label = files.length > 1 ? `${file.name} (${i + 1} of ${files.length})` : file.name;
      progress(`Uploading ${label}…`);
      out.push(await uploadFile(file, (p) => progress(`Uploading ${label}: ${Math.round(p * 100)}%`)));
    }
    progress("Checking…");
    return out;
  });
}

$("media-input").addEventListener("change", (e) => {
  chooseFiles(e.target.files);
  e.target.value = ""; // choosing the same file again is a new choice
});

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  chooseFiles(e.dataTransfer.files);
});

$("url-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const url = $("media-url").value.trim();
  if (!url) return;
  useMedia(async (progress) => {
    progress("Fetching the URL…");
    return [await api("/v1/uploads/url", { method: "POST", body: { url } })];
  });
});

// -- frame strip -----------------------------------------------------------------------------------

function frameFigure(frame, label) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = frame.image;
  img.alt = label;
  const cap = document.createElement("figcaption");
  cap.textContent = frame.time === null ? label : `${frame.time.toFixed(1)} s`;
  fig.append(img, cap);
  return fig;
}

async function refreshFrames() {
  const seq = ++state.previewSeq;
  const strip = $("frames");
  if (!state.media.length) {
    strip.replaceChildren();
    return;
  }
  strip.setAttribute("aria-busy", "true");
  try {
    const body = { mm_processor_kwargs: samplingOptions() };
    const previews = await Promise.all(
      state.media.map((m) => api(`/v1/uploads/${encodeURIComponent(m.id)}/frames`, { method: "POST", body })));
    if (seq !== state.previewSeq) return;
    const figures = [];
    previews.forEach((p, i) => p.frames.forEach((f) => {
      const label = p.object === "image_preview" ? `image ${i + 1}` : `frame ${f.index} at ${f.time.toFixed(2)} s`;
      figures.push(frameFigure(f, label));
    }));
    strip.replaceChildren(...figures);
    const video = previews.find((p) => p.object === "frame_preview");
    if (video) setStatus(`${describeMedia(state.media)} · the model sees ${video.num_frames} frames`);
    clearError();
  } catch (err) {
    if (seq !== state.previewSeq) return;
    strip.replaceChildren();
    showError(err);
  } finally {
    if (seq === state.previewSeq) strip.removeAttribute("aria-busy");
  }
}

let settingsTimer = null;
function settingsChanged() {
  updateSamplingFields();
  clearTimeout(settingsTimer);
  settingsTimer = setTimeout(() => { if (state.media.some((m) => m.kind === "video")) refreshFrames(); }, 250);
}
for (const id of ["preset", "num-frames", "fps", "start", "end"]) $(id).addEventListener("input", settingsChanged);

// -- chat ------------------------------------------------------------------------------------------

function addEntry(role, text) {
  const li = document.createElement("li");
  li.className = role;
  if (role === "assistant") {
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.dataset.testid = "answer";
    bubble.textContent = text;
    const stats = document.createElement("div");
    stats.className = "stats";
    li.append(bubble, stats);
  } else {
    li.textContent = text;
  }
  $("log").append(li);
  scrollLog();
  return li;
}

function scrollLog() {
  const log = $("log");
  log.scrollTop = log.scrollHeight; // only the conversation scrolls, never the page under the pointer
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function statsLine(t0, tFirst, tEnd, usage, seen, stopped) {
  const parts = [];
  if (tFirst !== null) parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  if (usage && tFirst !== null && usage.completion_tokens > 1 && tEnd > tFirst) {
    parts.push(`${((usage.completion_tokens - 1) / ((tEnd - tFirst) / 1000)).toFixed(1)} tokens/s`);
  }
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (seen.frames > 0) parts.push(`${seen.frames} frames`);
  if (seen.images > 0) parts.push(`${seen.images} image${seen.images > 1 ? "s" : ""}`);
  if (seen.cache) parts.push(`visual cache ${seen.cache}`);
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function ask(question) {
  clearError();
  const content = [];
  if (!state.history.length) { // the media ride with the first question; follow-ups refer back to them
    for (const m of state.media) {
      content.push(m.kind === "video" ? { type: "video_url", video_url: { url: m.url } }
        : { type: "image_url", image_url: { url: m.url } });
    }
  }
  content.push({ type: "text", text: question });
  const userMessage = { role: "user", content };
  const userEntry = addEntry("user", question);
  const entry = addEntry("assistant", "");
  const bubble = entry.querySelector(".bubble");
  bubble.classList.add("streaming");
  const body = {
    messages: [...state.history, userMessage], stream: true, stream_options: { include_usage: true },
    mm_processor_kwargs: samplingOptions(),
  };
  if (state.model) body.model = state.model;
  const maxTokens = $("max-tokens").valueAsNumber;
  if (Number.isFinite(maxTokens)) body.max_tokens = Math.round(maxTokens);

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null;
  let text = "";
  let usage = null;
  let stopped = false;
  let failed = false;
  const seen = { frames: 0, images: 0, cache: null };
  try {
    let res;
    try {
      res = await fetch("/v1/chat/completions", {
        method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify(body), signal: controller.signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network");
    }
    if (!res.ok) throw errorFromBody(res.status, await res.text());
    seen.frames = Number(res.headers.get("X-Owlvid-Frames") || 0);
    seen.images = Number(res.headers.get("X-Owlvid-Images") || 0);
    seen.cache = res.headers.get("X-Owlvid-Visual-Cache");
    for await (const event of sseEvents(res)) {
      if (event.error) throw new ApiError(event.error.code === "timeout" ? 504 : 500, event.error.message, event.error.code);
      if (event.usage) usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta.content;
      if (delta) {
        if (tFirst === null) tFirst = performance.now();
        text += delta;
        bubble.textContent = text;
        scrollLog();
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else { failed = true; showError(err); }
  } finally {
    state.controller = null;
    setBusy(false);
    bubble.classList.remove("streaming");
  }
  if (!text) { // nothing came: the question goes back to the box, the conversation is unchanged
    userEntry.remove();
    entry.remove();
    if (!$("prompt").value) $("prompt").value = question;
    return;
  }
  entry.querySelector(".stats").textContent = statsLine(t0, tFirst, performance.now(), usage, seen, stopped || failed);
  state.history.push(userMessage, { role: "assistant", content: text });
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("log").replaceChildren();
}

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("prompt").value.trim();
  if (!question || state.controller) return;
  $("prompt").value = "";
  ask(question);
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("ask-form").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-chat").addEventListener("click", () => { newConversation(); clearError(); $("prompt").focus(); });
$("error-close").addEventListener("click", clearError);

updateSamplingFields();
connect();
