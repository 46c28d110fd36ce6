// The study page's side panels: analysis plug-ins (a form from each parameter schema: the
// parameter's label and help, an empty field meaning its default), the study's jobs (progress,
// and a failure's reason in plain words with the technical text apart), and sharing (make a
// link, copy it, revoke the open ones).
import { api, el, post, toast } from "./common.js";

function field(param) {
  const id = `param-${param.name}`;
  const common = { name: param.name, id, "aria-describedby": `${id}-help` };
  const unit = param.unit ? ` (${param.unit})` : "";
  let input;
  if (param.type === "bool") {
    input = el("input", { ...common, type: "checkbox", checked: param.default });
    return el("div", { class: "param param-bool" },
      el("label", { for: id }, input, ` ${param.label || param.name}`),
      el("small", { id: `${id}-help`, class: "param-help" }, param.help));
  }
  if (param.type === "choice") {
    input = el("select", common, param.choices.map((c) => el("option", { value: c, selected: c === param.default }, c)));
  } else {
    const numeric = param.type === "int" || param.type === "float";
    input = el("input", { ...common, type: numeric ? "number" : "text", value: param.default ?? "",
                          placeholder: `default: ${param.default ?? "none"}`, inputmode: numeric ? "decimal" : null,
                          min: param.min, max: param.max, step: param.type === "int" ? 1 : "any" });
  }
  const range = param.min !== undefined && param.max !== undefined ? ` From ${param.min} to ${param.max}.` : "";
  return el("div", { class: "param" },
    el("label", { for: id }, `${param.label || param.name}${unit}`),
    input,
    el("small", { id: `${id}-help`, class: "param-help" }, `${param.help}${range} Empty: the default, ${param.default}.`));
}

// The values to send: an empty field is left out, so the plug-in takes its default
export function formParams(form, params) {
  const values = {};
  for (const p of params) {
    const input = form.elements[p.name];
    if (!input) continue;
    if (p.type === "bool") values[p.name] = input.checked;
    else if (String(input.value).trim() === "") continue;
    else values[p.name] = p.type === "int" || p.type === "float" ? Number(input.value) : input.value;
  }
  return values;
}

export async function loadPlugins(studyUid, box, onStarted) {
  const answer = await api(`/api/studies/${studyUid}/plugins`);
  if (!answer.can_start) {                       // a share link's guest reads results, starts nothing
    box.replaceChildren(...(answer.why_not ? [el("p", { class: "muted", id: "no-router" }, answer.why_not)] : []));
    return;
  }
  box.replaceChildren(...answer.plugins.map((plugin) => {
    const wide = window.matchMedia("(min-width: 701px)").matches;   // a phone folds the settings away
    const form = el("form", { class: "plugin", "data-plugin": plugin.name },
      el("h3", {}, plugin.title),
      plugin.params.length ? el("details", { class: "plugin-settings", open: wide },
        el("summary", {}, `Settings (${plugin.params.length})`), ...plugin.params.map(field)) : null,
      el("button", { type: "submit" }, `Run ${plugin.name}`));
    // a value out of range opens the settings, so that the browser can point at its field
    form.addEventListener("invalid", () => form.querySelector(".plugin-settings")?.setAttribute("open", ""), true);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!form.reportValidity()) return;          // out of range: the browser says so at the field
      try {
        await post(`/api/studies/${studyUid}/jobs`, { plugin: plugin.name, params: formParams(form, plugin.params) });
        toast(`${plugin.name} started`);
        onStarted();
      } catch (error) { toast(error.message, "error"); }
    });
    return form;
  }));
  if (!answer.plugins.length) box.append(el("p", { class: "muted" }, "No analysis takes this study."));
}

const STATE_WORDS = { queued: "waiting", running: "running", succeeded: "done", failed: "failed", cancelled: "cancelled" };

export async function loadJobs(studyUid, list, { shared, labelOfSeries }) {
  const { jobs } = await api(`/api/studies/${studyUid}/jobs`);
  list.replaceChildren(...jobs.map((job) => {
    const on = (job.inputs || []).map(labelOfSeries).filter(Boolean).join(", ");
    return el("li", { class: `job ${job.state}`, "data-job": job.id },
      el("div", { class: "job-head" }, el("strong", {}, job.plugin), on ? el("span", { class: "muted" }, ` on ${on}`) : null,
        el("span", { class: `state ${job.state}` }, STATE_WORDS[job.state] || job.state)),
      ["queued", "running"].includes(job.state) ? el("progress", { value: job.progress || 0, max: 1 }) : null,
      job.progress_message && job.state === "running" ? el("small", { class: "progress-message" }, job.progress_message) : null,
      job.state === "succeeded" && job.summary?.outcome ? el("small", {}, job.summary.outcome) : null,
      job.state === "failed" && job.reason ? el("p", { class: "reason" }, job.reason) : null,
      job.state === "failed" && job.technical ? el("details", { class: "technical" }, el("summary", {}, "Technical details"),
        el("small", {}, (job.errors || []).join("\n"))) : null,
      job.files.includes("model.x3d") ? el("a", { href: `/studies/${studyUid}/model/${job.id}`, class: "button" }, "Open the 3D model") : null,
      !shared && ["queued", "running"].includes(job.state)
        ? el("button", { type: "button", onclick: async () => {
            try { await post(`/api/jobs/${job.id}/cancel`); loadJobs(studyUid, list, { shared, labelOfSeries }); }
            catch (e) { toast(e.message, "error"); } } }, "Cancel")
        : null);
  }));
  if (!jobs.length) list.append(el("li", { class: "muted none" }, "No analysis has run on this study yet."));
}

