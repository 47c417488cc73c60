// pigeon's web page: Leaflet (vendored in /static/vendor/leaflet) over offline outlines, no network
// beyond this server. Countries come from /static/world.json, admin-1 outlines from /static/admin1.json
// (both made from the bundled Natural Earth admin-1 by scripts/make_world_map.py), cells from /cells.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_VIEWS = 16;          // the server's max_batch default: more views are refused before sending
const ADMIN1_ZOOM = 4;         // admin-1 outlines from this zoom on (and around every answer)

const page = {                 // the page's state, also read by the browser tests
  map: null, countries: null, admin1: null, admin1Loading: null,
  answerLayer: null, marker: null, circle50: null, circle90: null, cellLayers: [], regionLayer: null,
  credible: {},                // the answer's 50% / 90% credible regions, by level ("50", "90")
  cellsIndex: null, answer: null, exifMarker: null, evidenceLayers: [],
  last: null,                  // the last request that answered: {files, several}, re-sent for a download
  download: null,              // the last download offered: {url, filename, type, size}
};
window.pigeonPage = page;

function initMap() {
  const map = L.map("map", { worldCopyJump: true, minZoom: 1, maxZoom: 12, zoomControl: true, attributionControl: true })
    .setView([20, 0], 2);
  map.attributionControl.setPrefix(false).addAttribution("Outlines: Natural Earth (public domain) · Leaflet");
  L.control.scale({ imperial: false }).addTo(map);
  map.createPane("outlines").style.zIndex = 350;
  page.answerLayer = L.layerGroup().addTo(map);
  page.map = map;
  map.on("zoomend", () => { if (map.getZoom() >= ADMIN1_ZOOM) loadAdmin1(); syncAdmin1(); });
  return map;
}

async function loadCountries() {
  const r = await fetch("/static/world.json");
  const world = await r.json();
  page.countries = L.geoJSON(world, {
    renderer: L.canvas({ padding: 0.5 }), interactive: false,
    style: { color: "#8b95a1", weight: 0.8, fillColor: "#f7f3ea", fillOpacity: 1 },
  }).addTo(page.map);
}

function loadAdmin1() {
  if (!page.admin1Loading) {
    page.admin1Loading = fetch("/static/admin1.json").then((r) => r.json()).then((gj) => {
      page.admin1 = L.geoJSON(gj, {
        renderer: L.canvas({ padding: 0.5 }), pane: "outlines", interactive: false,
        style: { color: "#a4adb8", weight: 0.6, fill: false, dashArray: "2 2" },
      });
      syncAdmin1();
      document.body.dataset.admin1 = "ready";
      return page.admin1;
    }).catch((e) => { setStatus("Could not load the admin-1 outlines: " + e, true); page.admin1Loading = null; });
  }
  return page.admin1Loading;
}

function syncAdmin1() {
  // admin-1 outlines only where they can be told apart: from ADMIN1_ZOOM on
  if (!page.admin1) return;
  const want = page.map.getZoom() >= ADMIN1_ZOOM;
  if (want && !page.map.hasLayer(page.admin1)) page.admin1.addTo(page.map);
  if (!want && page.map.hasLayer(page.admin1)) page.map.removeLayer(page.admin1);
}

