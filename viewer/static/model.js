// The 3D page: the model's X3D scene in X3DOM (rotate, zoom, reset); phones get the light level.
//
// The scene is fetched here (with a progress bar) rather than by an X3DOM <inline>, which waits
// a fixed second before drawing what it loaded; only the geometry nodes a model needs are copied
// into the page, without any attribute that could run code.
import { toast } from "./common.js";

const NODES = new Map(["NavigationInfo", "Background", "Viewpoint", "LOD", "Group", "Transform", "Shape", "Appearance",
  "Material", "IndexedTriangleSet", "IndexedFaceSet", "TriangleSet", "Coordinate", "Normal", "Color"]
  .map((name) => [name.toLowerCase(), name]));
const holder = document.getElementById("scene");
const small = Math.min(window.innerWidth, window.innerHeight) < 700;
const file = small && holder.dataset.phone === "yes" ? "model-phone.x3d" : "model.x3d";
const progress = document.getElementById("model-progress");
holder.dataset.level = file;
const triangles = document.getElementById("triangles");
if (triangles && file === "model-phone.x3d") triangles.textContent = `${triangles.dataset.phone} triangles (phone level)`;

async function download(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`the model could not be read (${response.status})`);
  const total = Number(response.headers.get("X-Content-Size")) || 0;
  const reader = response.body.getReader();
  const parts = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    received += value.length;
    if (total) progress.value = Math.min(received / total, 1);
  }
  return new TextDecoder().decode(await new Blob(parts).arrayBuffer());
}

// A copy of an X3D element made of allowed nodes and plain attributes only
function copy(node) {
  const name = NODES.get(node.localName.toLowerCase());
  if (!name) return null;
  const out = document.createElement(name);
  for (const attribute of node.attributes) {
    if (!attribute.name.toLowerCase().startsWith("on") && !/url/i.test(attribute.name)) out.setAttribute(attribute.name, attribute.value);
  }
  for (const child of node.children) {
    const kept = copy(child);
    if (kept) out.append(kept);
  }
  return out;
}

async function load() {
  const text = await download(`/api/jobs/${holder.dataset.job}/files/${file}`);
  const parsed = new DOMParser().parseFromString(text, "application/xml");
  const source = parsed.getElementsByTagName("Scene")[0];
  if (!source || parsed.getElementsByTagName("parsererror").length) throw new Error("the model is not a readable X3D scene");
  const nodes = [...source.children].map(copy).filter(Boolean);
  document.querySelector("#x3d scene").append(...nodes);
  const viewpoint = document.querySelector("#x3d scene viewpoint");
  if (viewpoint) viewpoint.setAttribute("set_bind", "true");
  progress.hidden = true;
  holder.dataset.loaded = "yes";
}

load().catch((error) => {
  progress.hidden = true;
  holder.dataset.loaded = "failed";
  toast(error.message, "error");
});

// The wheel zooms: up brings the model closer, about a tenth of the way per notch, and the page does
// not scroll meanwhile. X3DOM's own wheel handling (a small step, the other way round) gets nothing.
const x3d = document.getElementById("x3d");
x3d.addEventListener("wheel", (e) => {
  e.preventDefault();
  e.stopPropagation();
  const doc = x3d.runtime?.canvas?.doc;
  const area = doc?._viewarea;
  if (!area) return;
  const notches = (e.deltaMode === 1 ? e.deltaY / 3 : e.deltaMode === 2 ? e.deltaY * 10 : e.deltaY / 100);
  area.zoom(-Math.max(-5, Math.min(5, notches)) * 0.12 * (area._height || 600));
  doc.needRender = true;
  holder.dataset.zoomed = String(Number(holder.dataset.zoomed || 0) + 1);
}, { capture: true, passive: false });
for (const legacy of ["mousewheel", "DOMMouseScroll"]) {
  x3d.addEventListener(legacy, (e) => { e.stopPropagation(); e.preventDefault(); }, { capture: true, passive: false });
}

document.getElementById("reset").addEventListener("click", () => {
  const runtime = document.getElementById("x3d").runtime;
  if (runtime) runtime.resetView();
});
