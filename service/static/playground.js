// The playground page: a form that POSTs a generation, follows it over server-sent events,
// and shows the result. Talks to the public API only; no framework, no build step.

import { ApiError, createApi, describeError } from "./api.js";
import { loadRecent, remember, renderGallery } from "./gallery.js";
import { stageName, stageTimings } from "./stages.js";

const KEY_STORAGE = "selfcascade.apiKey";
const POLL_INTERVAL_MS = 500;
const BACKSTOP_POLL_MS = 4000;
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 15000;
const $ = (id) => document.getElementById(id);

const ui = {
  form: $("generate-form"),
  prompt: $("prompt"),
  negative: $("negative_prompt"),
  width: $("width"),
  height: $("height"),
  customSize: $("custom-size"),
  seed: $("seed"),
  steps: $("steps"),
  tuned: $("tuned"),
  tunedHint: $("tuned-hint"),
  apiKey: $("api-key"),
  generate: $("generate"),
  cancel: $("cancel"),
  error: $("error"),
  status: $("status"),
  notice: $("notice"),
  stageLabel: $("stage-label"),
  percent: $("percent"),
  progress: $("progress"),
  progressText: $("progress-text"),
  figure: $("figure"),
  image: $("result-image"),
  video: $("result-video"),
  videoFields: $("video-fields"),
  numFrames: $("num_frames"),
  fps: $("fps"),
  outputFormat: $("output_format"),
  caption: $("caption"),
  placeholder: $("placeholder"),
  gallery: $("gallery"),
  modelInfo: $("model-info"),
  modelChoice: $("model-choice"),
  modelSelect: $("model"),
  readiness: $("readiness"),
};

const api = createApi(() => ui.apiKey.value.trim());
let model = null;
let models = []; // GET /v1/models' list: the picker's choices
let current = null; // { id, stop }

function selectedValue(name) {
  return ui.form.querySelector(`input[name="${name}"]:checked`).value;
}

function requestBody() {
  const method = selectedValue("method");
  const body = {
    prompt: ui.prompt.value,
    method,
    model: model ? model.name : undefined,
    // Upsamplers work inside self-cascade stages; the API refuses tuned with direct.
    tuned: method === "self_cascade" && ui.tuned.checked,
    steps: numberOrUndefined(ui.steps.value),
    seed: numberOrUndefined(ui.seed.value),
  };
  if (ui.negative.value.trim()) body.negative_prompt = ui.negative.value;
  if (model && model.produces === "video") {
    body.num_frames = numberOrUndefined(ui.numFrames.value);
    body.fps = numberOrUndefined(ui.fps.value);
    body.output_format = ui.outputFormat.value;
  }
  const preset = selectedValue("preset");
  if (preset === "custom") {
    body.width = numberOrUndefined(ui.width.value);
    body.height = numberOrUndefined(ui.height.value);
  } else if (model) {
    body.width = model.native_width * Number(preset);
    body.height = model.native_height * Number(preset);
  }
  return body;
}

function numberOrUndefined(text) {
  return text.trim() === "" ? undefined : Number(text);
}

function setStatus(status, text = status) {
  ui.status.dataset.status = status;
  ui.status.textContent = text;
}

function setProgress(fraction, label) {
  ui.progress.value = Math.round(fraction * 1000) / 10;
  ui.progress.setAttribute("aria-valuetext", `${label}, ${Math.round(fraction * 100)}%`);
  ui.percent.textContent = `${Math.round(fraction * 100)}%`;
  // Announce stage changes, not every step: a screen reader would drown in percentages.
  if (ui.stageLabel.textContent !== label) {
    ui.stageLabel.textContent = label;
    ui.progressText.textContent = label;
  }
}

function showError(message, param) {
  ui.error.textContent = message;
  ui.error.hidden = false;
  const field = param && document.getElementById(param);
  if (field) {
    field.setAttribute("aria-invalid", "true");
    if (field.offsetParent !== null) field.focus();
  }
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
  for (const field of ui.form.querySelectorAll("[aria-invalid]")) {
    field.removeAttribute("aria-invalid");
  }
}

