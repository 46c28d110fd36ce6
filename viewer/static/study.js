// The study page: series, a 2D viewer rendered on the server (zoom, pan, window/level, slices,
// mouse and touch), analysis marks over it, structured reports as text, jobs with progress and
// notifications, sharing.
import { api, el, post, toast } from "./common.js";

const root = document.getElementById("study");
const studyUid = root.dataset.study;
const shared = root.dataset.share === "yes";
const viewport = document.getElementById("viewport");
const image = document.getElementById("image");
const overlay = document.getElementById("overlay");
const documentView = document.getElementById("document");
const slider = document.getElementById("slice");
const marksToggle = document.getElementById("marks");
const presetSelect = document.getElementById("preset");

let study = null;
let findings = {};
let current = { series: null, index: 0, uid: null, info: null };
let view = { x: 0, y: 0, scale: 1 };          // source pixel at the viewport's top left; screen px per source px
let windowing = null;                          // { c, w }
let tool = "pan";
let pending = null;

const PRESETS = {
  CT: [["Soft tissue", 40, 400], ["Bone", 400, 2000], ["Lung", -600, 1500], ["Brain", 40, 80]],
  MG: [["High contrast", null, 0.5]],
};

// -- the study and its series -------------------------------------------------------------

async function loadStudy(keep = false) {
  study = await api(`/api/studies/${studyUid}`);
  findings = await api(`/api/studies/${studyUid}/findings`);
  const list = document.getElementById("series-list");
  list.replaceChildren(...study.series.map((s, i) => {
    const first = s.instances[0];
    return el("button", { class: `series-item${s.result ? " result" : ""}`, "data-series": i, onclick: () => show(i, 0) },
      el("img", { src: `/api/instances/${first.sop_instance_uid}/render?width=96&format=jpeg`, alt: "",
                  loading: "lazy", onerror: (e) => e.target.remove() }),
      el("span", {}, `${s.modality || "?"} ${s.number ?? ""}`),
      el("small", {}, `${s.description || ""} (${s.instances.length})`));
  }));
  if (!keep || current.series === null) {
    const firstImage = study.series.findIndex((s) => !s.result);
    await show(firstImage >= 0 ? firstImage : 0, 0);
  } else {
    drawMarks();
    listFindings();
  }
}

async function show(seriesIndex, index) {
  const series = study.series[seriesIndex];
  if (!series) return;
  const uid = series.instances[index].sop_instance_uid;
  document.querySelectorAll(".series-item").forEach((b) => b.classList.toggle("active", Number(b.dataset.series) === seriesIndex));
  const sameSeries = current.series === seriesIndex;
  current = { series: seriesIndex, index, uid, info: await api(`/api/instances/${uid}/info`) };
  slider.hidden = series.instances.length < 2;
  slider.max = series.instances.length - 1;
  slider.value = index;
  document.getElementById("slice-info").textContent = series.instances.length > 1 ? `${index + 1} / ${series.instances.length}` : "";
  if (!current.info.image) { showDocument(series.instances[index]); return; }
  documentView.hidden = true;
  image.hidden = false;
  if (!sameSeries || !windowing) {
    windowing = { c: current.info.window_center, w: current.info.window_width };
    fillPresets(current.info);
    fit();
  }
  draw();
  listFindings();
}

function fillPresets(info) {
  const presets = PRESETS[info.modality] || [];
  presetSelect.replaceChildren(el("option", { value: "" }, "Default window"),
    ...presets.map(([name, c, w]) => el("option", { value: `${c ?? ""},${w}` }, name)));
}

async function showDocument(instance) {
  image.hidden = true;
  overlay.replaceChildren();
  documentView.hidden = false;
  if (current.info.sop_class_uid.startsWith("1.2.840.10008.5.1.4.1.1.88.")) {
    const report = await api(`/api/instances/${instance.sop_instance_uid}/sr`);
    const tree = (items) => el("ul", {}, items.map((i) => el("li", {},
      el("span", { class: "concept" }, i.name), i.value ? el("span", { class: "value" }, ` ${i.value}`) : null,
      i.children.length ? tree(i.children) : null)));
    documentView.replaceChildren(el("h2", {}, `Structured report: ${report.title}`), tree(report.items));
  } else if (current.info.sop_class_uid === "1.2.840.10008.5.1.4.1.1.104.3") {
    documentView.replaceChildren(el("h2", {}, "3D model (Encapsulated STL)"),
      instance.job_id ? el("a", { class: "button", href: `/studies/${studyUid}/model/${instance.job_id}` }, "Open the 3D model") : null,
      el("a", { href: `/api/instances/${instance.sop_instance_uid}/download` }, "Download the DICOM object"));
  } else {
    documentView.replaceChildren(el("p", {}, `This object has no image (${current.info.sop_class_uid}).`),
      el("a", { href: `/api/instances/${instance.sop_instance_uid}/download` }, "Download it"));
  }
}

