// The search page: upload or drop an image (POST /search, multipart), or click a result (POST /search, JSON id).
"use strict";

const $ = (id) => document.getElementById(id);
let queryUrl = null; // object URL of the uploaded query, revoked when replaced
let busy = 0;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setQuery(src, caption) {
  if (queryUrl && queryUrl !== src) URL.revokeObjectURL(queryUrl);
  queryUrl = src.startsWith("blob:") ? src : null;
  const img = $("query-img");
  img.src = src;
  img.hidden = false;
  $("drop-hint").hidden = true;
  $("query-caption").textContent = caption;
}

function kValue() {
  const k = parseInt($("k-input").value, 10);
  return Number.isFinite(k) && k > 0 ? k : 10;
}

async function runSearch(init, label) {
  busy += 1;
  const mine = busy;
  $("status").textContent = `Searching ${label}…`;
  showError("");
  let body;
  try {
    const response = await fetch("/search", init);
    body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      throw new Error(`${response.status}: ${detail || response.statusText}`);
    }
  } catch (err) {
    if (mine === busy) {
      showError(err.message);
      $("status").textContent = "";
    }
    return;
  }
  if (mine !== busy) return; // a newer search superseded this one
  render(body);
}

function render(body) {
  const list = $("results");
  list.replaceChildren();
  for (const r of body.results) {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.id = r.id;
    item.title = r.path || `item ${r.id}`;
    const img = document.createElement("img");
    img.src = r.image_url;
    img.alt = r.path || `item ${r.id}`;
    img.loading = "lazy";
    img.onerror = () => item.classList.add("missing");
    const meta = document.createElement("div");
    meta.className = "meta";
    const dist = document.createElement("span");
    dist.className = "distance";
    dist.textContent = r.distance.toFixed(3);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = r.path ? r.path.split(/[\\/]/).pop() : `#${r.id}`;
    meta.append(dist, name);
    item.append(img, meta);
    item.addEventListener("click", () => searchById(r.id, r.path));
    list.append(item);
  }
  const n = body.results.length;
  $("status").textContent = `${n} result${n === 1 ? "" : "s"} in ${body.took_ms.toFixed(1)} ms`;
}

function searchFile(file) {
  if (!file) return;
  setQuery(URL.createObjectURL(file), file.name);
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(kValue()));
  runSearch({ method: "POST", body: form }, file.name);
}

function searchById(id, path) {
  setQuery(`/items/${id}/image`, `item #${id}${path ? " · " + path : ""}`);
  $("query-panel").dataset.itemId = id;
  runSearch(
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id, k: kValue() }) },
    `item #${id}`,
  );
}

$("file-input").addEventListener("change", (e) => {
  delete $("query-panel").dataset.itemId;
  searchFile(e.target.files[0]);
  e.target.value = ""; // picking the same file again searches again
});

const zone = $("drop-zone");
for (const type of ["dragenter", "dragover"]) {
  zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  zone.addEventListener(type, () => zone.classList.remove("over"));
}
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  delete $("query-panel").dataset.itemId;
  searchFile(e.dataTransfer.files[0]);
});

fetch("/health")
  .then((r) => r.json())
  .then((h) => {
    $("index-info").textContent =
      `${h.ntotal.toLocaleString()} items · ${h.M * Math.ceil(Math.log2(h.K))}-bit codes (M = ${h.M}, K = ${h.K})` +
      ` · model ${h.model_fingerprint.slice(0, 12)}`;
    $("k-input").max = h.k_max;
    $("k-input").value = h.k;
  })
  .catch(() => { $("index-info").textContent = "server unreachable"; });
