// leuko review page: plain JavaScript, no build step, no libraries, nothing from the internet.
//
// Flow: images are picked or dropped -> each is posted to /predict (a few at a
// time; the service batches concurrent requests) -> a grid of thumbnails with
// the predicted class and confidence -> a person accepts or corrects labels
// (mouse or keys) -> the differential count is asked of /count/labels on every
// change (one home for the arithmetic and its Wilson intervals) -> export.
"use strict";

const IMAGE_RE = /\.(jpe?g|png|bmp|tiff?|webp)$/i;
const PARALLEL_UPLOADS = 4;

const state = {
  model: null,        // GET /model
  classes: [],
  cells: [],          // {id, name, file, url, result, label, reviewed, error, pending}
  selected: null,     // cell id
  filter: "all",
  count: null,        // last /count/labels answer
  countSeq: 0,
  nextId: 0,
};

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ model
async function loadModel() {
  try {
    const r = await fetch("/model");
    if (!r.ok) throw new Error(await errorText(r));
    state.model = await r.json();
    state.classes = state.model.classes;
    const arch = state.model.architecture.name || "model";
    $("model-line").textContent =
      `${arch} (${state.model.backend}) · ${state.classes.length} classes · ` +
      `${state.model.input.image_size}px · T=${state.model.temperature.toFixed(3)}`;
    $("policy-line").textContent = state.model.review.description;
    $("explain").disabled = !state.model.explain;
    if (!state.model.explain) $("explain").title = "Grad-CAM is not available for ONNX models";
    renderClassButtons();
    refreshCount();
  } catch (e) {
    $("model-line").textContent = `cannot reach the service: ${e.message}`;
  }
}

async function errorText(r) {
  try {
    const body = await r.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    return `${r.status} ${r.statusText}`;
  }
}

// ------------------------------------------------------------------ adding images
function addFiles(files) {
  const images = files.filter((f) => IMAGE_RE.test(f.name));
  images.sort((a, b) => (a.webkitRelativePath || a.name).localeCompare(b.webkitRelativePath || b.name));
  const skipped = files.length - images.length;
  const added = images.map((file) => ({
    id: state.nextId++, name: file.webkitRelativePath || file.name, file,
    url: URL.createObjectURL(file), result: null, label: null, reviewed: false, error: null, pending: true,
  }));
  state.cells.push(...added);
  if (skipped) $("progress").textContent = `${skipped} non-image file(s) ignored`;
  renderGrid();
  uploadAll(added);
}

async function uploadAll(cells) {
  const queue = cells.slice();
  const worker = async () => {
    while (queue.length) {
      const cell = queue.shift();
      await predictCell(cell);
      updateTile(cell);
      renderProgress();
    }
  };
  renderProgress();
  await Promise.all(Array.from({ length: PARALLEL_UPLOADS }, worker));
  renderProgress();
  if (state.filter !== "all") renderGrid();  // finished cells may now belong to the filtered view
  renderSummary();
  refreshCount();
  if (state.selected === null) select(visibleCells()[0]?.id ?? null);
}

async function predictCell(cell) {
  const body = new FormData();
  body.append("files", cell.file, cell.file.name);
  try {
    const r = await fetch("/predict?top_k=3", { method: "POST", body });
    if (!r.ok) throw new Error(await errorText(r));
    const data = await r.json();
    cell.result = data.results[0];
    cell.label = cell.result.label;
  } catch (e) {
    cell.error = e.message;
  }
  cell.pending = false;
}