// -- the 2D view ------------------------------------------------------------------------------

function fit() {
  const { rows, columns } = current.info;
  const box = viewport.getBoundingClientRect();
  view.scale = Math.min(box.width / columns, box.height / rows);
  view.x = (columns - box.width / view.scale) / 2;
  view.y = (rows - box.height / view.scale) / 2;
}

function draw() {
  if (!current.info?.image) return;
  const { rows, columns } = current.info;
  const box = viewport.getBoundingClientRect();
  const x0 = Math.max(0, Math.floor(view.x)), y0 = Math.max(0, Math.floor(view.y));
  const x1 = Math.min(columns, Math.ceil(view.x + box.width / view.scale));
  const y1 = Math.min(rows, Math.ceil(view.y + box.height / view.scale));
  if (x1 <= x0 || y1 <= y0) return;
  const left = (x0 - view.x) * view.scale, top = (y0 - view.y) * view.scale;
  const width = (x1 - x0) * view.scale, height = (y1 - y0) * view.scale;
  const ratio = Math.min(window.devicePixelRatio || 1, 2);
  const outWidth = Math.max(1, Math.min(4096, Math.round(width * ratio)));
  const outHeight = Math.max(1, Math.min(4096, Math.round(height * ratio)));
  const params = new URLSearchParams({ frame: 0, x: x0, y: y0, w: x1 - x0, h: y1 - y0, width: outWidth, height: outHeight,
                                       wc: windowing.c.toFixed(2), ww: Math.max(1, windowing.w).toFixed(2) });
  const url = `/api/instances/${current.uid}/render?${params}`;
  const place = () => Object.assign(image.style, { left: `${left}px`, top: `${top}px`, width: `${width}px`,
                                                   height: `${height}px`, transform: "" });
  const next = new Image();
  next.onload = () => { image.src = url; place(); image.dataset.window = `${windowing.c},${windowing.w}`; };
  next.src = url;
  drawMarks();
}

function redraw() {                         // at most every 80 ms while dragging
  if (pending) return;
  pending = setTimeout(() => { pending = null; draw(); }, 80);
}

function zoomAt(factor, sx, sy) {
  const x = view.x + sx / view.scale, y = view.y + sy / view.scale;
  view.scale = Math.min(32, Math.max(0.01, view.scale * factor));
  view.x = x - sx / view.scale;
  view.y = y - sy / view.scale;
  redraw();
}

function zoomTo(x, y, radiusPx) {
  const box = viewport.getBoundingClientRect();
  view.scale = Math.min(8, Math.min(box.width, box.height) / Math.max(8, radiusPx * 4));
  view.x = x - box.width / 2 / view.scale;
  view.y = y - box.height / 2 / view.scale;
  draw();
}

// -- analysis marks -------------------------------------------------------------------------------

function marksOf(uid) {
  const found = findings[uid];
  if (!found) return [];
  const isolated = found.calcifications.filter((c) => !c.cluster_id);
  return [...found.clusters.map((c) => ({ ...c, kind: "cluster" })), ...isolated.map((c) => ({ ...c, kind: "calcification" }))];
}

function drawMarks() {
  const box = viewport.getBoundingClientRect();
  overlay.setAttribute("viewBox", `0 0 ${box.width} ${box.height}`);
  const svg = "http://www.w3.org/2000/svg";
  const spacing = current.info?.pixel_spacing?.[0] || 0.1;
  overlay.replaceChildren();
  overlay.style.display = marksToggle.checked ? "" : "none";
  for (const mark of marksOf(current.uid)) {
    const cx = (mark.x - view.x) * view.scale, cy = (mark.y - view.y) * view.scale;
    const r = Math.max(8, (mark.kind === "cluster" ? mark.radius_mm / spacing : 6) * view.scale);
    const group = document.createElementNS(svg, "g");
    group.setAttribute("class", `mark ${mark.kind}`);
    group.setAttribute("data-id", mark.id);
    const circle = document.createElementNS(svg, "circle");
    Object.entries({ cx, cy, r }).forEach(([k, v]) => circle.setAttribute(k, v));
    const label = document.createElementNS(svg, "text");
    label.setAttribute("x", cx + r * 0.75 + 4);
    label.setAttribute("y", cy - r * 0.75 - 4);
    label.textContent = mark.id;
    group.append(circle, label);
    overlay.append(group);
  }
}

