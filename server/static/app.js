// lookalike web page: photo search (drop, pick, paste, camera), refined by words ("in red") or by a
// box drawn on the photo, text search, "more like this", product details, category and result-count
// filters. The query lives in the URL (?q=, ?similar=, &refine=, &category=, &k=) so a result page can be
// shared and reloaded (an uploaded photo and its box cannot be). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  textForm: $("text-form"), textQuery: $("text-query"), dropZone: $("drop-zone"), fileInput: $("file-input"),
  cameraInput: $("camera-input"), preview: $("query-preview"), queryImage: $("query-image"),
  queryCaption: $("query-caption"), labels: $("labels"), labelList: $("label-list"), category: $("category"),
  k: $("k"), status: $("status"), error: $("error"), results: $("results"), details: $("details"),
  detailsBody: $("details-body"),
  queryFrame: $("query-frame"), boxOverlay: $("box-overlay"), boxHint: $("box-hint"), clearBox: $("clear-box"),
  refineForm: $("refine-form"), refineText: $("refine-text"),
};
let lastPhoto = null; // the uploaded File, to re-run a photo search when a filter changes
let box = null; // the box drawn on the query photo: [x0, y0, x1, y1] in fractions of the photo, or null
const MIN_BOX_PIXELS = 8; // the server refuses smaller boxes (indexer.compose.MIN_BOX_SIDE)

function params() { return new URLSearchParams(location.search); }

function setUrl(updates) {
  const p = params();
  for (const [key, value] of Object.entries(updates)) {
    if (value === null || value === undefined || value === "") p.delete(key); else p.set(key, value);
  }
  const qs = p.toString();
  history.pushState(null, "", qs ? `?${qs}` : location.pathname);
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = !message;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("The server could not be reached. Is it running?");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `The server answered ${response.status}.`;
    if (response.status === 413) throw new Error(`That file is too large. ${message}`);
    if (response.status === 503) throw new Error(`The server is still starting. ${message}`);
    throw new Error(message);
  }
  return body;
}

function filters() {
  return { k: els.k.value, category: els.category.value };
}

function searchQuery() {
  const f = filters();
  const p = new URLSearchParams({ k: f.k });
  if (f.category) p.set("category", f.category);
  return p;
}

async function searchPhoto(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`"${file.name}" is not an image. Choose a JPEG, PNG or WebP photo.`);
    return;
  }
  if (file !== lastPhoto) {  // a new photo: its own search, without the last one's words and box
    els.queryImage.src = URL.createObjectURL(file);
    els.refineText.value = "";
    setBox(null);
  }
  lastPhoto = file;
  showError("");
  els.queryCaption.textContent = file.name || "pasted image";
  els.preview.hidden = false;
  els.refineForm.hidden = false;
  els.boxHint.hidden = false;
  els.textQuery.value = "";
  setUrl({ q: null, similar: null, refine: null, ...filters() });
  els.status.textContent = "Searching…";
  const form = new FormData();
  form.append("image", file, file.name || "photo.jpg");
  const words = els.refineText.value.trim();
  if (words) form.append("text", words);
  if (box) form.append("box", box.map((v) => v.toFixed(4)).join(","));
  try {
    const body = await api(`/v1/search/image?${searchQuery()}`, { method: "POST", body: form });
    renderLabels(body.labels);
    const what = [box && "the box", words && `“${words}”`].filter(Boolean).join(" + ");
    renderResults(body.results, `${body.results.length} similar products${what ? ` (photo: ${what})` : ""} `
      + `(${Math.round(body.took_ms)} ms)`);
  } catch (e) {
    els.status.textContent = "";
    renderLabels([]);
    els.results.replaceChildren();
    showError(e.message);
  }
}

async function searchText(query) {
  query = query.trim();
  if (!query) return;
  lastPhoto = null;
  showError("");
  els.preview.hidden = true;
  els.refineForm.hidden = true;
  renderLabels([]);
  els.status.textContent = "Searching…";
  try {
    const f = filters();
    const body = await api("/v1/search/text", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ query, k: Number(f.k), category: f.category || null }),
    });
    renderResults(body.results, `${body.results.length} products for “${query}” (${Math.round(body.took_ms)} ms)`);
  } catch (e) {
    els.status.textContent = "";
    els.results.replaceChildren();
    showError(e.message);
  }
}

async function searchSimilar(id) {
  lastPhoto = null;
  setBox(null);
  showError("");
  renderLabels([]);
  els.textQuery.value = "";
  els.queryImage.src = `/v1/products/${encodeURIComponent(id)}/image?size=512`;
  els.queryCaption.textContent = `More like ${id}`;
  els.preview.hidden = false;
  els.refineForm.hidden = false;
  els.boxHint.hidden = true; // a box refines an uploaded photo; similar searches every photo of the product
  els.status.textContent = "Searching…";
  const query = searchQuery();
  const words = els.refineText.value.trim();
  if (words) query.set("text", words);
  try {
    const body = await api(`/v1/products/${encodeURIComponent(id)}/similar?${query}`);
    renderResults(body.results, `${body.results.length} products like ${id}${words ? ` + “${words}”` : ""} `
      + `(${Math.round(body.took_ms)} ms)`);
  } catch (e) {
    els.status.textContent = "";
    els.results.replaceChildren();
    showError(e.message);
  }
}