function setBusy(busy) {
  ui.generate.disabled = busy;
  ui.cancel.disabled = !busy;
}

async function submit(event) {
  event.preventDefault();
  clearError();
  stopFollowing();
  setBusy(true);
  try {
    const job = await api.create(requestBody());
    follow(job);
  } catch (error) {
    setBusy(false);
    setStatus("idle");
    if (!(error instanceof ApiError)) throw error;
    showError(describeError(error), error.param);
  }
}

function follow(job) {
  current = { id: job.id, stop: () => {} };
  setBusy(true);
  ui.progress.value = 0;
  ui.percent.textContent = "";
  ui.stageLabel.textContent = "";
  onView(job);
  if (isTerminal(job.status)) return;
  // EventSource cannot send an Authorization header: with a key, poll the job instead.
  current.stop = ui.apiKey.value.trim() ? poll(job.id, POLL_INTERVAL_MS) : listen(job.id);
}

function listen(id) {
  const source = new EventSource(`/v1/generations/${id}/events`);
  const handle = (message) => {
    const event = JSON.parse(message.data);
    clearNotice();  // the stream is alive, so the server is back
    if (event.status === "queued") setStatus("queued");
    if (event.type === "started") setStatus("running", "running");
    if (event.progress) setProgress(event.progress.fraction, stageName(event.progress));
    if (["succeeded", "failed", "canceled"].includes(event.status)) {
      // The job record holds the outputs: read it now, and keep trying if that read fails.
      source.close();
      stopBackstop();
      if (current && current.id === id) current.stop = poll(id, POLL_INTERVAL_MS, 0);
    }
  };
  for (const type of ["queued", "started", "progress", "requeued", "succeeded", "failed",
    "canceled"]) {
    source.addEventListener(type, handle);
  }
  // A dropped stream or the server's own `event: error` (Redis gone): fall back to polling,
  // which retries through the outage and says so, instead of a silent spinner.
  source.addEventListener("error", () => {
    if (current && current.id === id && source.readyState !== EventSource.OPEN) {
      source.close();
      stopBackstop();
      current.stop = poll(id, POLL_INTERVAL_MS);
    }
  });
  // A stream that stalls without closing (a proxy buffering it, say) must not freeze the page:
  // a slow poll alongside it notices the end of the job anyway.
  const stopBackstop = poll(id, BACKSTOP_POLL_MS);
  return () => {
    source.close();
    stopBackstop();
  };
}

