// Catalogue audit page: runs GET /v1/audit and shows each finding with its photos side by side and
// its scores. Asks for an API key when the server answers 401 (keys configured), and keeps it for
// this tab only (sessionStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_PHOTOS = 24; // photos shown per finding (indexer.audit_report.HTML_MAX_PHOTOS)
const TITLES = {
  exact_duplicates: "Same photo file in several products",
  near_duplicates: "Near-duplicate photos of different products",
  category_disagreements: "Products whose photos look like another category",
  outliers: "Products far from the rest of their category",
};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function runAudit() {
  const p = new URLSearchParams({ category_min_margin: $("margin").value, outlier_min_z: $("min-z").value });
  if ($("near-dup").value) p.set("near_duplicate_min_cosine", $("near-dup").value);
  const key = $("api-key").value || sessionStorage.getItem("lookalike-key") || "";
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  showError("");
  $("status").textContent = "Auditing the catalogue…";
  let response;
  try {
    response = await fetch(`/v1/audit?${p}`, { headers });
  } catch (e) {
    $("status").textContent = "";
    showError("The server could not be reached. Is it running?");
    return;
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  $("status").textContent = "";
  if (!response.ok) {
    if (response.status === 401 || response.status === 403) $("key-label").hidden = false;
    showError(body && body.error ? body.error.message : `The server answered ${response.status}.`);
    return;
  }
  if (key) sessionStorage.setItem("lookalike-key", key);
  render(body);
}

function figure(photo, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = `${photo.image}&size=128`;
  img.alt = photo.product_id;
  img.loading = "lazy";
  const cap = document.createElement("figcaption");
  cap.textContent = caption || `${photo.product_id} #${photo.photo_id}`;
  fig.append(img, cap);
  return fig;
}

function headline(part, f) {
  if (part === "exact_duplicates") return `${f.products.length} products share one photo file (sha256 ${f.sha256.slice(0, 12)}…)`;
  if (part === "near_duplicates") {
    return `${f.products.length} products, ${f.photos.length} photos, cosine ${f.min_cosine.toFixed(3)}–${f.max_cosine.toFixed(3)}`;
  }
  if (part === "category_disagreements") {
    return `${f.product_id} ${f.title || ""}: filed under ${f.category}, looks like ${f.predicted_label} ` +
      `(p ${f.p_predicted.toFixed(2)} vs ${f.p_catalogue.toFixed(2)}, margin ${f.margin.toFixed(2)})`;
  }
  return `${f.product_id} ${f.title || ""} in ${f.category}: robust z ${f.robust_z.toFixed(1)}, ` +
    `nearest ${f.nearest_product} at cosine ${f.nearest_cosine.toFixed(3)}`;
}

function render(report) {
  const root = $("audit-results");
  root.replaceChildren();
  const t = report.thresholds;
  $("status").textContent = `${report.products} products, ${report.photos} photos audited in ` +
    `${Math.round(report.took_ms)} ms; near-duplicate cosine ≥ ${t.near_duplicate_min_cosine} ` +
    `(${t.near_duplicate_threshold_source})`;
  for (const part of Object.keys(TITLES)) {
    const findings = report[part] || [];
    const section = document.createElement("section");
    section.id = part;
    const h = document.createElement("h2");
    h.textContent = `${TITLES[part]} (${findings.length})`;
    section.append(h);
    for (const f of findings) {
      const div = document.createElement("div");
      div.className = "finding";
      div.dataset.part = part;
      const head = document.createElement("div");
      head.textContent = headline(part, f);
      const photos = document.createElement("div");
      photos.className = "photos";
      // a near-duplicate group may hold thousands of photos: each shown one is a thumbnail request
      for (const photo of f.photos.slice(0, MAX_PHOTOS)) photos.append(figure(photo));
      if (f.photos.length > MAX_PHOTOS) {
        const more = document.createElement("p");
        more.className = "more-photos";
        more.textContent = `${f.photos.length - MAX_PHOTOS} more photos in the JSON report (GET /v1/audit)`;
        photos.append(more);
      }
      div.append(head, photos);
      section.append(div);
    }
    root.append(section);
  }
  for (const note of report.notes || []) {
    const p = document.createElement("p");
    p.textContent = note;
    root.append(p);
  }
}

$("audit-form").addEventListener("submit", (e) => { e.preventDefault(); runAudit(); });
runAudit();
