// keeneye inspection page: picks images, sends each to POST predict (and explain on request),
// shows the verdict. Only the service's own JSON API is used; no external script, font or image.
"use strict";

const PARALLEL = 4; // requests in flight at once (the server merges or queues them)
let model = null; // what GET metadata said
const queue = [];
let running = 0;

// Plain words for the server's error codes; the server's own message follows in smaller type.
const PLAIN = {
  not_an_image: "This file is not a picture keeneye can read.",
  unsupported_format: "This picture format is not accepted here.",
  truncated: "This picture file is incomplete (cut off while saving or copying?).",
  unreadable_header: "This picture file is damaged.",
  decode_error: "This picture file is damaged or in an unusual format.",
  empty: "This file is empty.",
  file_too_large: "This file is too large for the server.",
  body_too_large: "This file is too large for the server.",
  too_many_pixels: "This picture has too many pixels for the server.",
  invalid_base64: "This file could not be sent.",
  too_many_images: "Too many pictures at once.",
  not_ready: "The model is still starting. Try again in a moment.",
  shutting_down: "The server is shutting down. Try again in a moment.",
  overloaded: "The server is busy. Try again in a moment.",
  inference_timeout: "The model took too long. Try again.",
};

function $(selector, root = document) { return root.querySelector(selector); }

function plainError(error) {
  const code = (error && error.code) || "http_error";
  return { text: PLAIN[code] || "This picture could not be checked.", detail: (error && error.message) || "" };
}

function fmt(value, digits = 4) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "n/a";
}

async function loadModel() {
  try {
    const response = await fetch("metadata");
    const body = await response.json();
    if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
    model = body;
    showModel(body);
  } catch (err) {
    $("#model-line").textContent = "The model could not be reached: " + err.message;
    $("#model").innerHTML = "<dt>Status</dt><dd>not available</dd>";
  }
}

function showModel(meta) {
  const [negative, positive] = meta.class_names || ["?", "?"];
  const threshold = meta.serving ? meta.serving.threshold : meta.threshold;
  const testing = (meta.metrics && meta.metrics.testing) || {};
  const at = testing.at_threshold || {};
  const created = meta.created ? new Date(meta.created.replace(/([+-]\d\d)(\d\d)$/, "$1:$2")) : null;
  $("#model-line").textContent = `Flags “${positive}” when its probability is at least ${fmt(threshold)}.`;
  const rows = [
    ["Model", meta.serving ? meta.serving.bundle : "?"],
    ["Classes", `${positive} (flagged) / ${negative}`],
    ["Threshold", fmt(threshold)],
    ["Trained", created && !isNaN(created) ? created.toLocaleString() : meta.created || "?"],
    ["Test images", testing.n != null ? `${testing.n} (${testing.n_positive} ${positive})` : "n/a"],
    ["Test F1", fmt(at.f1, 3)],
    ["Precision / recall", `${fmt(at.precision, 3)} / ${fmt(at.recall, 3)}`],
    ["ROC AUC", fmt(testing.roc_auc, 3)],
    ["Engine", meta.serving ? meta.serving.engine : "?"],
  ];
  const list = $("#model");
  list.replaceChildren();
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
}

function addFiles(files) {
  const images = Array.from(files);
  if (!images.length) return;
  $("#clear").hidden = false;
  for (const file of images) {
    const card = $("#card").content.firstElementChild.cloneNode(true);
    card.dataset.name = file.name;
    card.dataset.state = "pending";
    $(".name", card).textContent = file.name;
    const picture = $(".picture", card);
    picture.alt = file.name;
    picture.src = URL.createObjectURL(file);
    picture.addEventListener("error", () => { picture.hidden = true; }, { once: true });
    $("#results").append(card);
    queue.push({ file, card });
  }
  pump();
  summarise();
}

function pump() {
  while (running < PARALLEL && queue.length) {
    const job = queue.shift();
    running += 1;
    check(job).finally(() => { running -= 1; pump(); summarise(); });
  }
}

async function post(path, file) {
  const form = new FormData();
  form.append("files", file, file.name);
  const response = await fetch(path, { method: "POST", body: form });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  return { response, body };
}

async function check({ file, card }) {
  try {
    const { response, body } = await post("predict", file);
    const result = body && body.results && body.results[0];
    if (result && !result.error && result.probability != null) return showResult(card, file, result, body.positive_class);
    showError(card, (result && result.error) || (body && body.error) || { code: "http_error", message: `HTTP ${response.status}` });
  } catch (err) {
    showError(card, { code: "network", message: "The server could not be reached: " + err.message });
  }
}

