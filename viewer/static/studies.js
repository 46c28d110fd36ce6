// The study list: search (the same matching as C-FIND), pages, analysis badges; uploads.
import { api, el, toast, upload, uploadResults } from "./common.js";

const form = document.getElementById("search");
const body = document.querySelector("#studies tbody");
let page = 0;

function badges(jobs) {
  return Object.entries(jobs || {}).map(([state, count]) =>
    el("span", { class: `badge ${state}`, title: `${count} job(s) ${state}` }, state === "succeeded" ? "results" : state));
}

async function search(newPage = 0) {
  page = newPage;
  const params = new URLSearchParams(new FormData(form));
  params.set("page", page);
  history.replaceState(null, "", "?" + params);
  try {
    const answer = await api("/api/studies?" + params);
    body.replaceChildren(...answer.studies.map((s) => el("tr", { "data-study": s.study_uid, tabindex: 0,
      onclick: () => { location.href = `/studies/${s.study_uid}`; },
      onkeydown: (e) => { if (e.key === "Enter") location.href = `/studies/${s.study_uid}`; } },
      el("td", {}, el("a", { href: `/studies/${s.study_uid}` }, s.patient_name || "(no name)")),
      el("td", {}, s.patient_id || ""), el("td", {}, s.date || ""), el("td", {}, s.description || ""),
      el("td", {}, s.modalities || ""), el("td", {}, s.instances ?? ""), el("td", {}, badges(s.jobs)))));
    if (!answer.studies.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 7 }, "No study matches.")));
    document.getElementById("page").textContent = `page ${page + 1}`;
    document.getElementById("previous").disabled = page === 0;
    document.getElementById("next").disabled = !answer.more;
  } catch (error) { toast(error.message, "error"); }
}

form.addEventListener("submit", (e) => { e.preventDefault(); search(0); });
document.getElementById("previous").addEventListener("click", () => search(Math.max(0, page - 1)));
document.getElementById("next").addEventListener("click", () => search(page + 1));
document.getElementById("upload").addEventListener("submit", async (e) => {
  e.preventDefault();
  const files = new FormData(e.target);
  try {
    const answer = await upload(files, document.getElementById("upload-progress"));
    uploadResults(document.getElementById("upload-results"), answer);
    toast(`${answer.files.filter((f) => f.outcome === "stored").length} file(s) stored`);
    search(page);
  } catch (error) { toast(error.message, "error"); }
});
search(Number(new URLSearchParams(location.search).get("page") || 0));
