// The study page: series with labels that tell them apart, a 2D viewer rendered on the server
// (zoom, pan, window/level, slices; mouse, keys, touch), the four-view mammography hanging,
// analysis marks and what each analysis says about each image (not run, running, found nothing,
// found, failed), structured reports as a findings table, jobs with notifications, sharing.
import { api, dicomDate, el, personName, toast } from "./common.js";
import { ImageView } from "./view2d.js";
import { renderReport } from "./report.js";
import { loadExports, loadJobs, loadPlugins, loadShares, setUpSharing } from "./panels.js";

const root = document.getElementById("study");
const studyUid = root.dataset.study;
const shared = root.dataset.share === "yes";
const mayAnalyse = root.dataset.analyse === "yes";   // the role's rights (viewer/roles.py)
const mayShare = root.dataset.links === "yes";
const viewerSection = document.querySelector("section.viewer");
const viewportBox = document.getElementById("viewport");
const hangingBox = document.getElementById("hanging");
const documentView = document.getElementById("document");
const slider = document.getElementById("slice");
const sliceRow = document.getElementById("slice-row");
const sliceInfo = document.getElementById("slice-info");
const marksToggle = document.getElementById("marks");
const presetSelect = document.getElementById("preset");
const toHanging = document.getElementById("to-hanging");
const main = new ImageView(viewportBox);
const touch = window.matchMedia("(pointer: coarse)").matches;

let study = null;
let findings = {};                 // marks and outcome by image (findings.json of the newest job)
let states = {};                   // each image's analysis states (/analysis)
const infos = new Map();           // image info by SOP Instance UID (promises)
let current = { series: null, index: 0, uid: null, info: null };
let mode = "image";                // image | hanging | document
let hanging = null;                // { RCC: series index, ... } when the study is a mammography examination
let panels = [];                   // the hanging's views
let tool = "pan";
let showing = 0;                   // the newest show() asked for; older answers are dropped

const PRESETS = {
  CT: [["Soft tissue", 40, 400], ["Bone", 400, 2000], ["Lung", -600, 1500], ["Brain", 40, 80]],
  MG: [["High contrast", null, 0.5]],
};
const VIEWS = ["RCC", "LCC", "RMLO", "LMLO"];          // the hanging: right views left, chest walls meeting
const NO_IMAGE = ["1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.11."];

// The head says who and when as people write it
const nameHead = document.getElementById("patient-name");
if (nameHead.dataset.name) nameHead.textContent = personName(nameHead.dataset.name);
const dateHead = document.getElementById("study-date");
if (dateHead.dataset.date) {
  const date = dicomDate(dateHead.dataset.date);
  dateHead.textContent = date.text;
  if (date.title) dateHead.title = date.title;
}

const known = new Map();           // the same, once answered
function info(uid) {
  if (!infos.has(uid)) {
    const asked = api(`/api/instances/${uid}/info`);
    asked.then((meta) => known.set(uid, meta), () => infos.delete(uid));
    infos.set(uid, asked);
  }
  return infos.get(uid);
}

const seriesOf = (uid) => study.series.findIndex((s) => s.instances.some((i) => i.sop_instance_uid === uid));
const instanceOf = (uid) => study.series[seriesOf(uid)]?.instances.find((i) => i.sop_instance_uid === uid);
const labelOfImage = (uid) => instanceOf(uid)?.label || study.series[seriesOf(uid)]?.label || "";

// laterality, view and orientation of an image: its own (a mammogram says it), else its series'
function factsOf(series, index) {
  const instance = series.instances[index] || {};
  const own = instance.laterality !== undefined || instance.view !== undefined;
  return own ? { ...instance, modality: series.modality } : index === 0 || series.instances.length === 1 ? series : {};
}
const labelOfSeries = (seriesUid) => study.series.find((s) => s.series_uid === seriesUid)?.label || "";