function headers() {
  const key = $("apikey").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function loadCells() {
  if (page.cellsIndex) return page.cellsIndex;
  const r = await fetch("/cells", { headers: headers() });
  if (!r.ok) return null;
  const gj = await r.json();
  page.cellsIndex = new Map();
  for (const f of gj.features) page.cellsIndex.set(Number(f.properties.cell_id ?? f.id), f);
  return page.cellsIndex;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

function pct(p) {
  return (100 * p).toFixed(p >= 0.1 ? 0 : 1) + "%";
}

function listItems(ol, rows) {
  ol.textContent = "";
  for (const r of rows) {
    const li = document.createElement("li");
    li.textContent = `${r.label} — ${pct(r.p)}`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(2, 100 * r.p) + "%";
    li.appendChild(bar);
    ol.appendChild(li);
  }
}

async function drawAnswer(a) {
  const layer = page.answerLayer;
  layer.clearLayers();
  page.cellLayers = [];
  page.regionLayer = null;
  page.marker = page.circle50 = page.circle90 = page.exifMarker = null;  // a new answer without radii must not fit the old circles
  page.evidenceLayers = [];
  page.credible = {};
  // the top cells' polygons, darker for likelier ones (drawn first: under the circles and marker)
  const idx = await loadCells().catch(() => null);
  if (idx) {
    const pmax = Math.max(...a.top_cells.map((c) => c.probability), 1e-9);
    for (const c of a.top_cells) {
      const f = idx.get(Number(c.cell_id));
      if (!f) continue;
      const poly = L.geoJSON(f, {
        style: { className: "pigeon-cell", color: "#a33", weight: 1, fillColor: "#e4572e",
                 fillOpacity: Number((0.15 + 0.5 * (c.probability / pmax)).toFixed(3)) },
      }).bindTooltip(`${c.admin1 || "cell " + c.cell_id}, ${c.country || ""}: ${pct(c.probability)}`);
      poly.cellId = Number(c.cell_id);
      poly.addTo(layer);
      page.cellLayers.push(poly);
    }
  }
  drawCredible(a);
  const at = [a.lat, a.lon];
  if (a.radius_km_90 > 0) page.circle90 = L.circle(at, { radius: 1000 * a.radius_km_90, className: "pigeon-r90", color: "#1f5bd1", weight: 1, dashArray: "4 4", fillOpacity: 0.05 }).addTo(layer);
  if (a.radius_km_50 > 0) page.circle50 = L.circle(at, { radius: 1000 * a.radius_km_50, className: "pigeon-r50", color: "#1f5bd1", weight: 1.5, fillOpacity: 0.12 }).addTo(layer);
  drawEvidence(a, layer);
  page.marker = L.marker(at, { title: `${a.lat.toFixed(4)}, ${a.lon.toFixed(4)}`, alt: "the answer" }).addTo(layer);
  const bounds = (page.circle90 || page.circle50) ? (page.circle90 || page.circle50).getBounds() : L.latLngBounds([at, at]).pad(1);
  drawExif(a, layer, bounds);
  page.map.fitBounds(bounds, { maxZoom: 9, padding: [20, 20] });
  await drawRegion(a);
}

function drawExif(a, layer, bounds) {
  // the file's own EXIF position (never used for the guess): a distinct marker, kept in view
  const g = a.metadata && a.metadata.exif_gps;
  if (!g) return;
  page.exifMarker = L.circleMarker([g.lat, g.lon], { radius: 7, className: "pigeon-exif", color: "#7a2aa8", weight: 2, fillColor: "#c99be6", fillOpacity: 0.9 })
    .bindTooltip(`EXIF GPS of the file (not used): ${Math.round(g.distance_km).toLocaleString("en")} km from the guess`).addTo(layer);
  bounds.extend([g.lat, g.lon]);
}

function showMetadata(m) {
  // what the file says about itself, beside the guess; every value goes in as text (never as HTML)
  const box = $("metadata");
  box.textContent = "";
  box.hidden = !m;
  if (!m) return;
  const parts = [];
  if (m.exif_gps) parts.push(`EXIF GPS ${m.exif_gps.lat.toFixed(4)}, ${m.exif_gps.lon.toFixed(4)}: ${Math.round(m.exif_gps.distance_km).toLocaleString("en")} km from the guess`);
  if (m.taken_at) parts.push(`taken ${m.taken_at}` + (m.utc_offset ? ` (UTC${m.utc_offset})` : " (local time, no UTC offset recorded)"));
  if (m.taken_at_utc) parts.push(`${m.taken_at_utc} UTC`);
  if (m.sun_elevation_deg !== null && m.sun_elevation_deg !== undefined) {
    const e = m.sun_elevation_deg;
    parts.push(`sun ${Math.abs(e).toFixed(1)}° ${e >= 0 ? "above" : "below"} the horizon at the guessed place then`);
  }
  const line = document.createElement("span");
  line.id = "metadata-facts";
  line.textContent = "The file's own metadata (not used for the guess): " + (parts.length ? parts.join(" · ") : "nothing usable");
  box.appendChild(line);
  for (const text of [m.note, ...(m.ignored || [])].filter(Boolean)) {
    const p = document.createElement("span");
    p.className = text === m.note ? "metadata-note" : "metadata-ignored";
    p.textContent = text;
    box.append(document.createElement("br"), p);
  }
}

// -- evidence: the gallery photos that decided the refinement (asked with evidence=true) --------------
// Their text comes from the gallery's data source: it is only ever set as textContent, never parsed as HTML,
// and only http(s) urls become links (a javascript: url must not run when clicked).
function safeUrl(u) {
  try {
    const x = new URL(u);
    return x.protocol === "http:" || x.protocol === "https:" ? x.href : null;
  } catch (e) {
    return null;
  }
}

function el(tag, text, cls) {
  const n = document.createElement(tag);
  if (text !== undefined) n.textContent = text;
  if (cls) n.className = cls;
  return n;
}

function evidenceCard(e) {
  // similarity, distance, key, credit and (when the photo has an http(s) url) a link opening it in a new tab
  const div = el("div", undefined, "pigeon-evidence-card");
  div.append(el("strong", `similarity ${e.similarity.toFixed(3)}`), el("br"),
             `${Math.round(e.distance_km)} km from the answer · ${e.key}`);
  const credit = [e.author, e.license, e.source].filter(Boolean).join(" · ");
  if (credit) div.append(el("br"), credit);
  const href = e.url ? safeUrl(e.url) : null;
  if (href) {
    const link = el("a", "open the photo");
    link.href = href;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    div.append(el("br"), link);
  }
  return div;
}

function drawEvidence(a, layer) {
  // one small circle per evidence photo, its similarity in the tooltip, its card (and link) in the popup
  for (const e of a.evidence || []) {
    const m = L.circleMarker([e.lat, e.lon], { radius: 5, className: "pigeon-evidence", color: "#6a3d9a", weight: 1.5,
                                                fillColor: "#b294d6", fillOpacity: 0.85 })
      .bindTooltip(el("span", `similarity ${e.similarity.toFixed(2)}`))
      .bindPopup(evidenceCard(e));
    m.evidence = e;
    m.addTo(layer);
    page.evidenceLayers.push(m);
  }
}

function listEvidence(a) {
  const box = $("evidence-box");
  box.hidden = !a.evidence;
  if (!a.evidence) return;
  const n = a.evidence.length;
  $("evidence-note").textContent = n
    ? `${n} gallery photo${n > 1 ? "s" : ""} decided the refinement (${a.refinement.mode}), most similar first:`
    : `No gallery photo decided this answer (refinement: ${a.refinement ? a.refinement.mode : "none"}).`;
  const ol = $("evidence-list");
  ol.textContent = "";
  for (const e of a.evidence) {
    const li = el("li");
    li.append(evidenceCard(e));
    ol.appendChild(li);
  }
}

function drawCredible(a) {
  // the 50% and 90% credible regions: the fewest cells holding that probability, as land (asked with regions=true)
  for (const level of ["90", "50"]) {
    const r = a.regions && a.regions[level];
    if (!r || !r.geometry) continue;
    const strong = level === "50";
    const layer = L.geoJSON(r.geometry, {
      style: { className: "pigeon-cr" + level, color: "#0f8b8d", weight: strong ? 2 : 1.2, dashArray: strong ? null : "6 4",
               fillColor: "#0f8b8d", fillOpacity: strong ? 0.14 : 0.05 },
    }).bindTooltip(`${level}% region: ${r.n_cells} cell${r.n_cells === 1 ? "" : "s"} holding ${pct(r.probability)}, ` +
                   `${Math.round(r.area_km2).toLocaleString("en")} km²` + (r.contains_answer ? "" : " (the answer point lies outside it)"));
    layer.level = level;
    layer.addTo(page.answerLayer);
    page.credible[level] = layer;
  }
}

function fileStem(name) {
  return (name || "photo").replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_-]+/g, "_").slice(0, 60) || "photo";
}

