// Upload page: each chosen photo gets its own card and its own POST /v1/captions request (a few
// at a time; the server batches concurrent requests), and the card fills in when its answer comes.
// Changing an option captions every photo again; the captions copy out as CSV or alt-text HTML.
// When the served model has attention (GET /v1/model), the page also asks for each caption word's
// attention weights, and pointing at or focusing a word lays its weights over the photo as a heat map.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_IN_FLIGHT = 4;
const QUICK_BEAM = 3;
const CAREFUL_BEAM = 5;
// Both beams are at least this, so the server's "n_best must not exceed beam_size" cannot happen.
const WITH_ALTERNATIVES = 3;
// [lowest confidence, level, what it means]: confidence is the estimated chance that the caption
// names nothing that is not in the photo.
const CONFIDENCE_LEVELS = [
  [0.7, "high", "it probably names only what is in the photo"],
  [0.4, "medium", "it may name something that is not in the photo"],
  [0, "low", "check it: it likely names something that is not in the photo"],
];

const photos = []; // {file, key, card, run, result, hovered}; run counts requests so a stale answer is dropped
let inFlight = 0;
const waiting = [];

async function withSlot(task) {
  if (inFlight < MAX_IN_FLIGHT) inFlight += 1;
  else await new Promise((resolve) => waiting.push(resolve)); // a finishing task hands its slot over
  try {
    return await task();
  } finally {
    const next = waiting.shift();
    if (next) next();
    else inFlight -= 1;
  }
}

// Whether the served model has attention, asked once: a promise of true or false. An unanswered
// question (the server still loading, say) counts as false and is asked again by the next photo.
let servedModelAttention = null;

function modelHasAttention() {
  servedModelAttention ??= fetch("/v1/model")
    .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`HTTP ${response.status}`))))
    .then((model) => {
      setAttention(model.attention === true);
      return model.attention === true;
    })
    .catch(() => {
      servedModelAttention = null;
      return false;
    });
  return servedModelAttention;
}

function setAttention(on) {
  servedModelAttention = Promise.resolve(on);
  $("attention-hint").hidden = !on;
  $("results").classList.toggle("attention", on);
}

function decodeQuery(attention) {
  const query = new URLSearchParams({
    beam_size: $("careful").checked ? CAREFUL_BEAM : QUICK_BEAM,
    n_best: $("alternatives").checked ? WITH_ALTERNATIVES : 1,
    grounding: $("grounding").checked,
  });
  if (attention) query.set("attention", true);
  return query;
}

async function requestCaption(file, query) {
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const response = await fetch(`/v1/captions?${query}`, { method: "POST", body: form });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      return body.error ? { error: body.error.message, code: body.error.code }
        : { error: `the server answered HTTP ${response.status}` };
    }
    return { result: body.results[0] };
  } catch (err) {
    return { error: `could not reach the server (${err.message})` };
  }
}

// Alt text is a sentence: a capital letter and a full stop.
function asSentence(caption) {
  const text = caption.trim();
  if (!text) return text;
  const capitalised = text[0].toUpperCase() + text.slice(1);
  return /[.!?]$/.test(capitalised) ? capitalised : `${capitalised}.`;
}

function part(photo, selector) {
  return photo.card.querySelector(selector);
}

function newPhoto(file, key) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const photo = { file, key, card, run: 0, result: null, hovered: null };
  const preview = card.querySelector(".preview");
  preview.src = URL.createObjectURL(file);
  preview.alt = `Photo ${file.name}`;
  preview.addEventListener("error", () => card.classList.add("no-preview"));
  preview.addEventListener("load", () => updateAttention(photo)); // a map drawn before the photo knew its size
  card.querySelector(".filename").textContent = file.name;
  const copy = card.querySelector(".copy");
  copy.setAttribute("aria-label", `Copy the caption of ${file.name}`);
  copy.addEventListener("click", () => copyText(asSentence(photo.result.caption), `the caption of ${file.name}`));
  listenToWords(photo);
  return photo;
}

function clearResult(photo) {
  for (const selector of [".caption", ".error", ".confidence"]) part(photo, selector).textContent = "";
  part(photo, ".objects").replaceChildren();
  part(photo, ".alternatives").replaceChildren();
  part(photo, ".alternatives-block").hidden = true;
  part(photo, ".preview").alt = `Photo ${photo.file.name}`;
  hideAttention(photo);
  photo.result = null;
}

