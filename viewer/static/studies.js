// The study list: search (the same matching as C-FIND), sorting, pages, analysis badges; studies that
// arrive while it is open (server-sent events); uploads.
import { api, dicomDate, el, personName, toast, upload, uploadResults } from "./common.js";

const form = document.getElementById("search");
const body = document.querySelector("#studies tbody");
const sortSelect = document.getElementById("sort-select");
const arrived = document.getElementById("arrived");
const phone = matchMedia("(max-width: 700px)");
const FIELDS = ["name", "id", "from", "to", "modality", "accession"];
const DESCENDING_FIRST = new Set(["date", "images"]);      // a first click on these puts the most first
let page = 0;
let shown = new Set();          // the studies on screen
const fresh = new Map();        // study UID -> when it arrived on screen (marked for a few seconds)
const FRESH_MS = 6000;
const waiting = new Set();      // studies that arrived since the list was last read
const own = new Set();          // studies this page uploaded to: not news to its reader
const elsewhere = new Set();    // arrived, but outside this search or page (until the reader searches)

function badges(jobs) {
  return Object.entries(jobs || {}).map(([state, count]) =>
    el("span", { class: `badge ${state}`, title: `${count} job(s) ${state}` }, state === "succeeded" ? "results" : state));
}

function row(s, fresh) {
  const href = `/studies/${s.study_uid}`;
  const date = dicomDate(s.date, s.time);
  const results = s.results ? `${s.results} result${s.results === 1 ? "" : "s"} made here` : "";
  return el("tr", { "data-study": s.study_uid, class: fresh ? "fresh" : null,
    onclick: (e) => { if (!e.target.closest("a")) location.href = href; } },
  el("td", { class: "patient", "data-label": "Patient" },
    el("a", { href, title: s.patient_name || "" }, personName(s.patient_name) || "(no name)")),
  el("td", { class: "pid", "data-label": "Patient ID" }, s.patient_id || ""),
  el("td", { class: "date", "data-label": "Date" },
    date.iso ? el("time", { datetime: date.iso, title: date.title }, date.text) : date.text),
  el("td", { class: "description", "data-label": "Description" }, s.description || ""),
  el("td", { class: "modalities", "data-label": "Modalities" }, (s.modalities || "").split(",").filter(Boolean).join(", ")),
  el("td", { class: "images", "data-label": "Images", title: "images received" + (results ? `; and ${results}` : "") },
    el("span", { class: "count" }, `${s.images ?? ""}`), el("span", { class: "unit" }, s.images === 1 ? " image" : " images"),
    results ? el("small", { class: "results" }, ` + ${results}`) : null),
  el("td", { class: "analysis", "data-label": "Analysis" }, badges(s.jobs)));
}

function filters() {
  return FIELDS.filter((f) => f !== "name" && form.elements[f].value.trim()).length;
}

function showSort() {
  const sort = form.elements.sort.value, order = form.elements.order.value;
  for (const th of document.querySelectorAll("#studies th[data-sort]")) {
    th.setAttribute("aria-sort", th.dataset.sort === sort ? (order === "asc" ? "ascending" : "descending") : "none");
  }
  const wanted = `${sort}:${order}`;
  if (![...sortSelect.options].some((o) => o.value === wanted)) {
    sortSelect.append(el("option", { value: wanted }, `${sort}, ${order === "asc" ? "ascending" : "descending"}`));
  }
  sortSelect.value = wanted;
  labelMore();
}

function labelMore() {
  const open = form.classList.contains("expanded"), set = filters();
  document.getElementById("more-toggle").textContent = open ? "Fewer filters" : set ? `More filters (${set} set)` : "More filters";
}

async function search(newPage = 0, { quiet = false } = {}) {
  page = newPage;
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(form)) if (String(value).trim()) params.set(key, value);
  if (page) params.set("page", page);
  history.replaceState(null, "", "?" + params);
  showSort();
  try {
    const answer = await api("/api/studies?" + params);
    const before = shown, now = Date.now();
    shown = new Set(answer.studies.map((s) => s.study_uid));
    for (const uid of shown) if (quiet && !before.has(uid) && !fresh.has(uid)) fresh.set(uid, now);
    for (const [uid, since] of fresh) if (now - since > FRESH_MS) fresh.delete(uid);
    body.replaceChildren(...answer.studies.map((s) => row(s, fresh.has(s.study_uid))));
    if (!answer.studies.length) {
      const empty = FIELDS.every((f) => !form.elements[f].value.trim()) && page === 0;
      body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 7 },
        empty ? (uploadBox ? "No studies yet: send one from a modality, or upload files above." : "No studies yet.") : "No study matches this search.")));
    }
    document.getElementById("page").textContent = `page ${page + 1}`;
    document.getElementById("previous").disabled = page === 0;
    document.getElementById("next").disabled = !answer.more;
    if (!quiet) elsewhere.clear();
    for (const uid of waiting) elsewhere.add(uid);
    waiting.clear();
    for (const uid of elsewhere) if (shown.has(uid) || own.has(uid)) elsewhere.delete(uid);
    const unseen = elsewhere.size;
    arrived.hidden = !unseen;
    if (unseen) {
      arrived.replaceChildren(`${unseen} new ${unseen === 1 ? "study has" : "studies have"} arrived that this `
        + "search or page does not show. ", el("button", { type: "button", onclick: newest }, "Show the newest"));
    }
  } catch (error) { if (!quiet) toast(error.message, "error"); }
}