async function download(format) {
  // re-send the last photo(s) asking for a map file, and offer the answer as a file (a Blob URL)
  if (!page.last) return;
  const { files, several } = page.last;
  const fd = requestForm(files, several);
  fd.append("format", format);
  setStatus(`Preparing the ${format === "kml" ? "KML" : "GeoJSON"} file …`);
  try {
    const r = await fetch("/locate", { method: "POST", body: fd, headers: headers() });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      setStatus(`Error ${r.status} (${body.error || "?"}): ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`, true);
      return;
    }
    const blob = await r.blob();
    if (page.download) URL.revokeObjectURL(page.download.url);
    const filename = `pigeon-${fileStem(files[0].name)}.${format}`;
    const url = URL.createObjectURL(blob);
    page.download = { url, filename, type: blob.type, size: blob.size };
    const link = $("download-link");
    link.href = url;
    link.download = filename;
    link.click();
    setStatus(`Saved ${filename} (${Math.round(blob.size / 1024)} kB).`);
  } catch (e) {
    setStatus("Request failed: " + e, true);
  }
}

async function drawRegion(a) {
  const reg = a.region_at_answer;
  $("region").textContent = reg
    ? `At the answer point: ${reg.admin1}, ${reg.country}` + (reg.at_sea ? " (the nearest region: the point is at sea)" : "")
    : "";
  if (!reg) return;
  const admin1 = await loadAdmin1();
  if (!admin1 || page.answer !== a) return;
  admin1.eachLayer((l) => {
    const p = l.feature.properties;
    if (p.admin1 === reg.admin1 && p.country === reg.country && !page.regionLayer) {
      page.regionLayer = L.geoJSON(l.feature, {
        style: { className: "pigeon-region", color: "#2a7d4f", weight: 2, fill: false },
        interactive: false,
      }).addTo(page.answerLayer);
    }
  });
}

