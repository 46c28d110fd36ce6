// What every page shares: the CSRF token, JSON requests, elements built safely, notifications.
export const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

export async function api(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (response.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
  if (!response.ok) throw new Error(await reason(response));
  return response.json();
}

export async function post(url, body) {
  const response = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body ?? {}),
  });
  if (!response.ok) throw new Error(await reason(response));
  return response.json();
}

async function reason(response) {
  try { return (await response.json()).error || response.statusText; } catch { return response.statusText; }
}

// el("a", {href: "/x", class: "y"}, "text", child...): text is always text, never HTML
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function toast(text, kind = "info") {
  const box = document.getElementById("toasts");
  const item = el("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  box.append(item);
  setTimeout(() => item.remove(), 8000);
}

// A DICOM person name (PS3.5 6.2: family^given^middle^prefix^suffix; "=" separates the alphabetic,
// ideographic and phonetic forms) as people write it: "Family, Prefix Given Middle, Suffix".
export function personName(value) {
  const text = String(value ?? "").trim();
  if (!text) return "";
  const group = text.split("=").find((g) => g.replace(/\^/g, "").trim()) || "";
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = group.split("^").map((p) => p.trim());
  const rest = [prefix, given, middle].filter(Boolean).join(" ");
  return [family, rest].filter(Boolean).join(", ") + (suffix ? `, ${suffix}` : "");
}

function sameDay(a, b) {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
}

// A DICOM date (YYYYMMDD) and time (HHMMSS.FFFFFF) in the reader's language and calendar: "today
// 14:05", "yesterday", "1 Jan 2026". { text, title (the whole date), iso } or the value as it is.
export function dicomDate(date, time = "", now = new Date()) {
  const d = /^(\d{4})(\d{2})(\d{2})$/.exec(String(date ?? "").trim());
  if (!d) return { text: String(date ?? ""), title: "", iso: "" };
  const t = /^(\d{2})(\d{2})?/.exec(String(time ?? "").trim());
  const when = new Date(Number(d[1]), Number(d[2]) - 1, Number(d[3]), t ? Number(t[1]) : 0, t && t[2] ? Number(t[2]) : 0);
  if (when.getDate() !== Number(d[3])) return { text: String(date), title: "", iso: "" };     // 20260231
  const yesterday = new Date(now.getFullYear(), now.getMonth(), now.getDate() - 1);
  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const clock = t ? ` ${new Intl.DateTimeFormat(undefined, { timeStyle: "short" }).format(when)}` : "";
  let text = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" }).format(when);   // older: the time in the title
  if (sameDay(when, now)) text = relative.format(0, "day") + clock;
  else if (sameDay(when, yesterday)) text = relative.format(-1, "day") + clock;
  return {
    text,
    title: new Intl.DateTimeFormat(undefined, t ? { dateStyle: "full", timeStyle: "short" } : { dateStyle: "full" }).format(when),
    iso: `${d[1]}-${d[2]}-${d[3]}`,
  };
}

function megabytes(bytes) {
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;
}

// Upload files (a FormData) showing how far it is (a progress bar and a line of text: sending, then
// storing); resolves to the server's answer
export function upload(form, progress, status) {
  const say = (text) => { if (status) status.textContent = text; };
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/api/upload");
    request.setRequestHeader("X-CSRF-Token", csrf);
    progress.removeAttribute("value");                      // indeterminate until the first report
    say("Sending…");
    request.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      progress.value = e.loaded / e.total;
      say(`Sending: ${megabytes(e.loaded)} of ${megabytes(e.total)} (${Math.floor((100 * e.loaded) / e.total)}%)`);
    };
    request.upload.onload = () => { progress.removeAttribute("value"); say("Sent; the node is checking and storing the files…"); };
    request.onload = () => {
      let answer = {};
      try { answer = JSON.parse(request.responseText); } catch { /* not JSON */ }
      if (request.status === 200) resolve(answer); else reject(new Error(answer.error || request.statusText));
    };
    request.onerror = () => reject(new Error("the upload failed: the viewer could not be reached. Check the network and try again."));
    request.send(form);
  });
}

const OUTCOME = { stored: "stored", duplicate: "already here", refused: "refused" };

// What an upload did: one line per file, and one link per study it touched, saying whose study it
// is and what this upload added to it
export function uploadResults(target, answer) {
  const counts = (s) => [s.stored && `${s.stored} stored`, s.duplicate && `${s.duplicate} already here`,
    s.refused && `${s.refused} refused`].filter(Boolean).join(", ");
  const links = answer.studies.map((s) => {
    const date = dicomDate(s.date, s.time);
    return el("li", { class: "uploaded-study", "data-study": s.study_uid },
      el("a", { href: `/studies/${s.study_uid}`, class: "button" }, "Open ", personName(s.patient_name) || "(no name)"),
      " ", el("span", { class: "muted" }, [date.text, s.modalities, s.description, counts(s)].filter(Boolean).join(" · ")));
  });
  target.replaceChildren(
    links.length ? el("ul", { class: "uploaded-studies" }, links) : el("p", { class: "error" }, "Nothing was stored."),
    el("details", { class: "upload-files", open: answer.files.length <= 10 || answer.files.some((f) => f.outcome === "refused") },
      el("summary", {}, `${answer.files.length} file${answer.files.length === 1 ? "" : "s"}`),
      el("table", { class: "upload-results" },
        el("tbody", {}, answer.files.map((f) => el("tr", { class: f.outcome },
          el("td", {}, f.name), el("td", {}, OUTCOME[f.outcome] || f.outcome),
          el("td", {}, f.outcome === "refused" ? f.reason : "")))))));
}
