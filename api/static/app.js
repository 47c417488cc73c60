// pigeon's web page: plain JS, no libraries, no network beyond this server.
// The map is equirectangular in SVG: x = lon, y = -lat, viewBox -180 -90 360 180.
"use strict";

const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
let cellsIndex = null; // cell_id -> GeoJSON geometry, loaded on first answer

function ringPath(ring) {
  let d = "";
  for (let i = 0; i < ring.length; i++) {
    const p = ring[i];
    d += (i ? "L" : "M") + p[0].toFixed(2) + "," + (-p[1]).toFixed(2);
  }
  return d + "Z";
}

function geomPath(g) {
  if (!g) return "";
  const polys = g.type === "Polygon" ? [g.coordinates] : g.type === "MultiPolygon" ? g.coordinates : [];
  return polys.map((poly) => poly.map(ringPath).join("")).join("");
}

function el(name, attrs) {
  const e = document.createElementNS(SVGNS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}

function drawGraticule() {
  const g = $("graticule");
  let d = "";
  for (let lon = -150; lon <= 150; lon += 30) d += `M${lon},-90L${lon},90`;
  for (let lat = -60; lat <= 60; lat += 30) d += `M-180,${-lat}L180,${-lat}`;
  g.appendChild(el("path", { d }));
}

async function drawWorld() {
  drawGraticule();
  try {
    const r = await fetch("/static/world.json");
    const world = await r.json();
    const g = $("countries");
    const frag = document.createDocumentFragment();
    for (const f of world.features) {
      const p = el("path", { d: geomPath(f.geometry), "data-iso": f.properties.iso_a2 || "" });
      const t = el("title", {});
      t.textContent = f.properties.name || "";
      p.appendChild(t);
      frag.appendChild(p);
    }
    g.appendChild(frag);
  } catch (e) {
    setStatus("Could not load the world outline: " + e, true);
  }
}

function headers() {
  const key = $("apikey").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function loadCells() {
  if (cellsIndex) return cellsIndex;
  const r = await fetch("/cells", { headers: headers() });
  if (!r.ok) return null;
  const gj = await r.json();
  cellsIndex = new Map();
  for (const f of gj.features) cellsIndex.set(Number(f.properties.cell_id ?? f.id), f.geometry);
  return cellsIndex;
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

async function showAnswer(a) {
  // marker and 50% radius (km -> degrees, widened in longitude by 1/cos(lat))
  const guess = $("guess");
  guess.textContent = "";
  const ky = (a.radius_km_50 || 0) / 111.2;
  const kx = ky / Math.max(0.05, Math.cos((a.lat * Math.PI) / 180));
  if (ky > 0) guess.appendChild(el("ellipse", { id: "radius50", cx: a.lon, cy: -a.lat, rx: Math.min(kx, 180), ry: Math.min(ky, 90) }));
  guess.appendChild(el("circle", { id: "marker", cx: a.lon, cy: -a.lat, r: 2.2, "data-lat": a.lat, "data-lon": a.lon }));

  $("answer").textContent =
    `Guess: ${a.lat.toFixed(3)}, ${a.lon.toFixed(3)} · confidence ${pct(a.confidence)}` +
    (a.radius_km_50 ? ` · 50% within ${Math.round(a.radius_km_50)} km` : "") +
    (a.radius_km_90 ? `, 90% within ${Math.round(a.radius_km_90)} km` : "") +
    (a.exif_gps_present ? " · the file carried EXIF GPS (not used)" : "");

  listItems($("country-list"), (a.countries || []).map((c) => ({ label: `${c.name || "?"}${c.iso_a2 ? " (" + c.iso_a2 + ")" : ""}`, p: c.probability })));
  listItems($("cell-list"), (a.top_cells || []).map((c) => ({ label: `${c.admin1 || "cell " + c.cell_id}, ${c.country || ""}`, p: c.probability })));

  // shade the top cells by probability
  const cg = $("cells");
  cg.textContent = "";
  const idx = await loadCells().catch(() => null);
  if (idx) {
    const pmax = Math.max(...a.top_cells.map((c) => c.probability), 1e-9);
    for (const c of a.top_cells) {
      const g = idx.get(Number(c.cell_id));
      if (!g) continue;
      cg.appendChild(el("path", { d: geomPath(g), "fill-opacity": (0.15 + 0.7 * (c.probability / pmax)).toFixed(3), "data-cell": c.cell_id }));
    }
  }

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

async function locate(file) {
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  setStatus("Locating " + file.name + " …");
  const fd = new FormData();
  fd.append("image", file, file.name);
  fd.append("top_k", "5");
  fd.append("explain", $("explain").checked ? "true" : "false");
  try {
    const r = await fetch("/locate", { method: "POST", body: fd, headers: headers() });
    const body = await r.json();
    if (!r.ok) {
      const d = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      setStatus(`Error ${r.status} (${body.error}): ${d}`, true);
      return;
    }
    await showAnswer(body);
    setStatus(`Done in ${Math.round(body.timings_ms.total_ms)} ms.`);
    document.body.dataset.state = "answered";
  } catch (e) {
    setStatus("Request failed: " + e, true);
  }
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => locate(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) locate(e.dataTransfer.files[0]);
  });
  const saved = window.localStorage && localStorage.getItem("pigeon-api-key");
  if (saved) $("apikey").value = saved;
  $("apikey").addEventListener("change", () => { try { localStorage.setItem("pigeon-api-key", $("apikey").value); } catch (e) {} });
}

wire();
drawWorld().then(() => { document.body.dataset.map = "ready"; });