async function showAnswer(a, views) {
  page.answer = a;
  $("answer").textContent =
    `Guess: ${a.lat.toFixed(3)}, ${a.lon.toFixed(3)} · confidence ${pct(a.confidence)}` +
    (views > 1 ? ` · ${views} views of one place, combined by ${a.combine}` : "") +
    (a.radius_km_50 ? ` · 50% within ${Math.round(a.radius_km_50)} km` : "") +
    (a.radius_km_90 ? `, 90% within ${Math.round(a.radius_km_90)} km` : "") +
    (a.exif_gps_present ? " · the file carried EXIF GPS (not used)" : "") +
    (a.within ? ` · within ${a.within.codes ? a.within.codes.join(", ") : "the drawn area"}` : "");
  listItems($("country-list"), (a.countries || []).map((c) => ({ label: `${c.name || "?"}${c.iso_a2 ? " (" + c.iso_a2 + ")" : ""}`, p: c.probability })));
  listItems($("cell-list"), (a.top_cells || []).map((c) => ({ label: `${c.admin1 || "cell " + c.cell_id}, ${c.country || ""}`, p: c.probability })));
  showMetadata(a.metadata);
  listEvidence(a);
  await drawAnswer(a);

  const box = $("explain-box");
  if (a.explain) {
    $("heatmap").src = "data:image/png;base64," + a.explain.heatmap.png_base64;
    const cues = $("cues");
    cues.textContent = "";
    for (const [group, rows] of Object.entries(a.explain.cues)) {
      const div = document.createElement("div");
      div.className = "cue";
      const h = document.createElement("h3");
      h.textContent = group.replace("_", " ");
      const ol = document.createElement("ol");
      listItems(ol, rows.map((r) => ({ label: r.label, p: r.probability })));
      div.append(h, ol);
      cues.appendChild(div);
    }
    box.hidden = false;
  } else {
    box.hidden = true;
  }
}

function showPreviews(files) {
  const box = $("previews");
  box.textContent = "";
  for (const f of files) {
    const img = document.createElement("img");
    img.alt = f.name;
    img.title = f.name;
    img.src = URL.createObjectURL(f);
    box.appendChild(img);
  }
}

async function locate(fileList) {
  const files = Array.from(fileList || []);
  if (!files.length) return;
  if (files.length > MAX_VIEWS) {
    setStatus(`${files.length} photos dropped: one place takes at most ${MAX_VIEWS} views; drop fewer`, true);
    return;
  }
  document.body.dataset.state = "busy";
  showPreviews(files);
  const several = files.length > 1;
  setStatus(several ? `Locating one place from ${files.length} views …` : `Locating ${files[0].name} …`);
  const fd = requestForm(files, several);
  fd.append("explain", !several && $("explain").checked ? "true" : "false");
  fd.append("regions", "true");
  page.last = null;
  setDownloads(false);
  try {
    const r = await fetch("/locate", { method: "POST", body: fd, headers: headers() });
    const body = await r.json();
    if (!r.ok) {
      const d = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      setStatus(`Error ${r.status} (${body.error}): ${d}`, true);
      document.body.dataset.state = "error";
      return;
    }
    await showAnswer(body, files.length);
    page.last = { files, several };
    setDownloads(true);
    setStatus(`Done in ${Math.round(body.timings_ms.total_ms)} ms.`);
    document.body.dataset.state = "answered";
  } catch (e) {
    setStatus("Request failed: " + e, true);
    document.body.dataset.state = "error";
  }
}

function requestForm(files, several) {
  const fd = new FormData();
  for (const f of files) fd.append("image", f, f.name);
  fd.append("top_k", "5");
  if (several) fd.append("same_place", "true");
  const within = $("within").value.trim();   // an area of interest: ISO codes; the answer must lie in it
  if (within) fd.append("within", within);
  fd.append("evidence", $("evidence").checked ? "true" : "false");
  return fd;
}

function setDownloads(on) {
  for (const id of ["download-geojson", "download-kml"]) $(id).disabled = !on;
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => locate(e.target.files));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) locate(e.dataTransfer.files);
  });
  $("download-geojson").addEventListener("click", () => download("geojson"));
  $("download-kml").addEventListener("click", () => download("kml"));
  const saved = window.localStorage && localStorage.getItem("pigeon-api-key");
  if (saved) $("apikey").value = saved;
  $("apikey").addEventListener("change", () => { try { localStorage.setItem("pigeon-api-key", $("apikey").value); } catch (e) {} });
}

wire();
initMap();
loadCountries()
  .then(() => { document.body.dataset.map = "ready"; })
  .catch((e) => setStatus("Could not load the world outline: " + e, true));
