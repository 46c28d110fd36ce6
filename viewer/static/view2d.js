// One image in a box: rendered on the server at the size and region the box shows (zoom, pan,
// window/level), mirrored when the hanging asks for it, with the analysis marks over it and the
// four corner annotations (patient, date; series, view, slice; window; zoom). The study page
// owns the events; this only draws.
import { el } from "./common.js";

const SVG = "http://www.w3.org/2000/svg";
const CORNERS = ["tl", "tr", "bl", "br"];

function rounded(value, width) {
  return Math.abs(width) >= 20 ? Math.round(value).toString() : Number(value).toFixed(2);
}

export class ImageView {
  // box: the element (position: relative) the image fills; compact: a small view (the hanging)
  // align: where an image narrower than the box sits ("left", "right": the hanging puts the chest
  // walls together in the middle)
  constructor(box, { compact = false, align = "center" } = {}) {
    this.box = box;
    this.compact = compact;
    this.align = align;
    this.image = box.querySelector("img") || box.appendChild(el("img", { alt: "", draggable: "false" }));
    this.overlay = box.querySelector("svg") || box.appendChild(document.createElementNS(SVG, "svg"));
    this.corners = Object.fromEntries(CORNERS.map((c) => [c, box.querySelector(`.corner.${c}`) ||
      box.appendChild(el("div", { class: `corner ${c}`, "aria-hidden": "true" }))]));
    this.uid = null;
    this.info = null;
    this.marks = [];
    this.flip = false;
    this.showMarks = true;
    this.labels = { tl: [], tr: [] };
    this.view = { x: 0, y: 0, scale: 1 };   // source pixel at the box's top left (unmirrored); screen px per source px
    this.windowing = null;                 // { c, w }
    this.placed = null;                    // the view the shown picture was rendered for
    this.pending = null;
    this.presetName = "";
    this.selected = null;                  // the id of the mark a reader chose
  }

  // Show an image. keep: the same series (a slice of a stack): zoom, pan and window stay.
  set({ uid, info, marks = [], flip = false, labels, keep = false }) {
    const fresh = !keep || !this.windowing || !this.info || info.rows !== this.info.rows || info.columns !== this.info.columns;
    this.uid = uid;
    this.info = info;
    this.marks = marks;
    this.flip = flip;
    this.labels = labels || { tl: [], tr: [] };
    this.box.dataset.flip = flip ? "yes" : "no";
    if (fresh) {
      this.windowing = { c: info.window_center, w: info.window_width };
      this.presetName = "";
      this.fit();
    }
    this.draw();
  }

  size() {
    const box = this.box.getBoundingClientRect();
    return { width: box.width, height: box.height, left: box.left, top: box.top };
  }

  fit() {
    if (!this.info) return;
    const { rows, columns } = this.info;
    const { width, height } = this.size();
    if (!width || !height) return;
    this.view.scale = Math.min(width / columns, height / rows);
    this.view.x = (columns - width / this.view.scale) / 2;
    if (this.align !== "center" && this.view.x < 0) {
      const right = (this.align === "right") !== this.flip;           // in the image's own columns
      this.view.x = right ? columns - width / this.view.scale : 0;
    }
    this.view.y = (rows - height / this.view.scale) / 2;
  }

  // box coordinates of a source pixel (x column, y row), and back
  toScreen(x, y) {
    const sx = (x - this.view.x) * this.view.scale;
    return [this.flip ? this.size().width - sx : sx, (y - this.view.y) * this.view.scale];
  }

  toSource(sx, sy) {
    const vx = this.flip ? this.size().width - sx : sx;
    return [this.view.x + vx / this.view.scale, this.view.y + sy / this.view.scale];
  }

  draw() {
    if (!this.info?.image) return;
    const { rows, columns } = this.info;
    const { width: boxWidth, height: boxHeight } = this.size();
    if (!boxWidth || !boxHeight) return;
    const { x: vx, y: vy, scale } = this.view;
    const x0 = Math.max(0, Math.floor(vx)), y0 = Math.max(0, Math.floor(vy));
    const x1 = Math.min(columns, Math.ceil(vx + boxWidth / scale));
    const y1 = Math.min(rows, Math.ceil(vy + boxHeight / scale));
    this.drawMarks();
    this.annotate();
    if (x1 <= x0 || y1 <= y0) { this.image.hidden = true; return; }
    const left = (x0 - vx) * scale, top = (y0 - vy) * scale;
    const width = (x1 - x0) * scale, height = (y1 - y0) * scale;
    const ratio = Math.min(window.devicePixelRatio || 1, 2);
    const outWidth = Math.max(1, Math.min(4096, Math.round(width * ratio)));
    const outHeight = Math.max(1, Math.min(4096, Math.round(height * ratio)));
    const { c, w } = this.windowing;
    const params = new URLSearchParams({ frame: 0, x: x0, y: y0, w: x1 - x0, h: y1 - y0, width: outWidth,
                                         height: outHeight, wc: c.toFixed(2), ww: Math.max(1e-3, w).toFixed(2) });
    const url = `/api/instances/${this.uid}/render?${params}`;
    const uid = this.uid;
    const flip = this.flip;
    const view = { ...this.view };
    const next = new Image();
    next.onload = () => {
      if (uid !== this.uid) return;                          // another image was asked for meanwhile
      this.image.src = url;
      this.image.hidden = false;
      Object.assign(this.image.style, { left: `${flip ? boxWidth - left - width : left}px`, top: `${top}px`,
                                         width: `${width}px`, height: `${height}px` });
      this.placed = view;
      this.image.dataset.window = `${c},${w}`;
      this.preview();
    };
    next.src = url;
  }