// A mammogram is shown as the hanging wants it: right views with the chest wall on the right,
// left views with it on the left (Patient Orientation's row direction: posterior, anterior)
function mirrored(series, index = 0) {
  if (series.modality !== "MG") return false;
  const facts = factsOf(series, index);
  const rows = (facts.orientation || [])[0] || "";
  return (facts.laterality === "R" && rows.startsWith("A")) || (facts.laterality === "L" && rows.startsWith("P"));
}

function labelsFor(series, index) {
  const date = dicomDate(study.study_date);
  const stack = series.instances.length > 1 ? `Image ${index + 1} / ${series.instances.length}` : "";
  const description = series.description && !series.label.includes(series.description)
    ? series.description : "";
  return {
    tl: [personName(study.patient_name) || "(no name)", study.patient_id, date.text],
    tr: [series.instances[index]?.label || series.label, description, stack],
  };
}

function marksOf(uid, meta) {
  const found = findings[uid];
  if (!found) return [];
  const spacing = meta?.pixel_spacing?.[0] || 0.1;
  const isolated = found.calcifications.filter((c) => !c.cluster_id);
  return [...found.clusters.map((c) => ({ ...c, kind: "cluster", radius: c.radius_mm / spacing })),
          ...isolated.map((c) => ({ ...c, kind: "calcification", radius: 6 }))];
}

// -- the study and its series ------------------------------------------------------------------

async function loadStudy(keep = false) {
  [study, findings, states] = await Promise.all([api(`/api/studies/${studyUid}`), api(`/api/studies/${studyUid}/findings`),
                                                 api(`/api/studies/${studyUid}/analysis`).then((a) => a.images)]);
  hanging = hangingOf(study);
  listSeries();
  if (keep && mode === "hanging" && hanging) return showHanging();
  if (keep && current.series !== null && study.series[current.series]) {
    const series = study.series[current.series];
    main.marks = marksOf(current.uid, current.info);
    main.labels = labelsFor(series, current.index);
    if (mode === "image") main.draw();
    listFindings();
    return;
  }
  if (hanging) return showHanging();
  const firstImage = study.series.findIndex((s) => !s.result);
  await show(firstImage >= 0 ? firstImage : 0, 0);
}

// { RCC: { series, index }, ... }: the first image of each standard view, in one series or several
function hangingOf(found) {
  const slots = {};
  found.series.forEach((s, i) => {
    if (s.result || s.modality !== "MG") return;
    s.instances.forEach((_, j) => {
      const facts = factsOf(s, j);
      const key = `${facts.laterality || ""}${facts.view || ""}`;
      if (VIEWS.includes(key) && !(key in slots)) slots[key] = { series: i, index: j };
    });
  });
  return Object.keys(slots).length >= 2 ? slots : null;
}

function listSeries() {
  const list = document.getElementById("series-list");
  const items = study.series.map((s, i) => {
    const first = s.instances[0];
    const from = s.result ? `from ${s.source || "this study"}` : s.description && !s.label.includes(s.description) ? s.description : "";
    return el("button", { type: "button", class: `series-item${s.result ? " result" : ""}`, "data-series": i,
                          "data-label": s.label, onclick: () => show(i, 0) },
      NO_IMAGE.some((c) => first.sop_class_uid.startsWith(c))
        ? el("span", { class: "no-thumb", "aria-hidden": "true" }, s.modality || "?")
        : el("img", { src: `/api/instances/${first.sop_instance_uid}/render?width=96&format=jpeg`, alt: "", loading: "lazy",
                      onerror: (e) => e.target.replaceWith(el("span", { class: "no-thumb", "aria-hidden": "true" }, s.modality || "?")) }),
      el("span", { class: "series-label" }, s.label),
      el("small", {}, [from, `${s.instances.length} ${s.instances.length === 1 ? "object" : "objects"}`].filter(Boolean).join(" · ")));
  });
  if (hanging) {
    items.unshift(el("button", { type: "button", class: "series-item hanging-item", "data-series": "hanging", onclick: showHanging },
      el("span", { class: "four", "aria-hidden": "true" }, ...VIEWS.map((v) => el("span", {}, `${v[0]} ${v.slice(1)}`))),
      el("span", { class: "series-label" }, "4 views"), el("small", {}, "screening hanging")));
  }
  list.replaceChildren(...items);
  highlightSeries();
}