function renderLabels(labels) {
  els.labelList.replaceChildren();
  els.labels.hidden = !labels || labels.length === 0;
  for (const lab of labels || []) {
    const li = document.createElement("li");
    li.className = "label";
    const pct = (lab.score * 100).toFixed(1);
    li.innerHTML = `<span class="name"></span><span class="bar"><span style="width:${pct}%"></span></span><span class="pct">${pct}%</span>`;
    li.querySelector(".name").textContent = lab.label;
    li.title = `cosine ${lab.cosine.toFixed(3)}`;
    els.labelList.append(li);
  }
}

function price(r) {
  const value = (r.image_metadata && r.image_metadata.price) ?? (r.metadata && r.metadata.price);
  if (value === undefined || value === null || value === "") return "";
  const n = Number(value);
  return Number.isFinite(n) ? `$${n.toFixed(2)}` : String(value);
}

function renderResults(results, statusText) {
  els.status.textContent = statusText;
  els.results.replaceChildren();
  for (const r of results) {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.id = r.id;
    li.innerHTML = `
      <img loading="lazy" alt="">
      <div class="info">
        <span class="title"></span>
        <span class="category"></span>
        <span class="price"></span>
        <span class="score"></span>
        <div class="actions">
          <button type="button" class="more">More like this</button>
          <button type="button" class="secondary open">Details</button>
        </div>
      </div>`;
    const img = li.querySelector("img");
    img.src = `/v1/products/${encodeURIComponent(r.id)}/image?size=256&photo_id=${r.photo_id}`;
    img.alt = r.title || r.id;
    li.querySelector(".title").textContent = r.title || r.id;
    li.querySelector(".category").textContent = r.category || "";
    li.querySelector(".price").textContent = price(r);
    li.querySelector(".score").textContent = `similarity ${r.score.toFixed(3)}`;
    li.querySelector(".more").addEventListener("click", () => {
      els.refineText.value = "";
      setUrl({ similar: r.id, q: null, refine: null });
      searchSimilar(r.id);
    });
    const open = () => openDetails(r.id);
    li.querySelector(".open").addEventListener("click", open);
    img.addEventListener("click", open);
    els.results.append(li);
  }
}

async function openDetails(id) {
  try {
    const p = await api(`/v1/products/${encodeURIComponent(id)}`);
    const body = els.detailsBody;
    body.innerHTML = `<h2></h2><p class="category"></p><div class="photos"></div><table class="meta"></table>`;
    body.querySelector("h2").textContent = p.title || p.id;
    body.querySelector(".category").textContent = [p.category, p.label && `label: ${p.label}`].filter(Boolean).join(" · ");
    for (const photo of p.images) {
      const img = document.createElement("img");
      img.src = `/v1/products/${encodeURIComponent(id)}/image?size=256&photo_id=${photo.photo_id}`;
      img.alt = photo.image;
      body.querySelector(".photos").append(img);
    }
    const rows = { id: p.id, ...p.metadata };
    for (const [key, value] of Object.entries(rows)) {
      const tr = document.createElement("tr");
      tr.innerHTML = "<td></td><td></td>";
      tr.children[0].textContent = key;
      tr.children[1].textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
      body.querySelector(".meta").append(tr);
    }
    els.details.showModal();
  } catch (e) {
    showError(e.message);
  }
}

// A category path's parts: "Men/Tops/Hoodies" and "Men > Tops > Hoodies" are both Men, Tops, Hoodies
// (the server's filter matches a category and everything below it, with either separator).
function categoryParts(path) { return path.split(/\s*[/>]\s*/).filter(Boolean); }

async function loadCategories() {
  try {
    const cats = await api("/v1/categories");
    // every parent path too, with the products below it, so that ?category=Women can be chosen
    const counts = new Map();
    for (const c of cats) {
      const parts = categoryParts(c.category);
      for (let i = 1; i <= parts.length; i++) {
        const path = parts.slice(0, i).join("/");
        counts.set(path, (counts.get(path) || 0) + c.products);
      }
    }
    for (const path of [...counts.keys()].sort((a, b) => a.localeCompare(b))) {
      const depth = categoryParts(path).length - 1;
      addOption(els.category, path, `${"\u00a0\u00a0".repeat(depth)}${categoryParts(path).at(-1)} (${counts.get(path)})`);
    }
  } catch (e) {
    showError(e.message);
  }
}

function addOption(select, value, text) {
  const opt = document.createElement("option");
  opt.value = value;
  opt.textContent = text;
  select.append(opt);
  return opt;
}

// Select ``value`` in ``select``, adding it as an option when the page does not list it (a k of 10,
// the API's default, or a category the page has no count for): a shared URL shows what it says.
function selectValue(select, value, text) {
  if (![...select.options].some((o) => o.value === value)) addOption(select, value, text || value);
  select.value = value;
}

