// leuko review page: plain JavaScript, no build step, no libraries, nothing from the internet.
//
// Flow: images are picked or dropped -> each is posted to /predict (a few at a
// time; the service batches concurrent requests) -> a grid of thumbnails with
// the predicted class and confidence -> a person accepts or corrects labels
// (mouse or keys) -> the differential count is asked of /count/labels on every
// change (one home for the arithmetic and its Wilson intervals) -> export.
//
// With a store (leuko serve --db) the page works on samples instead: a list of
// samples (#/), and one sample (#/samples/ID) whose cells, labels and count come
// from the service; every accept or correction is a review event saved as it
// happens (one at a time, in order), sign-off freezes the sample, and a cell's
// history shows who changed what. With --auth every call carries the reviewer's
// token (kept in this tab's sessionStorage only).
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
  who: null,          // GET /whoami: {store, auth, reviewer, model}
  view: "work",       // "samples" (the list) or "work" (a sample, or the stateless page)
  sample: null,       // GET /samples/ID (sample mode)
  saveChain: Promise.resolve(),
  saving: 0,
  historyFor: null,
};

const sampleMode = () => !!(state.who && state.who.store);
const signedOff = () => !!(state.sample && state.sample.status === "signed-off");

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ model
// ------------------------------------------------------------------ talking to the service
function token() { return sessionStorage.getItem("leuko.token") || ""; }

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  if (state.who?.auth || token()) headers.set("Authorization", `Bearer ${token()}`);
  const r = await fetch(path, { ...opts, headers });
  if (r.status === 401 && state.who?.auth) showLogin(await errorText(r.clone()));
  return r;
}

async function apiJson(path, opts = {}) {
  const r = await api(path, opts);
  if (!r.ok) throw new Error(await errorText(r));
  return r.json();
}

const postJson = (path, body) => apiJson(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});

function showMessage(text, kind = "error") {
  const m = $("message");
  m.textContent = text || "";
  m.className = kind;
  m.hidden = !text;
}

function reviewerName() {
  if (state.who?.auth) return null;  // the token names the reviewer
  const name = $("reviewer").value.trim();
  if (!name) {
    showMessage("Type your name in the reviewer box (top right) first: every review is signed with it.");
    $("reviewer").focus();
    throw new Error("no reviewer name");
  }
  localStorage.setItem("leuko.reviewer", name);
  return name;
}

async function boot() {
  let r;
  try {
    r = await fetch("/whoami", { headers: token() ? { Authorization: `Bearer ${token()}` } : {} });
  } catch (e) {
    $("model-line").textContent = `cannot reach the service: ${e.message}`;
    return;
  }
  if (r.status === 401) { state.who = { auth: true, store: true }; showLogin(token() ? await errorText(r) : ""); return; }
  if (!r.ok) { $("model-line").textContent = `cannot reach the service: ${await errorText(r)}`; return; }
  state.who = await r.json();
  renderWho();
  await loadModel();
  if (sampleMode()) route();
}

function showLogin(why) {
  $("login").hidden = false;
  $("signed-in").hidden = true;
  $("who-reviewer").hidden = true;
  $("samples-view").hidden = true;
  $("work").hidden = true;
  $("model-line").textContent = "sign in with your reviewer token";
  if (why) showMessage(why);
  $("token").focus();
}

function renderWho() {
  const w = state.who;
  $("login").hidden = true;
  $("signed-in").hidden = !w.auth;
  $("who-reviewer").hidden = w.auth || !w.store;
  if (w.auth) $("signed-in-name").textContent = `signed in as ${w.reviewer}`;
  else $("reviewer").value = localStorage.getItem("leuko.reviewer") || "";
  if (w.store) $("drop-note").textContent = "Images are kept in the lab store with this sample; each is predicted as it arrives.";
  $("export-sample").hidden = !w.store;
  $("export-scratch").hidden = !!w.store;
  $("clear").hidden = !!w.store;
}