function highlightSeries() {
  document.querySelectorAll(".series-item").forEach((b) => {
    const active = mode === "hanging" ? b.dataset.series === "hanging" : Number(b.dataset.series) === current.series;
    b.classList.toggle("active", active);
    if (active) b.setAttribute("aria-current", "true"); else b.removeAttribute("aria-current");
  });
}

function setMode(next) {
  mode = next;
  viewportBox.hidden = next !== "image";
  hangingBox.hidden = next !== "hanging";
  documentView.hidden = next !== "document";
  toHanging.hidden = !hanging || next === "hanging";
  document.querySelectorAll(".toolbar [data-tool], #preset, #zoom-in, #zoom-out, #fit")
    .forEach((b) => { b.disabled = next !== "image"; });
  if (next !== "image") sliceRow.hidden = true;
  root.dataset.mode = next;
}

async function show(seriesIndex, index = 0, { zoom } = {}) {
  const series = study.series[seriesIndex];
  if (!series || !series.instances[index]) return;
  const instance = series.instances[index];
  const token = ++showing;
  const sameSeries = current.series === seriesIndex && mode === "image";
  let meta;
  try {
    meta = await info(instance.sop_instance_uid);
  } catch (error) {
    meta = { image: false, error: error.message };
  }
  if (token !== showing) return;
  current = { series: seriesIndex, index, uid: instance.sop_instance_uid, info: meta };
  highlightSeries();
  const stack = series.instances.length > 1;
  document.querySelector("[data-tool=slices]").hidden = !stack;
  if (!meta.image) {
    setMode("document");
    await showDocument(series, instance, meta);
    listFindings();
    return;
  }
  setMode("image");
  sliceRow.hidden = !stack;
  slider.max = series.instances.length - 1;
  slider.value = index;
  sliceInfo.textContent = stack ? `${index + 1} / ${series.instances.length}` : "";
  if (!sameSeries) {
    fillPresets(meta);
    chooseTool(stack && touch ? "slices" : tool === "slices" && !stack ? "pan" : tool);
  }
  main.selected = null;
  main.showMarks = marksToggle.checked;
  main.set({ uid: instance.sop_instance_uid, info: meta, marks: marksOf(instance.sop_instance_uid, meta),
             flip: mirrored(series, index), labels: labelsFor(series, index), keep: sameSeries && !series.instances[index].view });
  syncPreset();
  listFindings();
  if (zoom) {
    main.selected = zoom.id;
    main.zoomTo(zoom.x, zoom.y, zoom.radius);
  }
}

function step(delta) {
  const series = study.series[current.series];
  if (mode !== "image" || !series || series.instances.length < 2) return;
  const next = Math.min(series.instances.length - 1, Math.max(0, current.index + delta));
  if (next !== current.index) {
    current.index = next;                   // a burst of steps counts from the last one asked for
    show(current.series, next);
  }
}

