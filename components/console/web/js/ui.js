// Small DOM helpers shared by the pages: elements, dates, dialogs, menus, job progress.
import { api, ApiFailure } from "./api.js";

export const session = { role: null, caller: "" };
export const canAct = () => session.role === "admin";
const READER_REASON = "Needs the admin key: this key can only read";

/** el("button", {class: "x", onclick: f}, "text", child, ...) */
export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (v === true) e.setAttribute(k, "");
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/**
 * A button that changes something. It carries data-action; with a reader key it is disabled
 * and says why. `reason` (when set) disables it with that reason for everyone.
 */
export function action(label, onclick, attrs = {}) {
  const reason = !canAct() ? READER_REASON : attrs.reason;
  const a = { ...attrs, type: "button", "data-action": "", onclick };
  delete a.reason;
  const b = el("button", a, label);
  if (reason) {
    b.disabled = true;
    b.title = reason;
  }
  return b;
}

/** Disable every action control inside `root` for a reader key. */
export function lockForReader(root) {
  if (canAct()) return;
  root.querySelectorAll("[data-action]").forEach((c) => {
    c.disabled = true;
    if (!c.title) c.title = READER_REASON;
  });
}

export function fmtDate(iso, withTime = true) {
  if (!iso) return "never";
  const d = new Date(iso);
  if (isNaN(d)) return String(iso);
  const opts = withTime
    ? { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" }
    : { year: "numeric", month: "short", day: "numeric" };
  return d.toLocaleString(undefined, opts);
}
export function timeEl(iso, withTime = true) {
  if (!iso) return el("span", { class: "muted" }, "never");
  return el("time", { datetime: iso }, fmtDate(iso, withTime));
}
export function daysUntil(iso) {
  return Math.floor((new Date(iso) - Date.now()) / 86400000);
}

export function announce(text) {
  const live = document.getElementById("live");
  live.textContent = "";
  setTimeout(() => { live.textContent = text; }, 30);
}

/** Show an API failure in a page region (a paragraph with role=alert). */
export function errorBox(err) {
  const msg = err instanceof ApiFailure ? err.message + (err.code && !err.code.startsWith("http_") ? " (" + err.code + ")" : "")
    : String(err && err.message ? err.message : err);
  return el("p", { class: "form-error", role: "alert" }, msg);
}

export function table(headers, rows, empty, label) {
  const thead = el("thead", {}, el("tr", {}, headers.map((h) =>
    el("th", { scope: "col", class: h.num ? "num" : undefined }, h.label !== undefined ? h.label : h))));
  const body = rows.length ? rows : [el("tr", {}, el("td", { colspan: headers.length, class: "empty" }, empty || "Nothing here yet."))];
  return el("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": label || "Table" }, el("table", {}, thead, el("tbody", {}, body)));
}

/** A modal dialog; `build(dialog, close)` fills it. Resolves with what close() was given. */
export function modal(title, build) {
  return new Promise((resolve) => {
    const id = "dlg-" + Math.random().toString(36).slice(2);
    const d = el("dialog", { "aria-labelledby": id });
    const opener = document.activeElement;
    let done = false;
    const close = (value) => {
      if (done) return;
      done = true;
      d.close();
      d.remove();
      if (opener && opener.isConnected) opener.focus();
      resolve(value);
    };
    d.addEventListener("cancel", (e) => {
      e.preventDefault();
      if (d.beforeClose) d.beforeClose().then((ok) => ok && close(undefined));
      else close(undefined);
    });
    const h = el("h2", { id }, title);
    build(d, close, h);
    document.body.append(d);
    d.showModal();
  });
}

/** Ask before doing something; resolves true when confirmed. */
export function confirmDialog(title, message, confirmLabel, danger) {
  return modal(title, (d, close, h) => {
    const body = el("div", { class: "dialog-body" }, h,
      (Array.isArray(message) ? message : [message]).map((m) => el("p", {}, m)),
      el("div", { class: "dialog-actions" },
        el("button", { type: "button", onclick: () => close(false) }, "Cancel"),
        el("button", { type: "button", class: danger ? "primary danger" : "primary", "data-confirm": "", onclick: () => close(true) }, confirmLabel)));
    d.append(body);
  }).then((v) => v === true);
}