function showPending(photo) {
  clearResult(photo);
  photo.card.dataset.state = "pending";
  part(photo, ".caption").textContent = "Captioning\u2026";
}

function showError(photo, message) {
  clearResult(photo);
  photo.card.dataset.state = "error";
  part(photo, ".error").textContent = `Could not caption this photo: ${message}`;
}

function showConfidence(photo, confidence) {
  if (confidence === null || confidence === undefined) return;
  const [, level, meaning] = CONFIDENCE_LEVELS.find(([lowest]) => confidence >= lowest);
  const line = part(photo, ".confidence");
  line.textContent = `Confidence ${Math.round(confidence * 100)}%: ${meaning}`;
  line.dataset.level = level;
}

function showResult(photo, result) {
  clearResult(photo);
  photo.result = result;
  photo.card.dataset.state = "done";
  const sentence = asSentence(result.caption);
  part(photo, ".caption").textContent = sentence;
  if (result.attention && result.attention.length) showWords(photo, result.attention);
  part(photo, ".preview").alt = sentence;
  showConfidence(photo, result.confidence);
  for (const obj of result.objects) {
    const tag = document.createElement("li");
    tag.textContent = `${obj.word} ${Math.round(obj.p * 100)}%`;
    tag.title = `${obj.label} (ImageNet class), ${Math.round(obj.p * 100)}% sure`;
    part(photo, ".objects").append(tag);
  }
  for (const alternative of result.alternatives) {
    const item = document.createElement("li");
    item.textContent = asSentence(alternative.caption);
    part(photo, ".alternatives").append(item);
  }
  part(photo, ".alternatives-block").hidden = result.alternatives.length === 0;
}

async function captionPhoto(photo) {
  photo.run += 1;
  const run = photo.run;
  showPending(photo);
  updateToolbar();
  const query = decodeQuery(await modelHasAttention());
  // A photo re-run or cleared while waiting for a slot sends nothing.
  const outcome = await withSlot(() => (run === photo.run ? requestCaption(photo.file, query) : null));
  if (outcome === null || run !== photo.run) return;
  if (outcome.code === "invalid_option" && query.has("attention")) {
    setAttention(false); // the server now serves a model without attention: ask without
    captionPhoto(photo);
    return;
  }
  if (outcome.error) showError(photo, outcome.error);
  else showResult(photo, outcome.result);
  updateToolbar();
}

// The same file chosen again (same name, size and date) captions its card again rather than adding one.
function addFiles(fileList) {
  for (const file of [...fileList]) {
    const key = `${file.name}\u0000${file.size}\u0000${file.lastModified}`;
    let photo = photos.find((known) => known.key === key);
    if (photo) {
      photo.file = file;
    } else {
      photo = newPhoto(file, key);
      photos.push(photo);
      $("results").append(photo.card);
    }
    captionPhoto(photo);
  }
}

function clearAll() {
  for (const photo of photos) {
    photo.run += 1;
    URL.revokeObjectURL(part(photo, ".preview").src);
    photo.card.remove();
  }
  photos.length = 0;
  say("");
  updateToolbar();
}

function updateToolbar() {
  const done = photos.filter((photo) => photo.result).length;
  const failed = photos.filter((photo) => photo.card.dataset.state === "error").length;
  const pending = photos.length - done - failed;
  $("copy-csv").disabled = $("copy-html").disabled = done === 0;
  $("clear").disabled = photos.length === 0;
  const counts = [[done, "captioned"], [pending, "in progress"], [failed, "failed"]];
  $("results-title").textContent = photos.length === 0 ? "Captions" :
    `Captions: ${counts.filter(([n]) => n > 0).map(([n, what]) => `${n} ${what}`).join(", ")}`;
}

// ---- Attention: the caption as words; a word's 7x7 weights drawn over the photo on hover or focus.

function showWords(photo, attention) {
  const caption = part(photo, ".caption");
  caption.replaceChildren();
  attention.forEach(({ word }, index) => {
    const span = document.createElement("span");
    span.className = "word";
    span.tabIndex = 0;
    span.dataset.index = index;
    span.textContent = index === 0 ? word[0].toUpperCase() + word.slice(1) : word;
    span.setAttribute("aria-describedby", "attention-hint");
    if (index > 0) caption.append(" ");
    caption.append(span);
  });
  if (!/[.!?]$/.test(attention[attention.length - 1].word)) caption.append(".");
}

