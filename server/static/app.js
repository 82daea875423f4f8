// Upload page: each chosen photo gets its own card and its own POST /v1/captions request (a few
// at a time; the server batches concurrent requests), and the card fills in when its answer comes.
// Changing an option captions every photo again; the captions copy out as CSV or alt-text HTML.
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

const photos = []; // {file, key, card, run, result}; run counts requests so a stale answer is dropped
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

function decodeQuery() {
  return new URLSearchParams({
    beam_size: $("careful").checked ? CAREFUL_BEAM : QUICK_BEAM,
    n_best: $("alternatives").checked ? WITH_ALTERNATIVES : 1,
    grounding: $("grounding").checked,
  });
}

async function requestCaption(file, query) {
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const response = await fetch(`/v1/captions?${query}`, { method: "POST", body: form });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) return { error: body.error ? body.error.message : `the server answered HTTP ${response.status}` };
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
  const photo = { file, key, card, run: 0, result: null };
  const preview = card.querySelector(".preview");
  preview.src = URL.createObjectURL(file);
  preview.alt = `Photo ${file.name}`;
  preview.addEventListener("error", () => card.classList.add("no-preview"));
  card.querySelector(".filename").textContent = file.name;
  const copy = card.querySelector(".copy");
  copy.setAttribute("aria-label", `Copy the caption of ${file.name}`);
  copy.addEventListener("click", () => copyText(asSentence(photo.result.caption), `the caption of ${file.name}`));
  return photo;
}

function clearResult(photo) {
  for (const selector of [".caption", ".error", ".confidence"]) part(photo, selector).textContent = "";
  part(photo, ".objects").replaceChildren();
  part(photo, ".alternatives").replaceChildren();
  part(photo, ".alternatives-block").hidden = true;
  part(photo, ".preview").alt = `Photo ${photo.file.name}`;
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
  const query = decodeQuery();
  showPending(photo);
  updateToolbar();
  // A photo re-run or cleared while waiting for a slot sends nothing.
  const outcome = await withSlot(() => (run === photo.run ? requestCaption(photo.file, query) : null));
  if (outcome === null || run !== photo.run) return;
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
listenForDrops();