// -- de-identified copies (admins) ---------------------------------------------------------------

const EXPORT_WORDS = { queued: "waiting", running: "sending", succeeded: "sent", failed: "failed" };

// The study's exports and a form that queues one; polls while one is waiting or being sent.
export async function loadExports(studyUid) {
  const box = document.getElementById("deid");
  const list = document.getElementById("exports");
  if (!box || !list) return;
  const answer = await api(`/api/studies/${studyUid}/exports`);
  if (!box.dataset.ready) {
    box.dataset.ready = "yes";
    if (answer.why_not) box.replaceChildren(el("p", { class: "muted" }, answer.why_not));
    else {
      const choose = (name, label, values) => el("label", {}, label, " ",
        el("select", { name }, ...values.map((v) => el("option", { value: v }, v))));
      const form = el("form", { class: "plugin", id: "deid-form" },
        choose("profile", "Profile", answer.profiles), choose("to", "To", answer.destinations),
        el("button", { type: "submit", disabled: !answer.destinations.length }, "Send a de-identified copy"));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        try {
          await post(`/api/studies/${studyUid}/exports`, { profile: form.profile.value, to: form.to.value });
          toast(`A de-identified copy will go to ${form.to.value}`);
          loadExports(studyUid);
        } catch (error) { toast(error.message, "error"); }
      });
      box.replaceChildren(form);
    }
  }
  const day = (t) => new Date(t * 1000).toLocaleString();
  list.replaceChildren(...answer.exports.map((x) => el("li", { class: `job ${x.state}`, "data-export": x.id },
    el("div", { class: "job-head" }, el("strong", {}, x.destination), el("span", { class: "muted" }, ` ${x.profile}`),
      el("span", { class: `state ${x.state === "running" ? "running" : x.state}` }, EXPORT_WORDS[x.state] || x.state)),
    el("small", {}, `${day(x.created_at)} by ${x.created_by || "?"}: ${x.sent || 0} of ${x.total ?? "?"} sent`
      + (x.dropped ? `, ${x.dropped} left out (may show burned-in text)` : "")
      + (x.pseudonym ? `, as ${x.pseudonym}` : "")),
    x.error ? el("p", { class: "reason" }, x.error) : null)));
  if (!answer.exports.length) list.append(el("li", { class: "muted none" }, "No copy of this study has been sent."));
  clearTimeout(loadExports.timer);
  if (answer.exports.some((x) => x.state === "queued" || x.state === "running")) {
    loadExports.timer = setTimeout(() => loadExports(studyUid).catch(() => {}), 3000);
  }
}

// -- sharing -------------------------------------------------------------------------------------

async function copy(text, input) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {                                     // no clipboard permission: select it for Ctrl+C
    input.hidden = false;
    input.focus();
    input.select();
    if (!document.execCommand?.("copy")) throw new Error("copy it by hand: the link is selected");
  }
}

export function setUpSharing(studyUid) {
  const make = document.getElementById("share");
  if (!make) return;
  const output = document.getElementById("share-url");
  const made = document.getElementById("share-made");
  make.addEventListener("click", async () => {
    try {
      const answer = await post(`/api/studies/${studyUid}/share`, { days: Number(document.getElementById("share-days").value) });
      output.value = answer.url;
      output.hidden = false;
      made.hidden = false;
      output.select();
      toast("Share link made: it opens this study only, read-only");
      loadShares(studyUid);
    } catch (error) { toast(error.message, "error"); }
  });
  document.getElementById("share-copy").addEventListener("click", async () => {
    try {
      await copy(output.value, output);
      toast("The link is copied: paste it into a message", "success");
    } catch (error) { toast(error.message, "error"); }
  });
  document.getElementById("share-panel").addEventListener("toggle", (e) => { if (e.target.open) loadShares(studyUid); });
}

// The study's links: who made each, until when, and a button to revoke the open ones this user may
// revoke (their own; an admin's: all)
export async function loadShares(studyUid) {
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
      open && link.can_revoke ? el("button", { type: "button", onclick: async () => {
        try { await post(`/api/shares/${link.id}/revoke`); toast("The link no longer opens anything"); loadShares(studyUid); }
        catch (error) { toast(error.message, "error"); }
      } }, "Revoke") : null);
  }));
}