async function readEntry(entry, out) {
  if (entry.isFile) {
    const file = await new Promise((ok, fail) => entry.file(ok, fail));
    // keep the folder path for display and sorting (a drop has no webkitRelativePath)
    Object.defineProperty(file, "webkitRelativePath", { value: entry.fullPath.replace(/^\//, "") });
    out.push(file);
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
      if (!batch.length) break;
      for (const e of batch) await readEntry(e, out);
    }
  }
}

function setupInputs() {
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const entries = Array.from(ev.dataTransfer.items || []).map((it) => it.webkitGetAsEntry && it.webkitGetAsEntry()).filter(Boolean);
    const files = [];
    if (entries.length) for (const e of entries) await readEntry(e, files);
    else files.push(...Array.from(ev.dataTransfer.files || []));
    addFiles(files);
  });
  for (const id of ["pick-files", "pick-folder"]) {
    $(id).addEventListener("change", (ev) => { addFiles(Array.from(ev.target.files)); ev.target.value = ""; });
  }
  $("filter").addEventListener("change", (ev) => { state.filter = ev.target.value; renderGrid(); });
  $("clear").addEventListener("click", () => {
    for (const c of state.cells) URL.revokeObjectURL(c.url);
    state.cells = []; state.selected = null;
    renderGrid(); renderDetail(); renderSummary(); refreshCount();
    $("progress").textContent = "";
  });
  // buttons give focus back, so Enter/keys after a click act on the page, not on the button again
  $("accept").addEventListener("click", (ev) => { ev.currentTarget.blur(); acceptSelected(); });
  $("explain").addEventListener("click", (ev) => { ev.currentTarget.blur(); explainSelected(); });
  for (const [id, fn] of [["export-labels-csv", exportLabelsCsv], ["export-labels-json", exportLabelsJson],
                          ["export-count-csv", exportCountCsv], ["export-count-json", exportCountJson]]) {
    $(id).addEventListener("click", fn);
  }
}

// ------------------------------------------------------------------ cell state
const done = (c) => c.result !== null;
const needsReview = (c) => done(c) && c.result.review && !c.reviewed;
const corrected = (c) => done(c) && c.label !== c.result.label;

function visibleCells() {
  switch (state.filter) {
    case "review": return state.cells.filter(needsReview);
    case "corrected": return state.cells.filter(corrected);
    case "failed": return state.cells.filter((c) => c.error);
    default: return state.cells;
  }
}

const cellById = (id) => state.cells.find((c) => c.id === id);

function setLabel(cell, label) {
  if (!cell || !done(cell)) return;
  cell.label = label;
  cell.reviewed = true;
  updateTile(cell);
  renderDetail();
  renderSummary();
  refreshCount();
}

function step(delta, fromList) {
  const list = fromList || visibleCells();
  if (!list.length) return;
  const i = list.findIndex((c) => c.id === state.selected);
  const j = i < 0 ? 0 : Math.min(list.length - 1, Math.max(0, i + delta));
  select(list[j].id);
}

function labelAndNext(label) {
  const cell = cellById(state.selected);
  if (!cell || !done(cell)) return;
  const before = visibleCells();     // the cell may leave the filtered view once reviewed
  setLabel(cell, label);
  const after = visibleCells();
  const i = before.findIndex((c) => c.id === cell.id);
  const next = before.slice(i + 1).find((c) => after.includes(c)) || after.find((c) => c.id !== cell.id);
  if (next) select(next.id); else renderGrid();
}

function acceptSelected() {
  const cell = cellById(state.selected);
  if (cell && done(cell)) labelAndNext(cell.label);
}

// ------------------------------------------------------------------ rendering
function renderGrid() {
  const grid = $("grid");
  grid.replaceChildren(...visibleCells().map(makeTile));
  renderSummary();
}

function makeTile(cell) {
  const tile = document.createElement("div");
  tile.className = "tile";
  tile.dataset.id = cell.id;
  tile.setAttribute("role", "option");
  tile.addEventListener("click", () => select(cell.id));
  fillTile(tile, cell);
  return tile;
}

