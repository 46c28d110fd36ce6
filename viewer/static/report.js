// A structured report as a reader wants it: the findings as a table (id, what, calcifications,
// score, where; a row opens its image at the finding), what the algorithm was and how it was set,
// and the whole content tree behind a toggle. The report scrolls by itself (wheel, drag, keys,
// a swipe): it lies outside the image's pointer handling.
import { el } from "./common.js";

function count(tree) {
  return tree.reduce((n, item) => n + 1 + count(item.children || []), 0);
}

function tree(items) {
  return el("ul", {}, items.map((i) => el("li", {},
    el("span", { class: "concept" }, i.name || "(unnamed)"),
    i.value ? el("span", { class: "value" }, ` ${i.value}`) : null,
    i.children?.length ? tree(i.children) : null)));
}

// report: the /sr answer; labelOf(uid): "MG R CC"; spacingOf(uid): mm per pixel or null;
// onShow(row): open the row's image at its region
export function renderReport(target, report, { heading, labelOf, spacingOf, onShow }) {
  const rows = report.findings || [];
  const algorithm = report.algorithm;
  const mm = (uid, px) => {
    const spacing = spacingOf(uid);
    return spacing ? `${(px * spacing).toFixed(1)} mm` : `${Math.round(px)} px`;
  };
  const where = (row) => {
    if (!row.image) return "";
    const label = labelOf(row.image) || "another image";
    if (!row.region) return label;
    const { x, y, radius } = row.region;
    return `${label}: ${mm(row.image, x)} across, ${mm(row.image, y)} down${radius ? `, radius ${mm(row.image, radius)}` : ""}`;
  };
  const body = rows.map((row, n) => {
    const absent = row.absent?.length;
    const finding = absent ? `${row.absent.join(", ")}: absent` : row.finding || "";
    const other = (row.measurements || []).map((m) => `${m.name} ${m.value}${m.unit && m.unit !== "1" ? ` ${m.unit}` : ""}`);
    const canShow = row.image && labelOf(row.image);
    // each cell's content in one element: a phone shows a row as a card of "label: value" lines
    const cell = (tag, label, content, attributes = {}) => el(tag, { "data-label": label, ...attributes }, el("span", {}, content));
    const cells = [
      cell("th", "Id", row.id || `${n + 1}`, { scope: "row" }),
      cell("td", "Finding", [finding, other.length ? el("small", {}, ` (${other.join("; ")})`) : null]),
      cell("td", "Calcifications", row.calcifications ?? "–", { class: "number" }),
      cell("td", "Score", row.score === null || row.score === undefined ? "–" : `${Number(row.score).toFixed(1)}%`, { class: "number" }),
      cell("td", "Where", canShow ? el("button", { type: "button", class: "link", title: "Open the image at this finding",
                                                  onclick: () => onShow(row) }, where(row)) : where(row)),
    ];
    return el("tr", { class: absent ? "absent" : "finding", "data-id": row.id }, cells);
  });
  const table = rows.length
    ? el("div", { class: "table-scroll" }, el("table", { class: "report-findings" },
        el("caption", {}, absentOnly(rows) ? "Nothing was found" : `${rows.filter((r) => !r.absent?.length).length} findings`),
        el("thead", {}, el("tr", {}, ["Id", "Finding", "Calcifications", "Score", "Where"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, body)))
    : el("p", {}, "This report holds no measurement group: see its content below.");
  const total = count(report.items || []);
  target.replaceChildren(
    el("h2", {}, heading || `Structured report: ${report.title}`),
    algorithm ? el("p", { class: "algorithm" }, `By ${algorithm.name || "an algorithm"}${algorithm.version ? ` ${algorithm.version}` : ""}`,
      algorithm.parameters?.length ? el("small", {}, ` (${algorithm.parameters.join(", ")})`) : null) : null,
    algorithm ? el("p", { class: "caveat" }, "Results of an algorithm, to be read by a physician: not a diagnosis.") : null,
    table,
    el("details", { class: "report-tree" }, el("summary", {}, `The whole report (${total} items)`), tree(report.items || [])));
}

function absentOnly(rows) {
  return rows.length > 0 && rows.every((r) => r.absent?.length);
}