/** Unsaved changes: resolves "save", "discard" or "stay". */
export function unsavedDialog(what) {
  return modal("Unsaved changes", (d, close, h) => {
    d.append(el("div", { class: "dialog-body" }, h,
      el("p", {}, "You changed " + what + " and have not saved it. Save the change, or cancel it?"),
      el("div", { class: "dialog-actions" },
        el("button", { type: "button", onclick: () => close("stay") }, "Keep editing"),
        el("button", { type: "button", onclick: () => close("discard") }, "Cancel the change"),
        el("button", { type: "button", class: "primary", onclick: () => close("save") }, "Save"))));
  }).then((v) => v || "stay");
}

export function infoDialog(title, content) {
  return modal(title, (d, close, h) => {
    d.append(el("div", { class: "dialog-body" }, h, content,
      el("div", { class: "dialog-actions" }, el("button", { type: "button", class: "primary", onclick: () => close(true) }, "Close"))));
  });
}

/** A ⋮ menu button with items [{label, run, reason}] (arrow keys, Escape, click outside). */
export function rowMenu(label, items) {
  const id = "menu-" + Math.random().toString(36).slice(2);
  const btn = el("button", { type: "button", class: "icon", "aria-haspopup": "menu", "aria-expanded": "false", "aria-controls": id, "aria-label": label, title: label }, "⋮");
  const list = el("ul", { class: "menu", role: "menu", id, hidden: true, "aria-label": label });
  const wrap = el("div", { class: "menu-wrap" }, btn, list);
  const buttons = items.map((it) => {
    const b = action(it.label, () => { hide(); it.run(); }, { role: "menuitem", tabindex: "-1", reason: it.reason });
    list.append(el("li", { role: "none" }, b));
    return b;
  });
  const enabled = () => buttons.filter((b) => !b.disabled);
  const outside = (e) => { if (!wrap.contains(e.target)) hide(); };
  function show() {
    list.hidden = false;
    btn.setAttribute("aria-expanded", "true");
    document.addEventListener("mousedown", outside);
    (enabled()[0] || buttons[0]).focus();
  }
  function hide(refocus) {
    if (list.hidden) return;
    list.hidden = true;
    btn.setAttribute("aria-expanded", "false");
    document.removeEventListener("mousedown", outside);
    if (refocus) btn.focus();
  }
  btn.addEventListener("click", () => (list.hidden ? show() : hide(true)));
  btn.addEventListener("keydown", (e) => { if (e.key === "ArrowDown") { e.preventDefault(); show(); } });
  list.addEventListener("keydown", (e) => {
    const all = enabled().length ? enabled() : buttons;
    const i = all.indexOf(document.activeElement);
    if (e.key === "Escape") { e.preventDefault(); hide(true); }
    else if (e.key === "ArrowDown") { e.preventDefault(); all[(i + 1) % all.length].focus(); }
    else if (e.key === "ArrowUp") { e.preventDefault(); all[(i - 1 + all.length) % all.length].focus(); }
    else if (e.key === "Home") { e.preventDefault(); all[0].focus(); }
    else if (e.key === "End") { e.preventDefault(); all[all.length - 1].focus(); }
    else if (e.key === "Tab") hide();
  });
  return wrap;
}

export function statusIcon(status) {
  const sev = (status && status.severity) || "info";
  const glyph = { ok: "✓", info: "i", warning: "!", error: "×" }[sev] || "?";
  const desc = (status && status.description) || "unknown";
  return el("span", { class: "status-icon sev-" + sev, title: desc, role: "img", "aria-label": "Status: " + desc, "data-status": status && status.code }, glyph);
}

// ---- long jobs: a progress bar from GET /api/jobs/{id} until the job ends -------------------