async function showDocument(series, instance, meta) {
  main.uid = null;
  if (meta.error) {
    documentView.replaceChildren(el("h2", {}, series.label), el("p", { class: "error" }, meta.error),
      el("a", { class: "button", href: `/api/instances/${instance.sop_instance_uid}/download` }, "Download the DICOM object"));
    return;
  }
  const download = el("a", { class: "button", href: `/api/instances/${instance.sop_instance_uid}/download` }, "Download the DICOM object");
  if (meta.sop_class_uid.startsWith("1.2.840.10008.5.1.4.1.1.88.")) {
    documentView.replaceChildren(el("p", { class: "muted" }, "Reading the report…"));
    const report = await api(`/api/instances/${instance.sop_instance_uid}/sr`);
    const spacings = {};
    await Promise.all([...new Set((report.findings || []).map((r) => r.image).filter(Boolean))].map(async (uid) => {
      if (seriesOf(uid) >= 0) spacings[uid] = (await info(uid).catch(() => null))?.pixel_spacing?.[0] || null;
    }));
    renderReport(documentView, report, {
      heading: `${series.label}${series.source ? ` from ${series.source}` : ""}: ${report.title}`,
      labelOf: (uid) => (seriesOf(uid) >= 0 ? labelOfImage(uid) : ""),
      spacingOf: (uid) => spacings[uid] || null,
      onShow: (row) => selectFinding(row.image, { id: row.id, x: row.region.x, y: row.region.y,
                                                  radius: Math.max(row.region.radius, 10) }),
    });
    documentView.append(el("p", {}, download));
  } else if (meta.sop_class_uid === "1.2.840.10008.5.1.4.1.1.104.3") {
    documentView.replaceChildren(el("h2", {}, `${series.label}${series.source ? ` from ${series.source}` : ""}`),
      el("p", { class: "actions" },
        instance.job_id ? el("a", { class: "button primary", href: `/studies/${studyUid}/model/${instance.job_id}` }, "Open the 3D model") : null,
        download));
  } else {
    documentView.replaceChildren(el("h2", {}, series.label),
      el("p", {}, `This object has no image (${meta.sop_class_uid}).`), el("p", {}, download));
  }
  documentView.scrollTop = 0;
}

// -- the four views ---------------------------------------------------------------------------------

async function showHanging() {
  ++showing;
  setMode("hanging");
  current = { series: null, index: 0, uid: null, info: null };
  highlightSeries();
  hangingBox.replaceChildren();
  panels = VIEWS.map((key) => {
    const slot = hanging[key];
    const name = `${key[0]} ${key.slice(1)}`;
    if (slot === undefined) {
      return { key, element: hangingBox.appendChild(el("div", { class: "view-panel missing", "data-view": key }, el("span", {}, `no ${name}`))) };
    }
    const { series: seriesIndex, index } = slot;
    const series = study.series[seriesIndex];
    const open = () => show(seriesIndex, index);
    const box = el("div", { class: "view-box" });
    const element = el("div", { class: "view-panel", "data-view": key, "data-series": seriesIndex, tabindex: 0, role: "button",
                                "aria-label": `${series.label}: open full size`, onclick: open,
                                onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } } },
      box, el("div", { class: "view-state" }));
    hangingBox.append(element);
    return { key, element, box, series, seriesIndex, index, uid: series.instances[index].sop_instance_uid,
             view: new ImageView(box, { compact: true, align: key[0] === "R" ? "right" : "left" }) };
  });
  await new Promise((resolve) => requestAnimationFrame(resolve));
  await Promise.all(panels.filter((p) => p.view).map(async (panel) => {
    const uid = panel.uid;
    const meta = await info(uid).catch(() => null);
    if (!meta?.image || mode !== "hanging") return;
    const flip = mirrored(panel.series, panel.index);
    panel.view.showMarks = marksToggle.checked;
    panel.view.set({ uid, info: meta, marks: marksOf(uid, meta), flip,
                     labels: { [panel.key[0] === "R" ? "tl" : "tr"]: [`${panel.key[0]} ${panel.key.slice(1)}`] } });
    panel.element.dataset.flip = flip ? "yes" : "no";
  }));
  panelStates();
  listFindings();
}

function panelStates() {
  for (const panel of panels) {
    if (!panel.view) continue;
    const state = (states[panel.uid] || [])[0];
    const box = panel.element.querySelector(".view-state");
    box.className = `view-state ${state ? state.state : "none"}`;
    box.textContent = state ? shortState(state) : "";
    box.title = state ? state.text : "";
  }
}