function fillTile(tile, cell) {
  tile.classList.toggle("selected", cell.id === state.selected);
  tile.classList.toggle("review", needsReview(cell));
  tile.classList.toggle("reviewed", cell.reviewed);
  tile.classList.toggle("failed", !!cell.error);
  tile.replaceChildren();
  const img = document.createElement("img");
  img.src = cell.url; img.alt = cell.name; img.loading = "lazy";
  tile.append(img);
  const cap = document.createElement("div");
  cap.className = "cap";
  if (cell.pending) {
    cap.textContent = "…";
  } else if (cell.error) {
    const err = document.createElement("div");
    err.className = "err"; err.textContent = cell.error;
    tile.append(err);
  } else {
    const lab = document.createElement("span");
    lab.className = "lab"; lab.textContent = cell.label;
    const conf = document.createElement("span");
    conf.className = "conf"; conf.textContent = `${Math.round(100 * cell.result.confidence)}%`;
    cap.append(lab, conf);
  }
  tile.append(cap);
  if (done(cell) && corrected(cell)) {
    const was = document.createElement("div");
    was.className = "was"; was.textContent = `was ${cell.result.label}`;
    tile.append(was);
  }
  const badge = document.createElement("span");
  if (needsReview(cell)) { badge.className = "badge review"; badge.textContent = "review"; }
  else if (corrected(cell)) { badge.className = "badge fixed"; badge.textContent = "fixed"; }
  else if (cell.reviewed) { badge.className = "badge done"; badge.textContent = "✓"; }
  if (badge.textContent) tile.append(badge);
  tile.title = cell.error ? cell.error : (done(cell) ? [cell.name, ...cell.result.review_reasons].join("\n") : cell.name);
}

function updateTile(cell) {
  const tile = $("grid").querySelector(`.tile[data-id="${cell.id}"]`);
  if (tile) fillTile(tile, cell);
}

function select(id) {
  const prev = state.selected;
  state.selected = id;
  if (prev !== null && cellById(prev)) updateTile(cellById(prev));
  if (id !== null && !$("grid").querySelector(`.tile[data-id="${id}"]`)) renderGrid();
  if (id !== null) {
    const cell = cellById(id);
    updateTile(cell);
    $("grid").querySelector(`.tile[data-id="${id}"]`)?.scrollIntoView({ block: "nearest" });
  }
  $("detail-cam").hidden = true;
  $("cam-status").textContent = "";
  renderDetail();
}

function renderClassButtons() {
  const box = $("class-buttons");
  box.replaceChildren(...state.classes.map((c, i) => {
    const b = document.createElement("button");
    b.type = "button"; b.dataset.label = c;
    const name = document.createElement("span");
    name.textContent = i < 9 ? `${i + 1} ${c}` : c;
    const p = document.createElement("span");
    p.className = "p";
    b.append(name, p);
    b.addEventListener("click", (ev) => { ev.currentTarget.blur(); labelAndNext(c); });
    return b;
  }));
}

function renderDetail() {
  const cell = state.selected === null ? null : cellById(state.selected);
  $("detail-empty").hidden = !!cell;
  $("detail-body").hidden = !cell;
  if (!cell) return;
  $("detail-img").src = cell.url;
  $("detail-name").textContent = cell.name;
  const reasons = $("detail-reasons");
  reasons.replaceChildren();
  if (cell.error) {
    $("detail-pred").textContent = `unreadable: ${cell.error}`;
  } else if (!done(cell)) {
    $("detail-pred").textContent = "predicting…";
  } else {
    const r = cell.result;
    $("detail-pred").textContent =
      `predicted ${r.label} (${(100 * r.confidence).toFixed(1)}%)` + (corrected(cell) ? ` → labelled ${cell.label}` : "") +
      (cell.reviewed ? " · reviewed" : "");
    for (const why of r.review_reasons) {
      const li = document.createElement("li"); li.textContent = why; reasons.append(li);
    }
    if (r.answered_by) {  // a routed run: which of its two networks answered, and why the robust one did
      const li = document.createElement("li");
      li.textContent = `answered by the ${r.answered_by} network` + (r.routed_because ? ` (${r.routed_because})` : "");
      reasons.append(li);
    }
  }
  for (const b of $("class-buttons").children) {
    const c = b.dataset.label;
    b.classList.toggle("current", done(cell) && cell.label === c);
    b.disabled = !done(cell);
    b.querySelector(".p").textContent = done(cell) ? `${(100 * cell.result.probs[c]).toFixed(0)}%` : "";
  }
  $("accept").disabled = !done(cell);
}