// Reads job `id` every `intervalMs` until it ends, stops being the job on show, or the server
// no longer knows it (404). A failed read (the API restarting, Redis away for a moment, the
// network down) does not end it: the next try waits longer each time, 1 s doubling to at most
// 15 s (never less than `intervalMs`, nor than a Retry-After the server sends, up to that cap),
// and a notice says so until a read gets through.
function poll(id, intervalMs, firstDelayMs = intervalMs) {
  let timer = null;
  let stopped = false;
  let failures = 0;
  const following = () => !stopped && current !== null && current.id === id;
  const tick = async () => {
    let job;
    try {
      job = await api.get(id);
    } catch (error) {
      if (!following()) return;
      if (error instanceof ApiError && error.status === 404) {
        lost(error);
        return;
      }
      // fetch rejects with a TypeError when the network fails; anything else is a bug worth
      // seeing in the console, but still no reason to stop following the job.
      if (!(error instanceof ApiError) && !(error instanceof TypeError)) console.error(error);
      failures += 1;
      const delay = retryDelay(failures, intervalMs, error);
      showNotice(retryNotice(error, delay));
      timer = setTimeout(tick, delay);
      return;
    }
    if (!following()) return;
    failures = 0;
    clearNotice();
    onView(job);
    if (following() && !isTerminal(job.status)) timer = setTimeout(tick, intervalMs);
  };
  timer = setTimeout(tick, firstDelayMs);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function retryDelay(failures, intervalMs, error) {
  const backoff = RETRY_FIRST_MS * 2 ** Math.min(failures - 1, 10);
  const asked = error instanceof ApiError ? Number(error.retryAfter) * 1000 || 0 : 0;
  return Math.min(RETRY_MAX_MS, Math.max(backoff, asked, intervalMs));
}

function retryNotice(error, delayMs) {
  const why = error instanceof ApiError && error.status !== 0
    ? ` (${error.status} ${error.message})`
    : "";
  const seconds = Math.round(delayMs / 100) / 10;
  return `Connection lost${why}, retrying in ${seconds} s… The job goes on on the server.`;
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

function clearNotice() {
  ui.notice.hidden = true;
  ui.notice.textContent = "";
}

// The server no longer knows the job (its record expired, or it never existed for this key):
// there is nothing left to follow.
function lost(error) {
  stopFollowing();
  setBusy(false);
  setStatus("gone", "not found");
  showError(
    `This generation is no longer on the server (${error.message}); it may have expired.` +
      " Start a new one.",
    null,
  );
}

const isTerminal = (status) => ["succeeded", "failed", "canceled"].includes(status);

function onView(job) {
  if (job.status === "queued") {
    const position = job.queue_position;
    setStatus("queued", position ? `queued (${position} ahead)` : "queued");
  } else {
    setStatus(job.status);
  }
  if (job.progress) setProgress(job.progress.fraction, stageName(job.progress));
  if (!isTerminal(job.status)) return;
  setBusy(false);
  current.stop();
  if (job.status === "succeeded") {
    setProgress(1, "done");
    showResult(job);
  } else if (job.status === "failed" && job.error) {
    showError(`The generation failed (${job.error.code}): ${job.error.message}`, null);
  }
}

async function showResult(job) {
  const output = job.outputs[0];
  if (!output) return;
  // A video job's outputs are the clip and its poster (a still of the first frame).
  const poster = job.outputs.find((o) => o.role === "poster");
  let src;
  let posterSrc;
  try {
    src = await api.imageUrl(output.url);
    posterSrc = poster ? await api.imageUrl(poster.url) : null;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    showError(describeError(error), null);
    return;
  }
  // A gif is a video job's output but plays in an <img>; mp4 and webm need a <video>.
  const isVideo = output.role === "video" && output.format !== "gif";
  const shown = isVideo ? ui.video : ui.image;
  ui.image.hidden = isVideo;
  ui.video.hidden = !isVideo;
  if (isVideo) {
    ui.image.removeAttribute("src");
    ui.video.poster = posterSrc || "";
    ui.video.src = src;
  } else {
    ui.video.removeAttribute("src");
    ui.image.src = src;
  }
  const kind = output.role === "video" ? "clip" : "image";
  const label = `Generated ${kind} for “${job.params.prompt}”, ${output.width}×${output.height}`;
  shown.setAttribute("aria-label", label);
  ui.image.alt = isVideo ? "" : label;
  // Tiny test-model results stay crisp when shown large.
  shown.classList.toggle("pixelated", output.width < 384);
  ui.caption.replaceChildren(...captionParts(job, output, src));
  ui.figure.hidden = false;
  ui.placeholder.hidden = true;
  renderGallery(ui.gallery, remember(job), openJob, api.imageUrl);
}

function captionParts(job, output, src) {
  const m = job.metrics || {};
  const stages = stageTimings(m);
  const facts = [
    `${output.width}×${output.height}`,
    output.frames ? `${output.frames} frames at ${output.fps} fps (${output.duration_s} s)` : null,
    `seed ${job.params.seed}`,
    job.params.method === "direct" ? "direct" : "self-cascade",
    m.tuned ? "tuned" : null,
    m.inference_s != null ? `${m.inference_s.toFixed(2)} s total` : null,
    m.unet_evaluations != null ? `${m.unet_evaluations} UNet evaluations` : null,
  ].filter(Boolean);
  const line = (text, className) => {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    return span;
  };
  const link = document.createElement("a");
  link.href = src;
  link.download = `selfcascade-${job.id.slice(0, 8)}.${output.format}`;
  link.textContent = "Download";
  return [
    line(job.params.prompt, "prompt"),
    line(facts.join(" · "), "facts"),
    line(stages.join(" · "), "timings"),
    link,
  ];
}

async function cancelCurrent() {
  if (!current) return;
  ui.cancel.disabled = true;
  try {
    const id = current.id;
    const job = await api.cancel(id);
    if (current && current.id === id) onView(job);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    showError(describeError(error), null);
    if (current) ui.cancel.disabled = false;  // still following: a second try may get through
  }
}

function stopFollowing() {
  if (current) current.stop();
  current = null;
  clearNotice();
}

async function openJob(id) {
  clearError();
  stopFollowing();
  try {
    follow(await api.get(id));
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    showError(describeError(error), null);
  }
}

function applyModel(found) {
  model = found;
  ui.modelInfo.textContent =
    `${model.name} · native ${model.native_width}×${model.native_height}` +
    ` · ${model.loaded_by_workers} worker${model.loaded_by_workers === 1 ? "" : "s"}`;
  for (const dims of document.querySelectorAll(".dims")) {
    const scale = Number(dims.dataset.scale);
    dims.textContent = `${model.native_width * scale}×${model.native_height * scale}`;
  }
  ui.width.value = model.native_width * 2;
  ui.height.value = model.native_height * 2;
  ui.width.step = ui.height.step = model.size_multiple;
  ui.tuned.checked = model.tuned_available;
  updateTunedSwitch();
  const video = model.produces === "video";
  ui.videoFields.hidden = !video;
  if (video) {
    ui.numFrames.value = model.default_num_frames;
    ui.numFrames.max = model.max_num_frames;
    ui.fps.value = model.default_fps;
  }
}

// The tuned switch applies only to self-cascade on a model with upsamplers; the hint says why
// when it is off. Its checked state is kept, so going back to self-cascade restores the choice.
function updateTunedSwitch() {
  const direct = selectedValue("method") === "direct";
  const available = Boolean(model && model.tuned_available);
  ui.tuned.disabled = direct || !available;
  ui.tunedHint.textContent = !available
    ? "(none loaded for this model)"
    : direct ? "(self-cascade only)" : "";
}

async function loadModel() {
  try {
    const { data } = await api.models();
    models = data;
    // A picker only when there is a choice; the one chosen before a key change is kept.
    const kept = models.find((m) => model && m.name === model.name) || models[0];
    ui.modelSelect.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
    ui.modelChoice.hidden = models.length < 2;
    if (kept) {
      ui.modelSelect.value = kept.name;
      applyModel(kept);
    }
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    ui.modelInfo.textContent = "model list unavailable";
    showError(describeError(error), null);
  }
}

// Whether a worker holds the chosen model (before the model list: whether any holds one).
async function checkReadiness() {
  try {
    await api.readiness(model ? model.name : undefined);
    ui.readiness.hidden = true;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    ui.readiness.textContent = `${describeError(error)} Jobs wait in the queue until it recovers.`;
    ui.readiness.hidden = false;
  }
}

function init() {
  ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
  ui.apiKey.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value);
    clearError();
    loadModel().then(checkReadiness);  // in keys mode even the model list needs the key
    renderGallery(ui.gallery, loadRecent(), openJob, api.imageUrl);
  });
  ui.modelSelect.addEventListener("change", () => {
    const chosen = models.find((m) => m.name === ui.modelSelect.value);
    if (chosen) applyModel(chosen);
    clearError();
    checkReadiness();
  });
  for (const radio of ui.form.querySelectorAll('input[name="method"]')) {
    radio.addEventListener("change", updateTunedSwitch);
  }
  for (const radio of ui.form.querySelectorAll('input[name="preset"]')) {
    radio.addEventListener("change", () => {
      ui.customSize.hidden = selectedValue("preset") !== "custom";
    });
  }
  ui.form.addEventListener("submit", submit);
  ui.form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !ui.generate.disabled) {
      ui.form.requestSubmit();
    }
  });
  ui.cancel.addEventListener("click", cancelCurrent);
  ui.image.addEventListener("load", () => document.body.classList.add("has-result"));
  ui.video.addEventListener("loadeddata", () => document.body.classList.add("has-result"));
  renderGallery(ui.gallery, loadRecent(), openJob, api.imageUrl);
  loadModel().then(checkReadiness);
}

init();