function shortState(state) {
  return { "not-run": "CAD not run yet", queued: "CAD waiting", running: `CAD running ${Math.round(100 * (state.progress || 0))}%`,
           "nothing-found": "CAD found nothing", found: `${state.outcome}${state.clusters ? ` (${state.clusters})` : ""}`,
           done: "analysis done", failed: "CAD failed" }[state.state] || state.text;
}

// -- what the analyses say: states and findings ---------------------------------------------------------

const STATE_HEADS = { "not-run": "Not run yet", queued: "Waiting to run", running: "Running", "nothing-found": "Found nothing",
                      found: "Found", done: "Done", failed: "Failed" };

function stateItem(state, label) {
  let detail = "";
  if (state.state === "not-run") detail = "No result yet: this is not a negative reading.";
  if (state.state === "queued") detail = "No result yet.";
  if (state.state === "running") detail = state.message || "";
  if (state.state === "nothing-found") detail = `It ran and reports no finding on this image (${state.outcome}).`;
  if (state.state === "found") detail = `${state.outcome}${state.clusters ? `: ${state.clusters}` : ""}`;
  if (state.state === "failed") detail = `No result: ${state.reason}`;
  return el("li", { class: `cad ${state.state}`, "data-state": state.state, "data-plugin": state.plugin, title: state.title },
    el("span", { class: "cad-head" }, label ? `${label}: ` : "", el("strong", {}, STATE_HEADS[state.state] || state.state),
      ` · ${state.plugin}`),
    state.state === "running" ? el("progress", { value: state.progress || 0, max: 1 }) : null,
    detail ? el("span", { class: "cad-detail" }, detail) : null,
    state.state === "failed" && state.technical ? el("details", { class: "technical" }, el("summary", {}, "Technical details"),
      el("small", {}, state.technical)) : null);
}

function listFindings() {
  const stateBox = document.getElementById("cad-state");
  const list = document.getElementById("findings");
  const images = mode === "hanging" ? panels.filter((p) => p.view).map((p) => p.uid)
    : mode === "image" ? [current.uid] : [];
  const several = images.length > 1;
  const stateItems = images.flatMap((uid) => (states[uid] || []).map((s) => stateItem(s, several ? labelOfImage(uid).replace(/^MG /, "") : "")));
  stateBox.replaceChildren(stateItems.length ? el("ul", {}, stateItems) : "");
  const rows = [];
  for (const uid of images) {
    for (const mark of marksOf(uid, known.get(uid))) {
      const label = several ? labelOfImage(uid).replace(/^MG /, "") : "";
      rows.push(el("li", { class: `finding ${mark.kind}`, "data-id": mark.id, "data-image": uid },
        el("button", { type: "button", class: "finding-button", "aria-label": `Finding ${mark.id}${label ? ` on ${label}` : ""}: zoom to it`,
                       onclick: () => selectFinding(uid, mark) },
          el("strong", {}, mark.id),
          el("span", {}, mark.kind === "cluster" ? `${mark.n} calcifications` : "calcification"),
          el("span", { class: "score" }, `score ${Math.round(100 * Number(mark.score))}%`),
          label ? el("span", { class: "where" }, label) : null)));
    }
  }
  if (!rows.length && !stateItems.length) {
    list.replaceChildren(el("li", { class: "none" }, mode === "document" ? "Open an image to see what the analyses found on it."
      : "No analysis that marks findings takes this image."));
  } else list.replaceChildren(...rows);
}