const JOB_NAMES = { refresh: "Refresh", cleanup: "Clean up", reconcile: "Reconcile licenses", daily: "Daily run" };
const tracked = new Map();

function jobText(job) {
  const p = job.progress || {};
  const of = p.total !== undefined && p.total !== null ? " of " + p.total : "";
  return (p.phase ? p.phase + ": " : "") + (p.done || 0) + of;
}

function resultText(job) {
  if (job.state === "failed") {
    const e = job.error || {};
    return "Failed: " + (e.message || e.code || "unknown error");
  }
  const r = job.result;
  if (!r || typeof r !== "object") return "Finished.";
  const parts = Object.entries(r)
    .filter(([, v]) => v === null || ["number", "string", "boolean"].includes(typeof v))
    .map(([k, v]) => k.replace(/([A-Z])/g, " $1").toLowerCase() + ": " + v);
  return "Finished. " + (parts.length ? parts.join(", ") + "." : "");
}

/**
 * Show a job in `container` and follow it to the end. An admin's console also advances refresh
 * and clean-up jobs (POST /api/jobs/{id}/resume) and the reconcile job (POST /api/reconcile),
 * as the API expects of a client that waits; the daily run advances through its scheduler.
 * Resolves with the finished job.
 */
export function followJob(container, job, label, onDone) {
  if (tracked.has(job.id)) return tracked.get(job.id);
  const title = el("strong", {}, (JOB_NAMES[job.kind] || job.kind) + (label ? " — " + label : ""));
  const state = el("span", { class: "hint" });
  const bar = el("progress", { max: "100", "aria-label": "Progress of " + title.textContent });
  const result = el("p", { class: "result", role: "status" });
  const box = el("div", { class: "job", "data-job": job.id, "data-kind": job.kind }, el("div", { class: "job-head" }, title, state), bar, result);
  container.prepend(box);
  const render = (j) => {
    const p = j.progress || {};
    if (j.state === "running") {
      if (p.total) { bar.max = p.total; bar.value = Math.min(p.done || 0, p.total); }
      else bar.removeAttribute("value");
      state.textContent = "running · " + jobText(j);
      box.dataset.state = "running";
    } else {
      bar.max = 1; bar.value = 1;
      state.textContent = j.state + (j.finishedAt ? " · " + fmtDate(j.finishedAt) : "");
      result.textContent = resultText(j);
      result.className = "result " + (j.state === "failed" ? "text-error" : "text-ok");
      box.dataset.state = j.state;
    }
  };
  render(job);
  const promise = (async () => {
    let j = job;
    let delay = 400;
    while (j.state === "running") {
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 1.5, 3000);
      try {
        if (canAct() && (j.kind === "refresh" || j.kind === "cleanup")) {
          await api("POST", "/api/jobs/" + encodeURIComponent(j.id) + "/resume").catch(() => null);
        } else if (canAct() && j.kind === "reconcile") {
          await api("POST", "/api/reconcile").catch(() => null);
        }
        j = await api("GET", "/api/jobs/" + encodeURIComponent(j.id));
        render(j);
      } catch (e) {
        if (e.kind === "unauthorized") break;
        state.textContent = "cannot read progress: " + e.message;
      }
    }
    tracked.delete(job.id);
    announce((JOB_NAMES[j.kind] || j.kind) + " " + j.state);
    if (onDone) onDone(j);
    return j;
  })();
  tracked.set(job.id, promise);
  return promise;
}

/** Show running jobs (e.g. the daily run, or one started elsewhere) on page load. */
export async function showRunningJobs(container, filter, labelOf, onDone) {
  try {
    const { jobs } = await api("GET", "/api/jobs?limit=20");
    for (const j of jobs.filter((j) => j.state === "running" && filter(j))) followJob(container, j, labelOf(j), onDone);
  } catch (_) { /* the page shows its own errors */ }
}

/** Split a pasted list on new lines, commas, semicolons and spaces; drop blanks and repeats. */
export function parseList(text) {
  return [...new Set(text.split(/[\s,;]+/).map((s) => s.trim()).filter(Boolean))];
}