function listFindings() {
  const list = document.getElementById("findings");
  const marks = marksOf(current.uid);
  const spacing = current.info?.pixel_spacing?.[0] || 0.1;
  list.replaceChildren(...marks.map((m) => el("li", { class: `finding ${m.kind}`, tabindex: 0, "data-id": m.id,
      onclick: () => zoomTo(m.x, m.y, m.kind === "cluster" ? m.radius_mm / spacing : 10) },
    el("strong", {}, m.id), " ", m.kind === "cluster" ? `${m.n} calcifications` : "calcification",
    el("span", { class: "score" }, ` score ${Number(m.score).toFixed(2)}`))));
  if (!marks.length) list.append(el("li", { class: "none" }, "No findings on this image."));
}

marksToggle.addEventListener("change", drawMarks);

// -- mouse, touch and keys -------------------------------------------------------------------------

const pointers = new Map();
let pinch = null;

viewport.addEventListener("pointerdown", (e) => {
  viewport.setPointerCapture(e.pointerId);
  pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
  if (pointers.size === 2) {
    const [a, b] = [...pointers.values()];
    pinch = { distance: Math.hypot(a.x - b.x, a.y - b.y) };
  }
});
viewport.addEventListener("pointermove", (e) => {
  const last = pointers.get(e.pointerId);
  if (!last || !current.info?.image) return;
  const dx = e.clientX - last.x, dy = e.clientY - last.y;
  pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
  if (pointers.size === 2 && pinch) {
    const [a, b] = [...pointers.values()];
    const distance = Math.hypot(a.x - b.x, a.y - b.y);
    const box = viewport.getBoundingClientRect();
    zoomAt(distance / pinch.distance, (a.x + b.x) / 2 - box.left, (a.y + b.y) / 2 - box.top);
    pinch.distance = distance;
    return;
  }
  if (tool === "window" || e.buttons === 2) {
    const range = Math.max(1, current.info.window_width);
    windowing.w = Math.max(1, windowing.w + dx * range / 400);
    windowing.c = windowing.c + dy * range / 400;
  } else {
    view.x -= dx / view.scale;
    view.y -= dy / view.scale;
    image.style.transform = `translate(${dx}px, ${dy}px)`;
  }
  redraw();
});
const release = (e) => { pointers.delete(e.pointerId); if (pointers.size < 2) pinch = null; };
viewport.addEventListener("pointerup", release);
viewport.addEventListener("pointercancel", release);
viewport.addEventListener("contextmenu", (e) => e.preventDefault());
viewport.addEventListener("wheel", (e) => {
  e.preventDefault();
  const box = viewport.getBoundingClientRect();
  zoomAt(Math.pow(1.2, -e.deltaY / 100), e.clientX - box.left, e.clientY - box.top);
}, { passive: false });
viewport.addEventListener("keydown", (e) => {
  const series = study.series[current.series];
  if (["ArrowDown", "PageDown", "ArrowUp", "PageUp"].includes(e.key) && series.instances.length > 1) {
    const step = e.key.endsWith("Down") ? 1 : -1;
    show(current.series, Math.min(series.instances.length - 1, Math.max(0, current.index + step)));
    e.preventDefault();
  }
});
slider.addEventListener("input", () => show(current.series, Number(slider.value)));
document.querySelectorAll("[data-tool]").forEach((button) => button.addEventListener("click", () => {
  tool = button.dataset.tool;
  document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b === button));
}));
document.getElementById("zoom-in").addEventListener("click", () => { const b = viewport.getBoundingClientRect(); zoomAt(1.5, b.width / 2, b.height / 2); });
document.getElementById("zoom-out").addEventListener("click", () => { const b = viewport.getBoundingClientRect(); zoomAt(1 / 1.5, b.width / 2, b.height / 2); });
document.getElementById("fit").addEventListener("click", () => { fit(); draw(); });
presetSelect.addEventListener("change", () => {
  const info = current.info;
  if (!presetSelect.value) windowing = { c: info.window_center, w: info.window_width };
  else {
    const [c, w] = presetSelect.value.split(",").map(Number);
    windowing = presetSelect.value.startsWith(",") ? { c: windowing.c, w: info.window_width * w } : { c, w };
  }
  draw();
});
window.addEventListener("resize", () => { if (current.info?.image) { fit(); draw(); } });

// -- analysis: plug-ins, jobs, notifications ----------------------------------------------------------

function field(param) {
  const common = { name: param.name, title: param.help };
  let input;
  if (param.type === "bool") input = el("input", { ...common, type: "checkbox", checked: param.default });
  else if (param.type === "choice") input = el("select", common, param.choices.map((c) => el("option", { value: c, selected: c === param.default }, c)));
  else input = el("input", { ...common, type: param.type === "str" ? "text" : "number", value: param.default,
                             min: param.min, max: param.max, step: param.type === "int" ? 1 : "any" });
  return el("label", { class: "param" }, `${param.name}${param.unit ? ` (${param.unit})` : ""}`, input);
}