// Open the image at a finding; on a phone, bring the image back on screen
async function selectFinding(uid, mark) {
  const seriesIndex = seriesOf(uid);
  if (seriesIndex < 0) return;
  const series = study.series[seriesIndex];
  const index = series.instances.findIndex((i) => i.sop_instance_uid === uid);
  const zoom = { id: mark.id, x: mark.x, y: mark.y, radius: mark.radius || 10 };
  if (mode === "image" && current.uid === uid) {
    main.selected = mark.id;
    main.zoomTo(zoom.x, zoom.y, zoom.radius);
  } else {
    await show(seriesIndex, index, { zoom });
  }
  document.querySelectorAll("#findings li.finding").forEach((li) => li.classList.toggle("selected", li.dataset.id === mark.id && li.dataset.image === uid));
  const box = viewerSection.getBoundingClientRect();
  if (box.top < 0 || box.bottom > window.innerHeight) viewerSection.scrollIntoView({ block: "start" });
}

async function refreshAnalysis() {
  states = (await api(`/api/studies/${studyUid}/analysis`)).images;
  if (mode === "hanging") panelStates();
  listFindings();
}

// -- the tools ---------------------------------------------------------------------------------------

function fillPresets(meta) {
  const presets = PRESETS[meta.modality] || [];
  presetSelect.replaceChildren(el("option", { value: "" }, "Default window"),
    ...presets.map(([name, c, w]) => el("option", { value: `${c ?? ""},${w}` }, name)),
    el("option", { value: "custom", hidden: true }, "Custom"));
}

function syncPreset() {
  const custom = presetSelect.querySelector("option[value=custom]");
  if (main.presetName === "custom") {
    custom.hidden = false;
    presetSelect.value = "custom";
  } else {
    custom.hidden = true;
    if (presetSelect.value === "custom") presetSelect.value = "";
  }
}

function chooseTool(name) {
  tool = name;
  document.querySelectorAll("[data-tool]").forEach((b) => {
    b.classList.toggle("active", b.dataset.tool === name);
    b.setAttribute("aria-pressed", String(b.dataset.tool === name));
  });
}

function resetWindow() {
  const meta = current.info;
  if (!meta?.image) return;
  presetSelect.value = "";
  main.setWindow(meta.window_center, meta.window_width);
  syncPreset();
}

function zoomCentre(factor) {
  const box = main.size();
  main.zoomAt(factor, box.width / 2, box.height / 2);
}

presetSelect.addEventListener("change", () => {
  const meta = current.info;
  if (!meta?.image || presetSelect.value === "custom") return;
  if (!presetSelect.value) return resetWindow();
  const [c, w] = presetSelect.value.split(",").map(Number);
  const name = presetSelect.selectedOptions[0].textContent;
  if (presetSelect.value.startsWith(",")) main.setWindow(main.windowing.c, meta.window_width * w, name);
  else main.setWindow(c, w, name);
  syncPreset();
});
document.querySelectorAll("[data-tool]").forEach((button) => button.addEventListener("click", () => chooseTool(button.dataset.tool)));
document.getElementById("zoom-in").addEventListener("click", () => zoomCentre(1.5));
document.getElementById("zoom-out").addEventListener("click", () => zoomCentre(1 / 1.5));
document.getElementById("fit").addEventListener("click", () => { main.fit(); main.draw(); });
toHanging.addEventListener("click", () => showHanging());
slider.addEventListener("input", () => show(current.series, Number(slider.value)));
marksToggle.addEventListener("change", () => {
  main.showMarks = marksToggle.checked;
  main.drawMarks();
  panels.forEach((p) => { if (p.view) { p.view.showMarks = marksToggle.checked; p.view.drawMarks(); } });
});

// -- mouse, touch and keys ----------------------------------------------------------------------------

const pointers = new Map();
let pinch = null;
let dragSlices = 0;
let wheelSteps = 0;

function local(e) {
  const box = viewportBox.getBoundingClientRect();
  return [e.clientX - box.left, e.clientY - box.top];
}