async function loadModel() {
  try {
    const r = await api("/model");
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
  if (sampleMode()) { addToSample(images, skipped); return; }
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

// ------------------------------------------------------------------ samples
const UPLOAD_BATCH = 8;

async function addToSample(images, skipped) {
  if (!state.sample) { showMessage("The sample is still loading: add the images again in a moment."); return; }
  if (signedOff() || !images.length) return;
  let actor;
  try { actor = reviewerName(); } catch (_) { return; }
  const id = state.sample.id;
  const q = actor ? `?reviewer=${encodeURIComponent(actor)}` : "";
  const failed = [];
  let done = 0, dupes = 0;
  const post = async (files) => {
    const body = new FormData();
    for (const f of files) body.append("files", f, f.name);
    return apiJson(`/samples/${id}/cells${q}`, { method: "POST", body });
  };
  const absorb = (res) => {
    for (const c of res.added) state.cells.push(fromServer(c));
    dupes += res.duplicates.length;
    renderGrid();
  };
  for (let i = 0; i < images.length; i += UPLOAD_BATCH) {
    const batch = images.slice(i, i + UPLOAD_BATCH);
    $("progress").textContent = `adding… ${done}/${images.length}`;
    try {
      absorb(await post(batch));
    } catch (e) {  // one bad file refuses its batch: send them one by one, so the good ones go in
      if (batch.length === 1) failed.push(e.message);
      else for (const f of batch) { try { absorb(await post([f])); } catch (e1) { failed.push(e1.message); } }
    }
    done += batch.length;
  }
  await reloadSample();
  $("progress").textContent = `${state.cells.length} cell(s)` + (dupes ? `, ${dupes} already in this sample` : "") +
    (skipped ? `, ${skipped} non-image file(s) ignored` : "");
  if (failed.length) showMessage(`${failed.length} file(s) not added: ${failed.join("; ")}`);
  if (state.selected === null) select(visibleCells()[0]?.id ?? null);
}

function fromServer(c) {
  return {
    id: c.id, name: c.name, file: null, url: null, server: c,
    result: { ...c.prediction, name: c.name },
    label: c.label, reviewed: c.reviewed, error: null, pending: false,
  };
}

function imageInto(img, cell) {
  if (cell.url) { img.src = cell.url; return; }
  if (!state.who?.auth) { cell.url = `/cells/${cell.id}/image`; img.src = cell.url; return; }
  api(`/cells/${cell.id}/image`).then((r) => (r.ok ? r.blob() : null)).then((b) => {
    if (!b) return;
    cell.url = cell.url || URL.createObjectURL(b);
    img.src = cell.url;
  });
}

async function cellBlob(cell) {
  if (cell.file) return cell.file;
  const r = await api(`/cells/${cell.id}/image`);
  if (!r.ok) throw new Error(await errorText(r));
  return new File([await r.blob()], cell.name, { type: r.headers.get("Content-Type") || "image/png" });
}

function route() {
  const m = location.hash.match(/^#\/samples\/(\d+)$/);
  showMessage("");
  if (m) openSample(Number(m[1]));
  else showSamples();
}

async function showSamples() {
  state.view = "samples";
  state.sample = null;
  $("samples-view").hidden = false;
  $("work").hidden = true;
  const f = $("sample-filter").value;
  try {
    const list = await apiJson("/samples" + (f ? `?status=${encodeURIComponent(f)}` : ""));
    renderSampleList(list.samples);
  } catch (e) {
    showMessage(`cannot list the samples: ${e.message}`);
  }
  $("new-accession").focus();
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return `${d.toLocaleDateString()} ${d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
}

function renderSampleList(samples) {
  const body = $("sample-table").querySelector("tbody");
  body.replaceChildren(...samples.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    tr.dataset.accession = s.accession;
    tr.className = s.status;
    const link = document.createElement("a");
    link.href = `#/samples/${s.id}`; link.textContent = s.accession;
    const cells = [link, fmtTime(s.created_at), s.status, s.n_cells, s.n_reviewed, s.n_corrected, s.n_needs_review,
                   s.signed_off_by ? `${s.signed_off_by}, ${fmtTime(s.signed_off_at)}` : ""];
    for (const v of cells) {
      const td = document.createElement("td");
      if (v instanceof Node) td.append(v); else td.textContent = v;
      tr.append(td);
    }
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") location.hash = `#/samples/${s.id}`; });
    return tr;
  }));
  $("samples-empty").hidden = samples.length > 0;
}

