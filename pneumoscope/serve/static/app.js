// pneumoscope viewer: plain JS, no build. Every value from the server is inserted as text, never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;          // id of the study on display
let blobUrls = [];           // object URLs of the images on display (revoked when replaced)

function authHeaders() {
  const key = $("api-key").value;
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    throw new Error(`${r.status}: ${detail}`);
  }
  return r;
}

async function blobUrl(path) {
  const url = URL.createObjectURL(await (await api(path)).blob());
  blobUrls.push(url);
  return url;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(3));

function reviewText(decision, reviewer) {
  return decision ? `${decision === "agree" ? "agreed" : "disagreed"} (${reviewer})` : "not reviewed";
}

const NOT_ASSESSED = "not assessed";

async function showStudy(id, heatmapBase64 = null) {
  const s = await (await api(`/studies/${encodeURIComponent(id)}`)).json();
  blobUrls.forEach((u) => URL.revokeObjectURL(u));
  blobUrls = [];
  current = id;
  $("result").hidden = false;
  $("image").src = await blobUrl(s.image_url);
  const p = s.prediction || {};
  const assessed = p.label && p.label !== NOT_ASSESSED;
  // a map only for a film labelled PNEUMONIA (the server's HEATMAP_RULE): never requested for the others
  const heat = $("heatmap");
  heat.hidden = true;
  if (p.label === "PNEUMONIA") {
    if (heatmapBase64) {
      heat.src = "data:image/png;base64," + heatmapBase64;
      heat.hidden = false;
    } else if ($("want-heatmap").checked || p.has_heatmap) {
      try { heat.src = await blobUrl(s.heatmap_url); heat.hidden = false; } catch (e) { heat.hidden = true; }
    }
  }
  heat.style.opacity = $("opacity").value / 100;
  $("legend").hidden = heat.hidden;
  $("heatmap-note").textContent = p.label === "NORMAL"
    ? "No heatmap: maps are shown only for films labelled PNEUMONIA (on a normal film a map of evidence for pneumonia would read as a finding)."
    : p.label === NOT_ASSESSED ? "No heatmap: the model did not assess this film." : "";
  // the headline: the label; for a film the model did not assess, that and why, never a probability
  $("label").textContent = assessed ? p.label : p.label ? "not assessed: the model cannot read this image (reasons below)" : "";
  $("label").className = "label " + (assessed ? p.label : "not-assessed");
  $("figures").hidden = !assessed;
  $("probability").textContent = fmt(p.probability);
  $("calibrated").textContent = p.calibrated_probability === null
    ? "– (not calibrated: the label uses the raw probability)" : fmt(p.calibrated_probability);
  $("threshold").textContent = p.threshold === undefined ? "–" :
    `${fmt(p.threshold)} on the ${p.calibrated_probability === null ? "probability" : "calibrated probability"}`;
  $("study-id").textContent = id;
  const ul = $("warnings");
  ul.replaceChildren(...s.study.warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
  const last = s.reviews[s.reviews.length - 1];
  $("review-status").textContent = last ? reviewText(last.decision, last.reviewer) : "not reviewed";
  markCurrent();
}

function markCurrent() {
  for (const tr of $("studies").tBodies[0].rows) tr.classList.toggle("current", tr.dataset.id === current);
}

async function refreshList() {
  const { studies } = await (await api("/studies?limit=100")).json();
  const rows = studies.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    const cells = [s.predicted ? s.predicted.replace("T", " ").slice(0, 19) : "–", s.filename || "–",
                   s.patient_id || "–", s.id.slice(0, 12) + "…", s.label || "–",
                   s.label === NOT_ASSESSED ? "not assessed" : fmt(s.calibrated_probability ?? s.probability),
                   reviewText(s.review_decision, s.review_reviewer)];
    for (const c of cells) tr.appendChild(Object.assign(document.createElement("td"), { textContent: c }));
    tr.cells[1].className = "file-cell";
    tr.cells[2].className = "patient-cell";
    tr.cells[2].title = s.patient_id || "";
    tr.cells[4].className = s.label || "";
    tr.cells[6].className = "review-cell";
    tr.addEventListener("click", () => showStudy(s.id).catch((e) => setStatus(e.message, true)));
    return tr;
  });
  $("studies").tBodies[0].replaceChildren(...rows);
  markCurrent();
}

async function refreshWorklist() {
  const { rule, items } = await (await api("/worklist?limit=200")).json();
  $("worklist-rule").textContent = `Order: ${rule}.`;
  const rows = items.map((w) => {
    const tr = document.createElement("tr");
    tr.dataset.id = w.study_id;
    const notAssessed = w.label === "not assessed";
    const cells = [String(w.position), w.tier, w.filename || "–", w.patient_id || "–",
                   notAssessed ? "not assessed" : fmt(w.calibrated_probability ?? w.probability),
                   w.received ? w.received.replace("T", " ").slice(0, 19) : "–"];
    for (const c of cells) tr.appendChild(Object.assign(document.createElement("td"), { textContent: c }));
    tr.className = "tier-" + w.tier.replace(/ /g, "-");
    tr.cells[2].className = "file-cell";
    tr.addEventListener("click", () => showStudy(w.study_id).catch((e) => setStatus(e.message, true)));
    return tr;
  });
  $("worklist").tBodies[0].replaceChildren(...rows);
}

async function refreshAll() {
  await Promise.all([refreshList(), refreshWorklist()]);
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  setStatus(`analysing ${files.length} file(s)…`);
  try {
    const heat = $("want-heatmap").checked;
    const out = await (await api(`/predict?heatmap=${heat}`, { method: "POST", body: form })).json();
    const first = out.results[0];
    await showStudy(first.study_id, first.heatmap_png_base64);
    await refreshAll();
    setStatus(`${out.results.length} file(s) analysed in ${Math.round(out.latency_ms)} ms` +
              (first.duplicate ? " (seen before: added to the existing study)" : ""));
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function review(decision) {
  if (!current) return;
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { setStatus("enter the reviewer's name first", true); return; }
  try {
    const r = await (await api(`/studies/${encodeURIComponent(current)}/review`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reviewer, decision, comment: $("comment").value }),
    })).json();
    $("review-status").textContent = reviewText(r.decision, r.reviewer);
    setStatus("review saved");
    await refreshAll();
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function openReport() {
  if (!current) return;
  try {
    const r = await api(`/studies/${encodeURIComponent(current)}/report?format=html`);
    window.open(URL.createObjectURL(await r.blob()), "_blank", "noopener");
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function init() {
  $("api-key").value = sessionStorage.getItem("pneumoscope-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("pneumoscope-api-key", $("api-key").value);
    refreshAll().then(() => setStatus("")).catch((e) => setStatus(e.message, true));
  });
  $("file-input").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); });
  $("opacity").addEventListener("input", (e) => { $("heatmap").style.opacity = e.target.value / 100; });
  $("agree").addEventListener("click", () => review("agree"));
  $("disagree").addEventListener("click", () => review("disagree"));
  $("report").addEventListener("click", openReport);
  $("refresh").addEventListener("click", () => refreshAll().catch((e) => setStatus(e.message, true)));
  try {
    const h = await (await fetch("/health")).json();
    $("model").textContent = `model ${h.model.name} ${h.model.version || ""} (${h.model.checksum.slice(7, 19)})`;
    $("key-box").hidden = !h.api_key_required;
    if (h.api_key_required && !$("api-key").value) { setStatus("enter the API key to start"); return; }
    await refreshAll();
  } catch (e) {
    setStatus(e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", init);