function runFromUrl() {
  const p = params();
  const k = Number(p.get("k"));
  if (p.get("k") && Number.isInteger(k) && k >= 1 && k <= 1000) selectValue(els.k, String(k));
  const category = (p.get("category") || "").trim();
  if (category) selectValue(els.category, category);
  else els.category.value = "";
  if (p.get("q")) { els.textQuery.value = p.get("q"); searchText(p.get("q")); }
  else if (p.get("similar")) { els.refineText.value = p.get("refine") || ""; searchSimilar(p.get("similar")); }
}

function rerun() {
  setUrl(filters());
  const p = params();
  if (lastPhoto) searchPhoto(lastPhoto);
  else if (p.get("q")) searchText(p.get("q"));
  else if (p.get("similar")) searchSimilar(p.get("similar"));
}

els.textForm.addEventListener("submit", (e) => {
  e.preventDefault();
  setUrl({ q: els.textQuery.value.trim(), similar: null, ...filters() });
  searchText(els.textQuery.value);
});
for (const input of [els.fileInput, els.cameraInput]) {
  input.addEventListener("change", () => { searchPhoto(input.files[0]); input.value = ""; });
}
els.dropZone.addEventListener("dragover", (e) => { e.preventDefault(); els.dropZone.classList.add("over"); });
els.dropZone.addEventListener("dragleave", () => els.dropZone.classList.remove("over"));
els.dropZone.addEventListener("drop", (e) => {
  e.preventDefault();
  els.dropZone.classList.remove("over");
  searchPhoto(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); searchPhoto(file); }
});
els.category.addEventListener("change", rerun);
els.k.addEventListener("change", rerun);
window.addEventListener("popstate", runFromUrl);

// Refine: the query photo (or product) with words, e.g. "in red" (POST /v1/search/image `text`).
els.refineForm.addEventListener("submit", (e) => {
  e.preventDefault();
  if (lastPhoto) { searchPhoto(lastPhoto); return; }
  const similar = params().get("similar");
  if (similar) { setUrl({ refine: els.refineText.value.trim() }); searchSimilar(similar); }
});

// Region search: drag a box on the query photo (mouse, pen or touch: pointer events), then search that
// part of it (`box`, in fractions of the photo). object-fit: contain letterboxes the photo inside the
// <img>, so positions are taken relative to the photo's own rectangle.
function photoRect() {
  const img = els.queryImage;
  const scale = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);
  const width = img.naturalWidth * scale, height = img.naturalHeight * scale;
  return { left: img.offsetLeft + (img.clientWidth - width) / 2, top: img.offsetTop + (img.clientHeight - height) / 2,
           width, height };
}

function pointerFraction(e) {
  const r = photoRect(), frame = els.queryFrame.getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, v));
  return [clamp((e.clientX - frame.left - r.left) / r.width), clamp((e.clientY - frame.top - r.top) / r.height)];
}

function drawBox(b) {
  els.boxOverlay.hidden = !b;
  if (!b) return;
  const r = photoRect();
  Object.assign(els.boxOverlay.style, {
    left: `${r.left + b[0] * r.width}px`, top: `${r.top + b[1] * r.height}px`,
    width: `${(b[2] - b[0]) * r.width}px`, height: `${(b[3] - b[1]) * r.height}px`,
  });
}

function setBox(b) {
  box = b;
  els.clearBox.hidden = !b;
  drawBox(b);
}

let dragStart = null;
els.queryFrame.addEventListener("pointerdown", (e) => {
  if (!lastPhoto || !els.queryImage.naturalWidth || e.button > 0) return;
  e.preventDefault();
  dragStart = pointerFraction(e);
  els.queryFrame.setPointerCapture(e.pointerId);
});
els.queryFrame.addEventListener("pointermove", (e) => {
  if (!dragStart) return;
  const [x, y] = pointerFraction(e);
  drawBox([Math.min(dragStart[0], x), Math.min(dragStart[1], y), Math.max(dragStart[0], x), Math.max(dragStart[1], y)]);
});
els.queryFrame.addEventListener("pointerup", (e) => {
  if (!dragStart) return;
  const [x, y] = pointerFraction(e);
  const b = [Math.min(dragStart[0], x), Math.min(dragStart[1], y), Math.max(dragStart[0], x), Math.max(dragStart[1], y)];
  dragStart = null;
  const img = els.queryImage;
  if ((b[2] - b[0]) * img.naturalWidth < MIN_BOX_PIXELS || (b[3] - b[1]) * img.naturalHeight < MIN_BOX_PIXELS) {
    drawBox(box); // a click, not a box: keep what was there
    return;
  }
  setBox(b);
  searchPhoto(lastPhoto);
});
els.queryFrame.addEventListener("pointercancel", () => { dragStart = null; drawBox(box); });
els.clearBox.addEventListener("click", () => { setBox(null); if (lastPhoto) searchPhoto(lastPhoto); });
window.addEventListener("resize", () => drawBox(box));

loadCategories().then(runFromUrl);