viewportBox.addEventListener("pointerdown", (e) => {
  if (!current.info?.image) return;
  viewportBox.setPointerCapture(e.pointerId);
  viewportBox.focus({ preventScroll: true });
  pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
  dragSlices = 0;
  if (pointers.size === 2) {
    const [a, b] = [...pointers.values()];
    pinch = { distance: Math.hypot(a.x - b.x, a.y - b.y), x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
  }
});
viewportBox.addEventListener("pointermove", (e) => {
  const last = pointers.get(e.pointerId);
  if (!last || !current.info?.image) return;
  const dx = e.clientX - last.x, dy = e.clientY - last.y;
  pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
  if (pointers.size === 2 && pinch) {                 // two fingers: zoom where they are, and move with them
    const [a, b] = [...pointers.values()];
    const distance = Math.hypot(a.x - b.x, a.y - b.y);
    const centre = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
    const box = viewportBox.getBoundingClientRect();
    main.panBy(centre.x - pinch.x, centre.y - pinch.y);
    main.zoomAt(distance / Math.max(1, pinch.distance), centre.x - box.left, centre.y - box.top);
    pinch = { distance, ...centre };
    return;
  }
  const using = e.buttons === 2 ? "window" : tool;
  if (using === "window") {
    main.windowBy(dx, dy);
    syncPreset();
  } else if (using === "slices") {
    dragSlices += e.pointerType === "touch" ? -dy : dy;       // a swipe up goes on, as the wheel turned down does
    while (Math.abs(dragSlices) >= 12) {
      step(dragSlices > 0 ? 1 : -1);
      dragSlices -= Math.sign(dragSlices) * 12;
    }
  } else {
    main.panBy(dx, dy);
  }
});
const release = (e) => { pointers.delete(e.pointerId); if (pointers.size < 2) pinch = null; };
viewportBox.addEventListener("pointerup", release);
viewportBox.addEventListener("pointercancel", release);
viewportBox.addEventListener("contextmenu", (e) => e.preventDefault());
viewportBox.addEventListener("dblclick", () => { main.fit(); main.draw(); });
// the wheel steps through a stack's slices; Ctrl+wheel (a trackpad's pinch too) zooms, as the wheel
// does on an image without slices
viewportBox.addEventListener("wheel", (e) => {
  if (!current.info?.image) return;
  e.preventDefault();
  const delta = e.deltaMode === 1 ? e.deltaY * 40 : e.deltaMode === 2 ? e.deltaY * 800 : e.deltaY;
  const series = study.series[current.series];
  if (!e.ctrlKey && series?.instances.length > 1) {
    wheelSteps += delta;
    if (Math.abs(wheelSteps) < 50) return;
    step(Math.sign(wheelSteps) * Math.max(1, Math.floor(Math.abs(wheelSteps) / 100)));
    wheelSteps = 0;
    return;
  }
  const [x, y] = local(e);
  main.zoomAt(Math.pow(1.2, -delta / 100), x, y);
}, { passive: false });

function typing(target) {
  return target.closest?.("input, select, textarea, [contenteditable]") && !target.matches?.("input[type=range], input[type=checkbox]");
}

document.addEventListener("keydown", (e) => {
  if (e.defaultPrevented || e.altKey || e.metaKey || typing(e.target) || document.getElementById("shortcuts").open) return;
  const key = e.key;
  if (key === "?") { openShortcuts(); e.preventDefault(); return; }
  if (e.ctrlKey) return;
  if (key === "Escape" && hanging && mode !== "hanging") { showHanging(); e.preventDefault(); return; }
  if (key === "n" || key === "N") { nextSeries(key === "N" ? -1 : 1); e.preventDefault(); return; }
  if (mode !== "image") return;
  const inViewport = e.target === viewportBox || e.target === document.body || e.target === slider;
  const actions = {
    "+": () => zoomCentre(1.25), "=": () => zoomCentre(1.25), "-": () => zoomCentre(0.8),
    f: () => { main.fit(); main.draw(); }, p: () => chooseTool("pan"), w: () => chooseTool("window"),
    s: () => { if (!document.querySelector("[data-tool=slices]").hidden) chooseTool("slices"); },
    r: () => resetWindow(), m: () => { marksToggle.checked = !marksToggle.checked; marksToggle.dispatchEvent(new Event("change")); },
  };
  const stepping = { ArrowDown: 1, PageDown: 1, ArrowUp: -1, PageUp: -1, Home: -1e6, End: 1e6 };
  if (inViewport && key in stepping && e.target !== slider) { step(stepping[key]); e.preventDefault(); return; }
  const action = actions[key.length === 1 ? key.toLowerCase() : key] || actions[key];
  if (action) { action(); e.preventDefault(); }
});

function nextSeries(direction) {
  const order = study.series.map((_, i) => i);
  const at = mode === "image" || mode === "document" ? order.indexOf(current.series) : -1;
  const next = order[(at + direction + order.length) % order.length];
  show(next, 0);
}

function openShortcuts() {
  const dialog = document.getElementById("shortcuts");
  if (!dialog.open) dialog.showModal();
}
document.getElementById("help").addEventListener("click", openShortcuts);
document.getElementById("shortcuts-close").addEventListener("click", () => document.getElementById("shortcuts").close());

let resizing = null;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => {
    if (mode === "image" && current.info?.image) { main.fit(); main.draw(); }
    panels.forEach((p) => { if (p.view?.info) { p.view.fit(); p.view.draw(); } });
  }, 100);
});