async function loadPlugins() {
  const answer = await api(`/api/studies/${studyUid}/plugins`);
  const box = document.getElementById("plugins");
  box.replaceChildren(...answer.plugins.map((plugin) => {
    const form = el("form", { class: "plugin", "data-plugin": plugin.name },
      el("h3", {}, plugin.title), ...plugin.params.map(field),
      answer.can_start ? el("button", { type: "submit" }, `Run ${plugin.name}`) : null);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const params = {};
      for (const p of plugin.params) {
        const input = form.elements[p.name];
        params[p.name] = p.type === "bool" ? input.checked : (p.type === "int" || p.type === "float") ? Number(input.value) : input.value;
      }
      try {
        await post(`/api/studies/${studyUid}/jobs`, { plugin: plugin.name, params });
        toast(`${plugin.name} started`);
        loadJobs();
      } catch (error) { toast(error.message, "error"); }
    });
    return form;
  }));
  if (!answer.plugins.length) box.append(el("p", {}, "No analysis takes this study."));
}

async function loadJobs() {
  const { jobs } = await api(`/api/studies/${studyUid}/jobs`);
  document.getElementById("jobs").replaceChildren(...jobs.map((job) => el("li", { class: `job ${job.state}`, "data-job": job.id },
    el("strong", {}, job.plugin), ` ${job.state}`,
    el("progress", { value: job.state === "succeeded" ? 1 : job.progress || 0, max: 1 }),
    job.progress_message && job.state === "running" ? el("small", {}, job.progress_message) : null,
    job.errors.length ? el("small", { class: "error" }, job.errors[job.errors.length - 1]) : null,
    job.files.includes("model.x3d") ? el("a", { href: `/studies/${studyUid}/model/${job.id}`, class: "button" }, "Open the 3D model") : null,
    !shared && ["queued", "running"].includes(job.state)
      ? el("button", { onclick: async () => { try { await post(`/api/jobs/${job.id}/cancel`); loadJobs(); } catch (e) { toast(e.message, "error"); } } }, "Cancel")
      : null)));
}

function listen() {
  const events = new EventSource("/api/events");
  events.addEventListener("change", async (e) => {
    const event = JSON.parse(e.data);
    if (event.study_uid !== studyUid) return;
    if (event.kind === "job_progress") {
      const row = document.querySelector(`[data-job="${event.job_id}"] progress`);
      if (row) row.value = event.progress || 0;
      return;
    }
    if (event.kind === "job_succeeded") {
      toast(`${event.plugin}: the results are ready`, "success");
      await loadStudy(true);
    } else if (event.kind === "job_failed") {
      toast(`${event.plugin} failed`, "error");
    }
    loadJobs();
  });
}

// -- sharing -------------------------------------------------------------------------------------------

document.getElementById("share")?.addEventListener("click", async () => {
  try {
    const answer = await post(`/api/studies/${studyUid}/share`, { days: Number(document.getElementById("share-days").value) });
    const output = document.getElementById("share-url");
    output.value = answer.url;
    output.hidden = false;
    output.select();
    toast("Share link made: it opens this study only, read-only");
    loadShares();
  } catch (error) { toast(error.message, "error"); }
});

// The study's links: who made each, until when, and a button to revoke the open ones this user may
// revoke (their own; an admin's: all)
async function loadShares() {
  const list = document.getElementById("shares");
  if (!list) return;
  const { shares } = await api(`/api/studies/${studyUid}/shares`);
  const now = Date.now() / 1000;
  const day = (t) => new Date(t * 1000).toLocaleString();
  list.replaceChildren(...shares.map((link) => {
    const open = !link.revoked_at && link.expires_at > now;
    const state = link.revoked_at ? `revoked ${day(link.revoked_at)}` : open ? `until ${day(link.expires_at)}` : "expired";
    return el("li", { class: open ? "share open" : "share closed", "data-share": link.id },
      el("span", {}, `${link.created_by || "?"}, ${state}`),
      open && link.can_revoke ? el("button", { onclick: async () => {
        try { await post(`/api/shares/${link.id}/revoke`); toast("The link no longer opens anything"); loadShares(); }
        catch (error) { toast(error.message, "error"); }
      } }, "Revoke") : null);
  }));
}

loadStudy().then(() => Promise.all([loadPlugins(), loadJobs(), shared ? null : loadShares()]))
  .catch((error) => toast(error.message, "error"));
listen();