function newest() {
  form.reset();
  for (const f of FIELDS) form.elements[f].value = "";
  form.elements.sort.value = "date";
  form.elements.order.value = "desc";
  search(0);
}

function sortBy(key, order) {
  form.elements.sort.value = key;
  form.elements.order.value = order;
  search(0);
}

// -- studies that arrive, and analyses that start or end, while the list is open ------------------------

let refresh = null;
function later() {
  if (refresh) return;
  refresh = setTimeout(async () => { await search(page, { quiet: true }); refresh = null; }, 800);
}

function listen() {
  const events = new EventSource("/api/events");
  events.addEventListener("change", (e) => {
    const event = JSON.parse(e.data);
    if (event.kind === "study_stored") { waiting.add(event.study_uid); later(); }
    else if (["job_queued", "job_running", "job_succeeded", "job_failed", "job_cancelled"].includes(event.kind)
             && shown.has(event.study_uid)) later();
  });
}

// -- the page's controls --------------------------------------------------------------------------------

form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (phone.matches) { fold(false); if (uploadBox) uploadBox.open = false; }      // the results, not the form, on the screen
  search(0);
});
for (const th of document.querySelectorAll("#studies th[data-sort]")) {
  th.querySelector("button").addEventListener("click", () => {
    const key = th.dataset.sort;
    const same = form.elements.sort.value === key;
    const order = same ? (form.elements.order.value === "asc" ? "desc" : "asc") : (DESCENDING_FIRST.has(key) ? "desc" : "asc");
    sortBy(key, order);
  });
}
sortSelect.addEventListener("change", () => sortBy(...sortSelect.value.split(":")));
document.getElementById("previous").addEventListener("click", () => search(Math.max(0, page - 1)));
document.getElementById("next").addEventListener("click", () => search(page + 1));

// On a phone the search shows the patient name only, the other fields behind "More filters", and
// the upload folds away; on a desktop everything is shown.
const moreToggle = document.getElementById("more-toggle");
function fold(open) {
  form.classList.toggle("expanded", open);
  moreToggle.setAttribute("aria-expanded", String(open));
  labelMore();
}
moreToggle.addEventListener("click", () => fold(!form.classList.contains("expanded")));
const uploadBox = document.getElementById("upload-box");     // absent for a role that stores nothing
function layout() {
  if (!phone.matches) fold(false);
  if (uploadBox) uploadBox.open = !phone.matches;
}
phone.addEventListener("change", layout);
layout();

// -- uploads --------------------------------------------------------------------------------------------

const uploadForm = document.getElementById("upload");
uploadForm?.addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = uploadForm.elements.files;
  const results = document.getElementById("upload-results");
  if (!input.files.length) {
    results.replaceChildren(el("p", { class: "error", role: "alert" },
      "No files chosen: first choose DICOM files or a zip with the button above, then press Upload."));
    input.focus();
    return;
  }
  const status = document.getElementById("upload-status");
  const button = uploadForm.querySelector("button[type=submit]");
  button.disabled = true;
  status.hidden = false;
  results.replaceChildren();
  try {
    const answer = await upload(new FormData(uploadForm), document.getElementById("upload-progress"),
      document.getElementById("upload-text"));
    for (const s of answer.studies) own.add(s.study_uid);
    uploadResults(results, answer);
    const stored = answer.files.filter((f) => f.outcome === "stored").length;
    toast(`${stored} file${stored === 1 ? "" : "s"} stored`, stored ? "success" : "info");
    uploadForm.reset();
    search(page, { quiet: true });
  } catch (error) {
    results.replaceChildren(el("p", { class: "error", role: "alert" }, `Nothing was stored: ${error.message}`));
  } finally {
    button.disabled = false;
    status.hidden = true;
  }
});

const start = new URLSearchParams(location.search);
search(Number(start.get("page") || 0));
listen();