async function createSample(ev) {
  ev.preventDefault();
  const accession = $("new-accession").value.trim();
  if (!accession) { $("new-accession").focus(); return; }
  let reviewer;
  try { reviewer = reviewerName(); } catch (_) { return; }
  try {
    const s = await postJson("/samples", { accession, reviewer });
    $("new-accession").value = "";
    location.hash = `#/samples/${s.id}`;
  } catch (e) {
    showMessage(e.message);
  }
}

async function openSample(id) {
  state.view = "work";
  $("samples-view").hidden = true;
  $("work").hidden = false;
  $("sample-bar").hidden = false;
  for (const c of state.cells) if (c.url && c.url.startsWith("blob:")) URL.revokeObjectURL(c.url);
  state.cells = []; state.selected = null; state.sample = null; state.count = null;
  renderGrid(); renderDetail();
  try {
    applySample(await apiJson(`/samples/${id}`));
  } catch (e) {
    showMessage(`cannot open sample ${id}: ${e.message}`);
    return;
  }
  $("progress").textContent = `${state.cells.length} cell(s)`;
  if (state.cells.length) select(state.cells[0].id);
}

async function reloadSample() {
  if (state.sample) applySample(await apiJson(`/samples/${state.sample.id}`), true);
}

function applySample(detail, keep) {
  state.sample = detail;
  const urls = new Map(state.cells.map((c) => [c.id, c.url]));
  state.cells = detail.cells.map((c) => ({ ...fromServer(c), url: keep ? urls.get(c.id) || null : null }));
  state.count = detail.count;
  renderSampleBar();
  renderGrid();
  renderCount();
  renderDetail();
  renderFields();
}

function renderSampleBar() {
  const s = state.sample;
  $("sample-title").textContent = s.accession;
  $("sample-status").textContent = s.status === "signed-off" ? "signed off" : "open";
  $("sample-status").className = `status ${s.status}`;
  $("sample-signed").textContent = s.status === "signed-off"
    ? `by ${s.signed_off_by}, ${fmtTime(s.signed_off_at)}: frozen (re-open to change it)` : `model ${s.model_name}`;
  $("sign-off").hidden = s.status === "signed-off";
  $("reopen-box").hidden = s.status !== "signed-off";
  $("drop").hidden = s.status === "signed-off";
  $("pick-fields-label").hidden = s.status === "signed-off";
  document.body.classList.toggle("frozen", s.status === "signed-off");
}

function saveReview(cell, label) {
  // optimistic: the grid moves on at once; saves go one at a time, in order; a refusal puts the cell back
  let reviewer;
  try { reviewer = reviewerName(); } catch (_) { return false; }
  const before = { label: cell.label, reviewed: cell.reviewed };
  const body = label === cell.label
    ? { action: "accept", label, reviewer, request_id: newId() }
    : { action: "relabel", label, reviewer, request_id: newId() };
  state.saving++;
  renderSaveStatus();
  const sampleId = state.sample.id;
  state.saveChain = state.saveChain.then(async () => {
    const live = () => cellById(cell.id) || cell;  // the sample may have been reloaded meanwhile (new cell objects)
    try {
      const res = await postJson(`/cells/${cell.id}/review`, body);
      const c = live();
      c.server = res.cell;
      c.label = res.cell.label;
      c.reviewed = res.cell.reviewed;
      if (state.sample?.id === sampleId) { state.count = res.count; renderCount(); }
      if (state.historyFor === cell.id) loadHistory(c);
    } catch (e) {
      const c = live();
      c.label = before.label;
      c.reviewed = before.reviewed;
      showMessage(`not saved (${cell.name}): ${e.message}`);
      if (state.sample?.id === sampleId) reloadSample().catch(() => {});  // signed off or changed elsewhere: show what is stored
    } finally {
      state.saving--;
      if (state.sample?.id === sampleId) {
        updateTile(live());
        renderSummary();
        if (state.selected === cell.id) renderDetail();
      }
      renderSaveStatus();
    }
  });
  return true;
}

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function renderSaveStatus() {
  $("save-status").textContent = state.saving ? `saving… (${state.saving})` : "all changes saved";
}