function renderProgress() {
  const total = state.cells.length;
  const pending = state.cells.filter((c) => c.pending).length;
  const failed = state.cells.filter((c) => c.error).length;
  $("progress").textContent = pending
    ? `predicting… ${total - pending}/${total}`
    : `${total} image(s)` + (failed ? `, ${failed} unreadable` : "");
}

function renderSummary() {
  const cells = state.cells.filter(done);
  const nReview = cells.filter(needsReview).length;
  const nFixed = cells.filter(corrected).length;
  const nDone = cells.filter((c) => c.reviewed).length;
  $("summary").textContent = cells.length
    ? `${nReview} need review · ${nDone} reviewed · ${nFixed} corrected`
    : "";
}

// ------------------------------------------------------------------ count
async function refreshCount() {
  if (!state.classes.length) return;
  const cells = state.cells.filter(done);
  const seq = ++state.countSeq;
  try {
    const r = await fetch("/count/labels", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ labels: cells.map((c) => c.label), review: cells.map(needsReview) }),
    });
    if (!r.ok) throw new Error(await errorText(r));
    const count = await r.json();
    if (seq !== state.countSeq) return;  // a newer answer is on its way
    state.count = count;
    renderCount();
  } catch (e) {
    $("count-note").hidden = false;
    $("count-note").textContent = `count failed: ${e.message}`;
  }
}

function renderCount() {
  const c = state.count;
  const body = $("count-table").querySelector("tbody");
  body.replaceChildren(...c.counts.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.label = row.label;
    for (const v of [row.label, row.count, row.percent.toFixed(1), `${row.ci95_low.toFixed(1)}–${row.ci95_high.toFixed(1)}`]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    return tr;
  }));
  $("count-total").textContent = c.n_cells;
  $("count-review").textContent = c.n_review ? `${c.n_review} still flagged for review` : "";
  $("count-note").hidden = !c.note;
  $("count-note").textContent = c.note || "";
  drawChart(c);
}

