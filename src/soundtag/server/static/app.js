// soundtag's page: tag dropped files through /v1/tag, browse the library through /v1/library,
// /v1/search and /v1/similar. Plain JavaScript, no build step.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const COLOURS = ["#2f6fde", "#e0672f", "#2a9d5c", "#b0398f", "#c9a227", "#4aa3c7"];
const PAGE = 20;
let labels = [];
let libraryPage = { offset: 0, total: 0, mode: "browse" };

function apiKey() { return localStorage.getItem("soundtag-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) $("#key-box").hidden = false;
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  return response;
}

async function start() {
  $("#key").value = apiKey();
  $("#key").addEventListener("change", () => { localStorage.setItem("soundtag-key", $("#key").value); start(); });
  try {
    const info = await (await api("/v1/labels")).json();
    labels = info.labels;
    $("#model").textContent = `${info.model} · ${labels.length} labels · ${info.activation}`;
    $("#lib-label").replaceChildren(new Option("any label", ""), ...labels.map(l => new Option(l.label, l.label)));
  } catch (e) { $("#model").textContent = e.message; return; }
  browse(0);
}

// --- tagging --------------------------------------------------------------------------------
function setUpDrop() {
  const drop = $("#drop");
  $("#files").addEventListener("change", event => { tagFiles(event.target.files); event.target.value = ""; });
  drop.addEventListener("dragover", event => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", event => {
    event.preventDefault();
    drop.classList.remove("over");
    tagFiles(event.dataTransfer.files);
  });
}

function tagFiles(files) {
  for (const file of files) tagFile(file);
}

async function tagFile(file) {
  const card = $("#result-card").content.firstElementChild.cloneNode(true);
  $(".name", card).textContent = file.name;
  $("#results").prepend(card);
  const form = new FormData();
  form.append("file", file);
  try {
    const result = await (await api("/v1/tag?top=5&spectrogram=true", { method: "POST", body: form })).json();
    showResult(card, result);
    card.dataset.state = "done";
    const similar = $(".similar", card);
    similar.hidden = $("#library").hidden;
    similar.addEventListener("click", () => similarToUpload(file));
  } catch (e) {
    $(".meta", card).textContent = e.message;
    card.dataset.state = "error";
  }
}

function showResult(card, result) {
  const segments = result.segments.length ? ` · ${result.segments.length} segments` : "";
  $(".meta", card).textContent = `${result.duration.toFixed(2)} s${segments}`;
  drawSpectrogram($(".spectrogram", card), result.spectrogram);
  $(".tags", card).replaceChildren(...result.labels.map(tagRow));
  if (result.segments.length) drawTimeline($(".timeline", card), result.segments, result.labels);
}