async function signOff() {
  let reviewer;
  try { reviewer = reviewerName(); } catch (_) { return; }
  await state.saveChain;
  try {
    applySample(await postJson(`/samples/${state.sample.id}/sign-off`, { reviewer }), true);
    showMessage(`${state.sample.accession} signed off: its count is frozen.`, "info");
  } catch (e) {
    showMessage(e.message);
  }
}

async function reopenSample() {
  const reason = $("reopen-reason").value.trim();
  if (!reason) { showMessage("Say why the sample is re-opened (it is kept in its history)."); $("reopen-reason").focus(); return; }
  let reviewer;
  try { reviewer = reviewerName(); } catch (_) { return; }
  try {
    applySample(await postJson(`/samples/${state.sample.id}/reopen`, { reason, reviewer }), true);
    $("reopen-reason").value = "";
    showMessage(`${state.sample.accession} re-opened.`, "info");
  } catch (e) {
    showMessage(e.message);
  }
}

async function loadHistory(cell) {
  state.historyFor = cell.id;
  try {
    const h = await apiJson(`/cells/${cell.id}/history`);
    if (state.historyFor !== cell.id) return;
    const p = h.cell.prediction;
    const items = [`${fmtTime(h.cell.added_at)} · model (${state.sample?.model_name ?? "model"}): ${p.label} ` +
                   `(${(100 * p.confidence).toFixed(0)}%)${p.review ? ", flagged for review" : ""} · added by ${h.cell.added_by}`];
    for (const e of h.events) {
      items.push(`${fmtTime(e.at)} · ${e.reviewer}: ` +
                 (e.action === "accept" ? `accepted ${e.label_after}` : `${e.label_before} → ${e.label_after}`));
    }
    $("history-list").replaceChildren(...items.map((t) => { const li = document.createElement("li"); li.textContent = t; return li; }));
    $("history").hidden = false;
  } catch (e) {
    $("history").hidden = true;
  }
}

function download_url(path, name) {
  api(path).then(async (r) => {
    if (!r.ok) throw new Error(await errorText(r));
    const a = document.createElement("a");
    const url = URL.createObjectURL(await r.blob());
    a.href = url; a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }).catch((e) => showMessage(`export failed: ${e.message}`));
}