function drawChart(c) {
  // One row per class: bar = percentage, whisker = 95% Wilson interval; axis 0-100%.
  const NS = "http://www.w3.org/2000/svg";
  const svg = $("chart");
  const rowH = 20, left = 92, right = 38, top = 4, width = 330;
  const height = top + rowH * c.counts.length + 16;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const plotW = width - left - right;
  const x = (pct) => left + (plotW * pct) / 100;
  const el = (name, attrs, text) => {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  c.counts.forEach((row, i) => {
    const y = top + i * rowH;
    el("text", { x: left - 4, y: y + 13, "text-anchor": "end" }, row.label);
    el("rect", { class: "bar", x: left, y: y + 3, width: Math.max(0, x(row.percent) - left), height: rowH - 6 });
    if (c.n_cells) {
      el("line", { class: "ci", x1: x(row.ci95_low), x2: x(row.ci95_high), y1: y + rowH / 2, y2: y + rowH / 2 });
      for (const v of [row.ci95_low, row.ci95_high]) {
        el("line", { class: "ci", x1: x(v), x2: x(v), y1: y + 6, y2: y + rowH - 6 });
      }
    }
    el("text", { x: width - 2, y: y + 13, "text-anchor": "end" }, `${row.percent.toFixed(0)}%`);
  });
  const axisY = top + rowH * c.counts.length + 2;
  el("line", { x1: left, x2: left + plotW, y1: axisY, y2: axisY, stroke: "#999" });
  for (const t of [0, 50, 100]) el("text", { x: x(t), y: axisY + 12, "text-anchor": "middle" }, `${t}%`);
}

// ------------------------------------------------------------------ Grad-CAM
async function explainSelected() {
  const cell = cellById(state.selected);
  if (!cell || !done(cell) || !state.model?.explain) return;
  $("cam-status").textContent = "computing Grad-CAM…";
  const body = new FormData();
  body.append("file", cell.file, cell.file.name);
  try {
    const r = await fetch(`/explain?target=${encodeURIComponent(cell.label)}`, { method: "POST", body });
    if (!r.ok) throw new Error(await errorText(r));
    const blob = await r.blob();
    if (state.selected !== cell.id) return;
    const img = $("detail-cam");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    img.hidden = false;
    const network = r.headers.get("X-Leuko-Network");
    $("cam-status").textContent = `Grad-CAM for ${cell.label}${network ? ` (${network} network)` : ""}: warm colours = regions that raised this class`;
  } catch (e) {
    $("cam-status").textContent = `Grad-CAM failed: ${e.message}`;
  }
}

// ------------------------------------------------------------------ export
function csvField(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function toCsv(header, rows) {
  return [header, ...rows].map((r) => r.map(csvField).join(",")).join("\r\n") + "\r\n";
}

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url; a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function labelRows() {
  return state.cells.map((c) => ({
    name: c.name,
    predicted: done(c) ? c.result.label : null,
    confidence: done(c) ? Number(c.result.confidence.toFixed(4)) : null,
    label: done(c) ? c.label : null,
    corrected: done(c) ? corrected(c) : null,
    reviewed: c.reviewed,
    flagged: done(c) ? c.result.review : null,
    review_reasons: done(c) ? c.result.review_reasons.join("; ") : null,
    answered_by: done(c) ? (c.result.answered_by ?? null) : null,
    error: c.error,
  }));
}

function exportLabelsCsv() {
  const rows = labelRows();
  const header = ["name", "predicted", "confidence", "label", "corrected", "reviewed", "flagged", "review_reasons", "answered_by", "error"];
  download("leuko-labels.csv", toCsv(header, rows.map((r) => header.map((h) => r[h]))), "text/csv");
}

function exportLabelsJson() {
  const doc = { model: state.model?.architecture?.name ?? null, classes: state.classes, exported: new Date().toISOString(),
                cells: labelRows(), count: state.count };
  download("leuko-labels.json", JSON.stringify(doc, null, 1), "application/json");
}

function exportCountCsv() {
  if (!state.count) return;
  const c = state.count;
  const rows = c.counts.map((r) => [r.label, r.count, r.percent.toFixed(2), r.ci95_low.toFixed(2), r.ci95_high.toFixed(2)]);
  rows.push(["total", c.n_cells, c.n_cells ? "100.00" : "0.00", "", ""]);
  download("leuko-count.csv", toCsv(["label", "count", "percent", "ci95_low", "ci95_high"], rows), "text/csv");
}

function exportCountJson() {
  if (state.count) download("leuko-count.json", JSON.stringify(state.count, null, 1), "application/json");
}

// ------------------------------------------------------------------ keyboard
function onKey(ev) {
  if (ev.target.closest && ev.target.closest("input, select, textarea")) return;
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key;
  let handled = true;
  if (k === "ArrowRight" || k === "j" || k === "J" || k === "ArrowDown") step(+1);
  else if (k === "ArrowLeft" || k === "k" || k === "K" || k === "ArrowUp") step(-1);
  else if (k === "a" || k === "A" || k === "Enter") acceptSelected();
  else if (k === "e" || k === "E") explainSelected();
  else if (k === "r" || k === "R") {
    state.filter = state.filter === "review" ? "all" : "review";
    $("filter").value = state.filter;
    renderGrid();
  } else if (/^[1-9]$/.test(k) && Number(k) <= state.classes.length) labelAndNext(state.classes[Number(k) - 1]);
  else handled = false;
  if (handled) ev.preventDefault();
}

document.addEventListener("DOMContentLoaded", () => {
  setupInputs();
  document.addEventListener("keydown", onKey);
  renderDetail();
  loadModel();
});