function showResult(card, file, result, positive) {
  const flagged = result.label === positive;
  card.dataset.state = flagged ? "flagged" : "ok";
  card.dataset.label = result.label;
  card.dataset.probability = String(result.probability);
  card.dataset.threshold = String(result.threshold);
  const verdict = $(".verdict", card);
  verdict.textContent = result.label;
  verdict.className = "verdict " + (flagged ? "flagged" : "ok");
  const meter = $(".meter", card);
  meter.hidden = false;
  $(".bar", meter).style.width = `${(100 * result.probability).toFixed(1)}%`;
  $(".mark", meter).style.left = `${(100 * result.threshold).toFixed(1)}%`;
  meter.setAttribute("role", "img");
  meter.setAttribute("aria-label", `probability ${fmt(result.probability)} against threshold ${fmt(result.threshold)}`);
  const side = result.probability >= result.threshold ? "≥" : "<";
  $(".numbers", card).textContent = `P(${positive}) = ${fmt(result.probability)} ${side} threshold ${fmt(result.threshold)}`;
  const button = $(".heat", card);
  button.hidden = false;
  button.addEventListener("click", () => toggleHeat(card, file));
}

function showError(card, error) {
  card.dataset.state = "error";
  const { text, detail } = plainError(error);
  $(".verdict", card).textContent = "Not checked";
  $(".verdict", card).className = "verdict failed";
  const box = $(".error", card);
  box.hidden = false;
  box.replaceChildren(document.createTextNode(text));
  if (detail) {
    const small = document.createElement("span");
    small.className = "detail";
    small.textContent = ` (${detail})`;
    box.append(small);
  }
  card.dataset.error = error.code || "";
}

async function toggleHeat(card, file) {
  const button = $(".heat", card);
  const picture = $(".picture", card);
  if (button.getAttribute("aria-pressed") === "true" && card.dataset.view === "gradcam" && card.dataset.oneclass) {
    showOneClassMap(card, button, picture);
    return;
  }
  if (button.getAttribute("aria-pressed") === "true") {
    card.dataset.view = "picture";
    picture.src = card.dataset.original;
    picture.alt = card.dataset.name;
    picture.classList.remove("heatmap");
    button.setAttribute("aria-pressed", "false");
    button.textContent = "Show heat map";
    $(".heat-note", card).hidden = true;
    return;
  }
  if (!card.dataset.heatmap) {
    button.disabled = true;
    button.textContent = "Drawing the heat map…";
    try {
      const { response, body } = await post("explain", file);
      const result = body && body.results && body.results[0];
      if (!result || !result.heatmap) throw new Error(plainError((result && result.error) || (body && body.error) || { message: `HTTP ${response.status}` }).text);
      card.dataset.heatmap = result.heatmap;
      card.dataset.tile = Number.isInteger(result.tile) ? String(result.tile) : "";
      card.dataset.oneclass = result.one_class_heatmap || "";
    } catch (err) {
      button.disabled = false;
      button.textContent = "Show heat map";
      $(".heat-note", card).hidden = false;
      $(".heat-note", card).textContent = "The heat map could not be drawn: " + err.message;
      return;
    }
    button.disabled = false;
  }
  card.dataset.original = card.dataset.original || picture.src;
  picture.src = card.dataset.heatmap;
  picture.classList.add("heatmap");
  picture.alt = `${card.dataset.name}, heat map`;
  button.setAttribute("aria-pressed", "true");
  card.dataset.view = "gradcam";
  button.textContent = card.dataset.oneclass ? "Show the one-class map" : "Show the picture";
  $(".heat-note", card).textContent = "Red: the areas that weighed most in this decision (Grad-CAM)." +
    (card.dataset.tile ? " The white frame marks the part of the image that decided." : "") +
    (card.dataset.oneclass ? " This model also weighs how far the part looks from the good parts it remembers: the next map." : "");
  $(".heat-note", card).hidden = false;
}

// Models trained with head.anomaly_feature: the one-class part of the decision (patch distances to the good parts).
function showOneClassMap(card, button, picture) {
  picture.src = card.dataset.oneclass;
  picture.alt = `${card.dataset.name}, one-class map`;
  card.dataset.view = "oneclass";
  button.textContent = "Show the picture";
  $(".heat-note", card).textContent = "Blue and cyan: like the good parts the model remembers; green to red: unlike them, " +
    "enough to flag the part by this alone.";
}

function summarise() {
  const cards = Array.from(document.querySelectorAll("#results .card"));
  const count = (state) => cards.filter((c) => c.dataset.state === state).length;
  if (!cards.length) { $("#summary").textContent = ""; return; }
  const positive = model ? model.class_names[1] : "flagged";
  const parts = [`${cards.length} checked` + (count("pending") ? ` (${count("pending")} still running)` : "")];
  parts.push(`${count("flagged")} ${positive}`, `${count("ok")} ${model ? model.class_names[0] : "ok"}`);
  if (count("error")) parts.push(`${count("error")} could not be checked`);
  $("#summary").textContent = parts.join(" · ");
}

function setUp() {
  for (const id of ["files", "camera"]) {
    const input = document.getElementById(id);
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  }
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  $("#clear").addEventListener("click", () => {
    $("#results").replaceChildren();
    $("#clear").hidden = true;
    summarise();
    $("#files").focus();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setUp);