function tagRow(tag) {
  const row = document.createElement("li");
  row.className = "tag";
  row.dataset.label = tag.label;
  row.dataset.score = tag.score;
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = tag.label;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${Math.round(100 * tag.score)}%`;
  bar.append(fill);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = tag.score.toFixed(3);
  row.append(name, bar, score);
  return row;
}

function drawSpectrogram(canvas, spec) {
  const bytes = Uint8Array.from(atob(spec.data), c => c.charCodeAt(0));
  canvas.width = spec.columns;
  canvas.height = spec.mels;
  const context = canvas.getContext("2d");
  const image = context.createImageData(spec.columns, spec.mels);
  for (let m = 0; m < spec.mels; m++) {
    for (let t = 0; t < spec.columns; t++) {
      const v = bytes[m * spec.columns + t] / 255;
      const at = 4 * ((spec.mels - 1 - m) * spec.columns + t);  // low bands at the bottom
      image.data[at] = Math.round(255 * Math.min(1, 1.6 * v));
      image.data[at + 1] = Math.round(255 * Math.max(0, 1.8 * v - 0.8));
      image.data[at + 2] = Math.round(255 * Math.max(0, 0.6 - Math.abs(v - 0.35)));
      image.data[at + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
}

function drawTimeline(box, segments, top) {
  box.hidden = false;
  const canvas = $("canvas", box);
  const shown = top.slice(0, COLOURS.length).map(t => t.label);
  const end = segments[segments.length - 1].end;
  canvas.width = 600;
  canvas.height = 20 * shown.length;
  const context = canvas.getContext("2d");
  const peak = Math.max(...segments.flatMap(s => s.labels.map(t => t.score)), 1e-6);  // the strongest is opaque
  for (const segment of segments) {
    const x = segment.start / end * canvas.width;
    const w = Math.max(1, (segment.end - segment.start) / end * canvas.width / 2);
    for (const tag of segment.labels) {
      const row = shown.indexOf(tag.label);
      if (row < 0) continue;
      context.globalAlpha = tag.score / peak;
      context.fillStyle = COLOURS[row];
      context.fillRect(x, row * 20 + 2, w, 16);
    }
  }
  $(".legend", box).replaceChildren(...shown.map((label, i) => {
    const item = document.createElement("li");
    const swatch = document.createElement("i");
    swatch.style.background = COLOURS[i];
    item.append(swatch, label);
    return item;
  }));
}

// --- library --------------------------------------------------------------------------------
async function browse(offset) {
  const label = $("#lib-label").value;
  const params = new URLSearchParams({ limit: PAGE, offset });
  let path;
  if (label) {
    path = `/v1/search?${new URLSearchParams({ label, min_score: $("#lib-min").value || 0, limit: 200 })}`;
  } else {
    params.set("q", $("#lib-text").value);
    path = `/v1/library?${params}`;
  }
  try {
    const found = await (await api(path)).json();
    $("#library").hidden = false;
    const items = label ? found.items.filter(i => i.name.includes($("#lib-text").value)) : found.items;
    libraryPage = { offset, total: label ? items.length : found.total, mode: label ? "search" : "browse" };
    showItems(label ? items.slice(0, PAGE) : items,
              label ? `${items.length} files tagged ${label}` : `${found.total} files`);
  } catch (e) {
    if (!e.message.startsWith("404")) { $("#library").hidden = false; $("#lib-status").textContent = e.message; }
  }
}

async function similarTo(id, name) {
  const found = await (await api(`/v1/similar?id=${id}&k=10`)).json();
  showItems(found.items, `sounds like ${name}`);
}

async function similarToUpload(file) {
  const form = new FormData();
  form.append("file", file);
  try {
    const found = await (await api("/v1/similar?k=10", { method: "POST", body: form })).json();
    showItems(found.items, `sounds like ${file.name}`);
  } catch (e) { $("#lib-status").textContent = e.message; }
}

function showItems(items, status) {
  $("#lib-status").textContent = status;
  $("#lib-items").replaceChildren(...items.map(item => {
    const row = document.createElement("li");
    row.dataset.id = item.id;
    if (item.score) {
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = item.score.toFixed(3);
      row.append(score);
    }
    const name = document.createElement("span");
    name.className = "file";
    name.textContent = item.name;
    row.append(name);
    if (item.error) {
      const why = document.createElement("div");
      why.className = "tags-line";
      why.textContent = `not taggable: ${item.error}`;
      row.append(why);
      return row;
    }
    row.append(button("▶ play", () => play(item.id)), button("similar", () => similarTo(item.id, item.name)));
    const tags = document.createElement("div");
    tags.className = "tags-line";
    tags.textContent = (item.tags || []).map(t => `${t.label} ${t.score.toFixed(2)}`).join(" · ");
    row.append(tags);
    return row;
  }));
}

function button(text, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", action);
  return b;
}

async function play(id) {
  const player = $("#player");
  const blob = await (await api(`/v1/library/${id}/audio`)).blob();
  if (player.src) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(blob);
  player.hidden = false;
  player.dataset.playing = id;
  player.play().catch(() => { /* autoplay may be refused; the controls remain */ });
}

$("#lib-form").addEventListener("submit", event => { event.preventDefault(); browse(0); });
$("#lib-prev").addEventListener("click", () => browse(Math.max(0, libraryPage.offset - PAGE)));
$("#lib-next").addEventListener("click", () => {
  if (libraryPage.mode === "browse" && libraryPage.offset + PAGE < libraryPage.total) browse(libraryPage.offset + PAGE);
});
setUpDrop();
start();