function wordIndex(element) {
  const word = element instanceof Element ? element.closest(".word") : null;
  return word ? Number(word.dataset.index) : null;
}

// The word pointed at wins over the focused one; with neither, no heat map.
function updateAttention(photo) {
  const focused = photo.card.contains(document.activeElement) ? wordIndex(document.activeElement) : null;
  const index = photo.hovered ?? focused;
  if (index === null || !photo.result || !photo.result.attention) hideAttention(photo);
  else drawAttention(photo, index);
}

function listenToWords(photo) {
  const caption = part(photo, ".caption");
  caption.addEventListener("mouseover", (event) => {
    const index = wordIndex(event.target);
    if (index === null) return; // between two words: the last one stays until the pointer leaves the caption
    photo.hovered = index;
    updateAttention(photo);
  });
  caption.addEventListener("mouseleave", () => {
    photo.hovered = null;
    updateAttention(photo);
  });
  caption.addEventListener("focusin", () => updateAttention(photo));
  caption.addEventListener("focusout", () => updateAttention(photo));
  caption.addEventListener("keydown", (event) => {
    const index = wordIndex(event.target);
    if (index === null) return;
    const words = caption.querySelectorAll(".word");
    const moves = { ArrowLeft: index - 1, ArrowUp: index - 1, ArrowRight: index + 1, ArrowDown: index + 1,
      Home: 0, End: words.length - 1 };
    if (event.key === "Escape") event.target.blur();
    else if (event.key in moves) words[Math.max(0, Math.min(words.length - 1, moves[event.key]))].focus();
    else return;
    event.preventDefault();
  });
}

// Where the photo is drawn inside its <img> box, in CSS pixels (object-fit contain letterboxes it,
// cover crops it; object-position is the centre). The encoder saw the whole photo squashed to a
// square, so the attention grid spans this box whatever the photo's aspect ratio.
function photoBox(img) {
  const width = img.clientWidth;
  const height = img.clientHeight;
  const fit = getComputedStyle(img).objectFit;
  if (!img.naturalWidth || !img.naturalHeight || fit === "fill") return { x: 0, y: 0, width, height };
  const fitted = fit === "cover" ? Math.max : Math.min;
  const scale = fitted(width / img.naturalWidth, height / img.naturalHeight);
  const [w, h] = [img.naturalWidth * scale, img.naturalHeight * scale];
  return { x: (width - w) / 2, y: (height - h) / 2, width: w, height: h };
}

// Weight (as a share of the word's largest) -> RGBA: faint red where the model hardly looked,
// nearly opaque yellow where it looked most.
function heatColour(share) {
  return [255, Math.round(40 + 190 * share), 0, Math.round(255 * (0.1 + 0.65 * share))];
}

// For each device pixel from 0 to `pixels` along one axis of the photo's box (start, size in CSS
// pixels): the grid cell before it and how far towards the next one it is, eased (smoothstep) so
// that the map is smooth and yet keeps each cell's own value around the cell's centre.
function cellSteps(pixels, start, size, cells, ratio) {
  return Array.from({ length: pixels }, (_, p) => {
    const u = Math.min(cells - 1, Math.max(0, (((p + 0.5) / ratio - start) / size) * cells - 0.5));
    const cell = Math.min(Math.floor(u), Math.max(0, cells - 2));
    const f = Math.min(1, u - cell);
    return [cell, Math.min(cell + 1, cells - 1), f * f * (3 - 2 * f)];
  });
}