async function predictCell(cell) {
  const body = new FormData();
  body.append("files", cell.file, cell.file.name);
  try {
    const r = await api("/predict?top_k=3", { method: "POST", body });
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
  $("delete-cell").addEventListener("click", (ev) => { ev.currentTarget.blur(); toggleDeleteSelected(); });
  $("pick-fields").addEventListener("change", (ev) => { addFieldsToSample(Array.from(ev.target.files)); ev.target.value = ""; });
  $("explain").addEventListener("click", (ev) => { ev.currentTarget.blur(); explainSelected(); });
  for (const [id, fn] of [["export-labels-csv", exportLabelsCsv], ["export-labels-json", exportLabelsJson],
                          ["export-count-csv", exportCountCsv], ["export-count-json", exportCountJson]]) {
    $(id).addEventListener("click", fn);
  }
  // samples
  $("new-sample").addEventListener("submit", createSample);
  $("sample-filter").addEventListener("change", showSamples);
  $("sign-off").addEventListener("click", (ev) => { ev.currentTarget.blur(); signOff(); });
  $("reopen").addEventListener("click", (ev) => { ev.currentTarget.blur(); reopenSample(); });
  $("reviewer").addEventListener("change", () => localStorage.setItem("leuko.reviewer", $("reviewer").value.trim()));
  const sampleExport = (fmt, what, suffix) => () => state.sample &&
    download_url(`/samples/${state.sample.id}/export?format=${fmt}&what=${what}`, `leuko-${state.sample.accession}${suffix}`);
  $("export-sample-csv").addEventListener("click", sampleExport("csv", "cells", ".csv"));
  $("export-sample-json").addEventListener("click", sampleExport("json", "cells", ".json"));
  $("export-sample-events").addEventListener("click", sampleExport("csv", "events", "-events.csv"));
  $("export-store-csv").addEventListener("click", () => download_url("/export?format=csv", "leuko-store.csv"));
  $("export-store-json").addEventListener("click", () => download_url("/export?format=json", "leuko-store.json"));
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("leuko.token", $("token").value.trim());
    $("token").value = "";
    showMessage("");
    boot();
  });
  $("sign-out").addEventListener("click", () => { sessionStorage.removeItem("leuko.token"); location.hash = "#/"; location.reload(); });
  window.addEventListener("hashchange", () => { if (sampleMode()) route(); });
  window.addEventListener("beforeunload", (ev) => { if (state.saving) { ev.preventDefault(); ev.returnValue = ""; } });
}

// ------------------------------------------------------------------ smear fields (a sample's whole field images)
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990"];
const classColour = (label) => PALETTE[Math.max(0, state.classes.indexOf(label)) % PALETTE.length];
const fieldCells = (fieldId) => state.cells.filter((c) => c.server && c.server.field_id === fieldId);

async function addFieldsToSample(files) {
  // one field per request: each is found, cut out and classified on the service, and one bad file refuses only itself
  if (!state.sample || signedOff()) return;
  const images = files.filter((f) => IMAGE_RE.test(f.name));
  if (!images.length) { showMessage("No field images among the chosen files (JPEG, PNG, BMP, TIFF or WebP)."); return; }
  let actor;
  try { actor = reviewerName(); } catch (_) { return; }
  const id = state.sample.id;
  const q = actor ? `?reviewer=${encodeURIComponent(actor)}` : "";
  const failed = [], notes = [];
  let dupes = 0, cells = 0;
  for (const [i, f] of images.entries()) {
    $("progress").textContent = `finding cells… field ${i + 1}/${images.length}`;
    const body = new FormData();
    body.append("files", f, f.name);
    try {
      const res = await apiJson(`/samples/${id}/fields${q}`, { method: "POST", body });
      dupes += res.duplicates.length;
      notes.push(...res.notes);
      for (const fd of res.added) cells += fd.cells.length;
    } catch (e) {
      failed.push(`${f.name}: ${e.message}`);
    }
  }
  await reloadSample();
  $("progress").textContent = `${cells} cell(s) found in ${images.length - failed.length - dupes} new field(s)` +
    (dupes ? `, ${dupes} field(s) already in this sample` : "");
  if (failed.length) showMessage(`${failed.length} field(s) not added: ${failed.join("; ")}`);
  else if (notes.length) showMessage(notes.join(" "), "info");
  if (state.selected === null) select(visibleCells()[0]?.id ?? null);
}

function fieldImageInto(img, field) {
  if (!state.who?.auth) { img.src = `/fields/${field.id}/image`; return; }
  api(`/fields/${field.id}/image`).then((r) => (r.ok ? r.blob() : null)).then((b) => { if (b) img.src = URL.createObjectURL(b); });
}

function renderLegend() {
  const legend = $("field-legend");
  const key = (colour, text, dashed) => {
    const k = document.createElement("span"); k.className = "key";
    const sw = document.createElement("span"); sw.className = "swatch" + (dashed ? " dashed" : ""); sw.style.color = colour;
    k.append(sw, text);
    return k;
  };
  legend.replaceChildren(...state.classes.map((c) => key(classColour(c), c)),
                         key("#888", "repeat / deleted", true));
}