  // Between a change and its new picture: the shown one moved and scaled where it belongs
  preview() {
    const placed = this.placed;
    let transform = this.flip ? "scaleX(-1)" : "";
    if (placed && Math.abs(placed.scale - this.view.scale) < 1e-9) {
      const dx = (placed.x - this.view.x) * this.view.scale * (this.flip ? -1 : 1);
      const dy = (placed.y - this.view.y) * this.view.scale;
      if (dx || dy) transform = `translate(${dx}px, ${dy}px) ${transform}`;
    } else if (placed && !this.flip) {
      // a point u px into the picture (at left L) moves to k (L + u) + (placed.x - view.x) * scale
      const k = this.view.scale / placed.scale;
      const left = parseFloat(this.image.style.left) || 0, top = parseFloat(this.image.style.top) || 0;
      const dx = (k - 1) * left + (placed.x - this.view.x) * this.view.scale;
      const dy = (k - 1) * top + (placed.y - this.view.y) * this.view.scale;
      transform = `translate(${dx}px, ${dy}px) scale(${k})`;
    }
    this.image.style.transformOrigin = this.flip ? "50% 50%" : "0 0";     // a mirror turns about the middle
    this.image.style.transform = transform;
  }

  redraw() {                                   // at most every 80 ms while dragging
    this.preview();
    this.drawMarks();
    this.annotate();
    if (this.pending) return;
    this.pending = setTimeout(() => { this.pending = null; this.draw(); }, 80);
  }

  zoomAt(factor, sx, sy) {
    const [x, y] = this.toSource(sx, sy);
    this.view.scale = Math.min(32, Math.max(0.01, this.view.scale * factor));
    const vx = this.flip ? this.size().width - sx : sx;
    this.view.x = x - vx / this.view.scale;
    this.view.y = y - sy / this.view.scale;
    this.redraw();
  }

  panBy(dx, dy) {
    this.view.x -= (this.flip ? -dx : dx) / this.view.scale;
    this.view.y -= dy / this.view.scale;
    this.redraw();
  }

  windowBy(dx, dy) {
    const range = Math.max(1e-3, this.info.window_width);
    this.windowing = { w: Math.max(range / 1000, this.windowing.w + dx * range / 400), c: this.windowing.c + dy * range / 400 };
    this.presetName = "custom";
    this.redraw();
  }

  setWindow(c, w, name = "") {
    this.windowing = { c, w };
    this.presetName = name;
    this.draw();
  }

  // Centre on a source point, zoomed so that a region of radius radiusPx fills about a quarter of the box
  zoomTo(x, y, radiusPx) {
    const { width, height } = this.size();
    this.view.scale = Math.min(8, Math.min(width, height) / Math.max(8, radiusPx * 4));
    this.view.x = x - width / 2 / this.view.scale;
    this.view.y = y - height / 2 / this.view.scale;
    this.draw();
  }

  drawMarks() {
    const { width, height } = this.size();
    this.overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.overlay.replaceChildren();
    this.overlay.style.display = this.showMarks ? "" : "none";
    for (const mark of this.marks) {
      const [cx, cy] = this.toScreen(mark.x, mark.y);
      const r = Math.max(this.compact ? 5 : 8, mark.radius * this.view.scale);
      const group = document.createElementNS(SVG, "g");
      group.setAttribute("class", `mark ${mark.kind}${mark.id === this.selected ? " selected" : ""}`);
      group.setAttribute("data-id", mark.id);
      const circle = document.createElementNS(SVG, "circle");
      Object.entries({ cx, cy, r }).forEach(([k, v]) => circle.setAttribute(k, v));
      group.append(circle);
      if (!this.compact || mark.kind === "cluster") {
        const label = document.createElementNS(SVG, "text");
        const right = this.flip ? cx < width / 2 : cx < width * 0.8;   // the label on the side with room
        label.setAttribute("x", right ? cx + r * 0.75 + 4 : cx - r * 0.75 - 4);
        label.setAttribute("y", cy - r * 0.75 - 4);
        label.setAttribute("text-anchor", right ? "start" : "end");
        label.textContent = mark.id;
        group.append(label);
      }
      this.overlay.append(group);
    }
  }

  annotate() {
    const lines = (corner, items) => this.corners[corner].replaceChildren(...items.filter(Boolean).map((t) => el("div", {}, t)));
    if (!this.info) return;
    const { c, w } = this.windowing || {};
    const windowText = this.windowing ? `WC ${rounded(c, w)}  WW ${rounded(w, w)}${this.presetName ? ` (${this.presetName})` : ""}` : "";
    if (this.compact) {                      // the view's name at its outer corner
      lines("tl", (this.labels.tl || []).slice(0, 1));
      lines("tr", (this.labels.tr || []).slice(0, 1));
      lines("bl", this.labels.bl || []);
      lines("br", []);
      return;
    }
    lines("tl", this.labels.tl);
    lines("tr", this.labels.tr);
    lines("bl", [windowText]);
    lines("br", [`Zoom ${Math.round(this.view.scale * 100)}%`, this.flip ? "mirrored" : ""]);
    this.box.dataset.zoom = String(Math.round(this.view.scale * 100));
  }
}