function drawAttention(photo, index) {
  const img = part(photo, ".preview");
  let canvas = part(photo, ".heatmap");
  if (!canvas) {
    canvas = document.createElement("canvas");
    canvas.className = "heatmap";
    canvas.setAttribute("aria-hidden", "true");
    part(photo, ".photo").append(canvas);
  }
  const { word, weights } = photo.result.attention[index];
  const [rows, cols] = [weights.length, weights[0].length];
  const flat = weights.flat();
  const top = Math.max(...flat);
  const peak = flat.indexOf(top);
  const shares = weights.map((row) => row.map((weight) => (top > 0 ? Math.max(0, weight) / top : 0)));

  const ratio = window.devicePixelRatio || 1;
  const [width, height] = [Math.round(img.clientWidth * ratio), Math.round(img.clientHeight * ratio)];
  const drawn = `${index} ${width}x${height} ${img.naturalWidth}x${img.naturalHeight}`;
  if (!canvas.hidden && canvas.dataset.drawn === drawn) return; // already on show
  [canvas.width, canvas.height] = [width, height];
  const context = canvas.getContext("2d");
  const box = photoBox(img);
  const [x0, x1] = [Math.max(0, Math.floor(box.x * ratio)), Math.min(canvas.width, Math.ceil((box.x + box.width) * ratio))];
  const [y0, y1] = [Math.max(0, Math.floor(box.y * ratio)), Math.min(canvas.height, Math.ceil((box.y + box.height) * ratio))];
  if (x1 > x0 && y1 > y0) {
    const xs = cellSteps(x1, box.x, box.width, cols, ratio).slice(x0);
    const ys = cellSteps(y1, box.y, box.height, rows, ratio).slice(y0);
    const pixels = context.createImageData(x1 - x0, y1 - y0);
    ys.forEach(([r0, r1, fy], y) => {
      xs.forEach(([c0, c1, fx], x) => {
        const upper = shares[r0][c0] + (shares[r0][c1] - shares[r0][c0]) * fx;
        const lower = shares[r1][c0] + (shares[r1][c1] - shares[r1][c0]) * fx;
        pixels.data.set(heatColour(upper + (lower - upper) * fy), 4 * (y * (x1 - x0) + x));
      });
    });
    context.putImageData(pixels, x0, y0);
  }
  Object.assign(canvas.dataset, { word, index, drawn, peak: `${Math.floor(peak / cols)},${peak % cols}` });
  canvas.hidden = false;
  for (const element of part(photo, ".caption").querySelectorAll(".word")) {
    element.classList.toggle("active", Number(element.dataset.index) === index);
  }
}

function hideAttention(photo) {
  const canvas = part(photo, ".heatmap");
  if (canvas) canvas.hidden = true;
  for (const element of part(photo, ".caption").querySelectorAll(".word.active")) element.classList.remove("active");
}

function say(message) {
  $("status").textContent = message;
}

function csvField(value) {
  const text = String(value);
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function escapeHtml(text) {
  const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" };
  return text.replace(/[&<>"]/g, (c) => entities[c]);
}

function captionsAsCsv() {
  const rows = [["filename", "caption", "confidence", "objects"]];
  for (const { file, result } of photos.filter((photo) => photo.result)) {
    rows.push([file.name, asSentence(result.caption), result.confidence ?? "",
      result.objects.map((obj) => obj.word).join(" ")]);
  }
  return rows.map((row) => row.map(csvField).join(",")).join("\r\n") + "\r\n";
}

function captionsAsHtml() {
  return photos.filter((photo) => photo.result)
    .map(({ file, result }) => `<img src="${escapeHtml(file.name)}" alt="${escapeHtml(asSentence(result.caption))}">\n`)
    .join("");
}

// The Clipboard API needs a secure origin (TLS or localhost); elsewhere, copy a selection.
function copyBySelection(text) {
  const focused = document.activeElement;
  const area = document.createElement("textarea");
  area.value = text;
  area.className = "offscreen";
  area.readOnly = true;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (focused) focused.focus();
  return copied;
}

async function copyText(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    say(`Copied ${what}.`);
  } catch {
    say(copyBySelection(text) ? `Copied ${what}.` : "The browser did not allow copying.");
  }
}

function filesDragged(event) {
  return event.dataTransfer && [...event.dataTransfer.types].includes("Files");
}

// Drops anywhere on the page count, so a near miss does not open the photo in place of the page.
function listenForDrops() {
  const drop = $("drop");
  window.addEventListener("dragover", (event) => {
    if (!filesDragged(event)) return;
    event.preventDefault();
    drop.classList.add("over");
  });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("over");
  });
  window.addEventListener("drop", (event) => {
    if (!filesDragged(event)) return;
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
}

$("drop").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => {
  addFiles($("file").files);
  $("file").value = ""; // so choosing the same file again fires "change" again
});
for (const id of ["careful", "alternatives", "grounding"]) {
  $(id).addEventListener("change", () => photos.forEach(captionPhoto));
}
$("copy-csv").addEventListener("click", () => copyText(captionsAsCsv(), "all captions as CSV"));
$("copy-html").addEventListener("click", () => copyText(captionsAsHtml(), "all captions as alt-text HTML"));
$("clear").addEventListener("click", clearAll);
// The heat map is drawn at the photo's size: draw it again when that changes.
window.addEventListener("resize", () => photos.forEach(updateAttention));
listenForDrops();
modelHasAttention();
