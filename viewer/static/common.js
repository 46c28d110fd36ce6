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

// Upload files (a FormData) with a progress bar; resolves to the server's answer
export function upload(form, progress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/api/upload");
    request.setRequestHeader("X-CSRF-Token", csrf);
    request.upload.onprogress = (e) => { if (e.lengthComputable) { progress.hidden = false; progress.value = e.loaded / e.total; } };
    request.onload = () => {
      progress.hidden = true;
      let answer = {};
      try { answer = JSON.parse(request.responseText); } catch { /* not JSON */ }
      if (request.status === 200) resolve(answer); else reject(new Error(answer.error || request.statusText));
    };
    request.onerror = () => { progress.hidden = true; reject(new Error("the upload failed")); };
    request.send(form);
  });
}

export function uploadResults(target, answer) {
  target.replaceChildren(el("table", { class: "upload-results" },
    el("tbody", {}, answer.files.map((f) => el("tr", { class: f.outcome },
      el("td", {}, f.name), el("td", {}, f.outcome), el("td", {}, f.outcome === "stored" ? "" : f.reason))))),
    ...answer.studies.map((uid) => el("p", {}, el("a", { href: `/studies/${uid}` }, "Open the uploaded study"))));
}