// -- analyses: plug-ins, jobs, notifications ----------------------------------------------------------

const jobsList = document.getElementById("jobs");
const reloadJobs = () => loadJobs(studyUid, jobsList, { shared: !mayAnalyse, labelOfSeries }).catch((e) => toast(e.message, "error"));

function listen() {
  const events = new EventSource("/api/events");
  events.addEventListener("change", async (e) => {
    const event = JSON.parse(e.data);
    if (event.study_uid !== studyUid) return;
    if (event.kind === "study_stored") { await loadStudy(true); return; }
    if (event.kind === "job_progress") {
      const row = document.querySelector(`[data-job="${event.job_id}"]`);
      if (row?.querySelector("progress")) row.querySelector("progress").value = event.progress || 0;
      if (row?.querySelector(".progress-message")) row.querySelector(".progress-message").textContent = event.progress_message || "";
      let changed = false;
      for (const list of Object.values(states)) {
        for (const state of list) {
          if (state.job_id === event.job_id && state.state === "running") {
            Object.assign(state, { progress: event.progress || 0, message: event.progress_message || "" });
            changed = true;
          }
        }
      }
      if (changed) { listFindings(); if (mode === "hanging") panelStates(); }
      return;
    }
    if (event.kind === "job_succeeded") finished.succeeded.push(event.plugin);
    if (event.kind === "job_failed") finished.failed.push(event.plugin);
    clearTimeout(finished.timer);                    // the four jobs of a screening finish together: one update
    finished.timer = setTimeout(settle, 400);
  });
}

const finished = { succeeded: [], failed: [], timer: null };

async function settle() {
  const counted = (names) => [...new Set(names)].map((name) => {
    const n = names.filter((x) => x === name).length;
    return n > 1 ? `${name} (${n} jobs)` : name;
  }).join(", ");
  const { succeeded, failed } = finished;
  finished.succeeded = [];
  finished.failed = [];
  if (succeeded.length) toast(`${counted(succeeded)}: the results are ready`, "success");
  if (failed.length) toast(`${counted(failed)} failed: see Findings and Analysis`, "error");
  try {
    if (succeeded.length) await loadStudy(true);
    else await refreshAnalysis();
  } catch (error) { toast(error.message, "error"); }
  reloadJobs();
}

setUpSharing(studyUid);
loadStudy()
  .then(() => Promise.all([loadPlugins(studyUid, document.getElementById("plugins"), () => { reloadJobs(); refreshAnalysis(); }),
                           reloadJobs(), mayShare ? loadShares(studyUid) : null, loadExports(studyUid)]))
  .catch((error) => toast(error.message, "error"));
listen();