function renderFields() {
  const fields = (state.sample && state.sample.fields) || [];
  $("fields").hidden = !fields.length;
  if (!fields.length) { $("field-list").replaceChildren(); return; }
  renderLegend();
  const list = $("field-list");
  const kept = new Map(Array.from(list.children, (fig) => [Number(fig.dataset.id), fig]));
  list.replaceChildren(...fields.map((f) => {
    const fig = kept.get(f.id) || makeField(f);
    drawBoxes(fig, f);
    return fig;
  }));
}

function makeField(field) {
  const fig = document.createElement("figure");
  fig.className = "field"; fig.dataset.id = field.id;
  const cap = document.createElement("figcaption");
  const wrap = document.createElement("div"); wrap.className = "field-canvas";
  const img = document.createElement("img");
  img.alt = field.name; img.width = field.width; img.height = field.height;
  img.style.width = `${Math.min(field.width, 420)}px`;
  fieldImageInto(img, field);
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${field.width} ${field.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.addEventListener("click", (ev) => {
    if (ev.target.classList.contains("box")) return;  // a box's own handler selects it
    const pt = svg.createSVGPoint(); pt.x = ev.clientX; pt.y = ev.clientY;
    const at = pt.matrixTransform(svg.getScreenCTM().inverse());
    addMissedCell(field, Math.round(at.x), Math.round(at.y), svg);
  });
  wrap.append(img, svg);
  fig.append(cap, wrap);
  return fig;
}

function drawBoxes(fig, field) {
  const cells = fieldCells(field.id);
  const counted = cells.filter((c) => c.server.counted).length;
  fig.querySelector("figcaption").textContent =
    `${field.name}: ${cells.filter((c) => !c.server.deleted).length} cell(s), ${counted} counted`;
  const svg = fig.querySelector("svg");
  svg.replaceChildren(...cells.map((c) => {
    const [x0, y0, x1, y1] = c.server.box;
    const r = document.createElementNS(SVG_NS, "rect");
    r.setAttribute("x", x0); r.setAttribute("y", y0);
    r.setAttribute("width", x1 - x0); r.setAttribute("height", y1 - y0);
    r.setAttribute("class", "box" + (c.server.deleted ? " deleted" : "") + (c.server.repeat_of != null ? " repeat" : "") +
                            (c.id === state.selected ? " selected" : ""));
    r.style.stroke = classColour(c.label);
    r.dataset.id = c.id; r.dataset.label = c.label;
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `${c.label}` + (c.server.deleted ? " (deleted)" : "") +
      (c.server.repeat_of != null ? ` (repeat of cell ${c.server.repeat_of})` : "") + (c.server.edge ? " (cut by the edge)" : "");
    r.append(title);
    r.addEventListener("click", (ev) => { ev.stopPropagation(); select(c.id); });
    return r;
  }));
}

async function addMissedCell(field, x, y, svg) {
  if (signedOff()) { showMessage(`${state.sample.accession} is signed off: re-open it to add a cell.`); return; }
  let reviewer;
  try { reviewer = reviewerName(); } catch (_) { return; }
  const mark = document.createElementNS(SVG_NS, "circle");
  mark.setAttribute("cx", x); mark.setAttribute("cy", y); mark.setAttribute("r", 8); mark.setAttribute("class", "pending");
  svg.append(mark);
  await state.saveChain;
  try {
    const res = await postJson(`/fields/${field.id}/cells`, { point: [x, y], reviewer, request_id: newId() });
    await reloadSample();
    select(res.cell.id);
    showMessage(`cell added to ${field.name} (box from the ${res.box_from === "nucleus" ? "nucleus found there" : "click"}): ` +
                `${res.cell.label}`, "info");
  } catch (e) {
    mark.remove();
    showMessage(`not added: ${e.message}`);
  }
}

async function toggleDeleteSelected() {
  const cell = cellById(state.selected);
  if (!cell || !cell.server || cell.server.field_id == null) return;
  if (signedOff()) { showMessage(`${state.sample.accession} is signed off: re-open it to change it.`); return; }
  let reviewer;
  try { reviewer = reviewerName(); } catch (_) { return; }
  const action = cell.server.deleted ? "restore" : "delete";
  await state.saveChain;
  try {
    await postJson(`/cells/${cell.id}/review`, { action, reviewer, request_id: newId() });
    const id = cell.id;
    await reloadSample();
    select(id);
  } catch (e) {
    showMessage(`not ${action}d (${cell.name}): ${e.message}`);
  }
}

function renderFieldCount(c) {
  const el = $("count-fields");
  const parts = [];
  if (c.repeats_merged) parts.push(`${c.repeats_merged} repeat(s) in overlapping fields merged`);
  if (c.deleted) parts.push(`${c.deleted} deleted as not white cells`);
  if (c.edge_cells_counted) parts.push(`${c.edge_cells_counted} cut by the edge counted once`);
  if (c.edge_cells_dropped) parts.push(`${c.edge_cells_dropped} cut by the edge left out`);
  el.hidden = !parts.length;
  el.textContent = parts.join(" · ");
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
  if (sampleMode()) {
    if (signedOff()) { showMessage(`${state.sample.accession} is signed off: re-open it to change a label.`); return; }
    if (!saveReview(cell, label)) return;
  }
  cell.label = label;
  cell.reviewed = true;
  updateTile(cell);
  renderDetail();
  if (state.sample?.fields?.length) renderFields();
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
  if (sampleMode() && (signedOff() || !state.who.auth && !$("reviewer").value.trim())) { setLabel(cell, label); return; }
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
  tile.classList.toggle("deleted", !!cell.server?.deleted);
  tile.replaceChildren();
  const img = document.createElement("img");
  imageInto(img, cell); img.alt = cell.name; img.loading = "lazy";
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
  if (cell.server?.deleted) { badge.className = "badge deleted"; badge.textContent = "deleted"; }
  else if (needsReview(cell)) { badge.className = "badge review"; badge.textContent = "review"; }
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
  $("history").hidden = true;
  state.historyFor = null;
  renderDetail();
  if (state.sample?.fields?.length) renderFields();
  if (sampleMode() && id !== null && cellById(id)) loadHistory(cellById(id));
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
  imageInto($("detail-img"), cell);
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
    b.disabled = !done(cell) || signedOff();
    b.querySelector(".p").textContent = done(cell) ? `${(100 * cell.result.probs[c]).toFixed(0)}%` : "";
  }
  $("accept").disabled = !done(cell) || signedOff();
  const inField = !!(cell.server && cell.server.field_id != null);
  $("delete-cell").hidden = !inField;
  $("delete-cell").disabled = signedOff();
  $("delete-cell").textContent = cell.server?.deleted ? "↺ restore (a white cell after all) D" : "✗ not a white cell D";
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
  if (sampleMode()) { if (state.count) renderCount(); return; }  // the service answers every review with the count
  const cells = state.cells.filter(done);
  const seq = ++state.countSeq;
  try {
    const r = await api("/count/labels", {
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
  if (!c) return;
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
  renderFieldCount(c);
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
  try {
    const file = await cellBlob(cell);
    const body = new FormData();
    body.append("file", file, file.name);
    const r = await api(`/explain?target=${encodeURIComponent(cell.label)}`, { method: "POST", body });
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
  if (state.view !== "work" || $("work").hidden) return;
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key;
  let handled = true;
  if (k === "ArrowRight" || k === "j" || k === "J" || k === "ArrowDown") step(+1);
  else if (k === "ArrowLeft" || k === "k" || k === "K" || k === "ArrowUp") step(-1);
  else if (k === "a" || k === "A" || k === "Enter") acceptSelected();
  else if (k === "e" || k === "E") explainSelected();
  else if ((k === "d" || k === "D") && sampleMode()) toggleDeleteSelected();
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
  boot();
});
