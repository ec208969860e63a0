// Connector status: per account, is the connection to Apple healthy, when did it last sync, when
// does the token expire, who owns it, Apple's last error; and the app's own health.
import { get, health } from "./api.js";
import { el, statusIcon, timeEl, daysUntil, errorBox, fmtDate } from "./ui.js";

export const title = "Connector status";

function owner(o) {
  switch (o && o.kind) {
    case "ours": return el("span", { class: "text-ok" }, "This app");
    case "foreign": return el("span", { class: "text-error" }, "Another MDM: " + (o.name || o.id));
    case "unclaimed": return el("span", { class: "text-warning" }, "No MDM (unclaimed)");
    default: return el("span", {}, "Not seen yet");
  }
}

function expiry(iso) {
  const days = daysUntil(iso);
  const text = days < 0 ? "expired " + (-days) + " day(s) ago" : days <= 30 ? "expires in " + days + " day(s): renew it in Apple Business Manager and replace it (Edit)" : "in " + days + " days";
  return el("span", { class: days < 0 ? "text-error" : days <= 30 ? "text-warning" : undefined }, fmtDate(iso, false) + " · " + text);
}

function card(a) {
  const s = a.lastSync;
  const last = s ? el("span", { class: s.ok ? "text-ok" : "text-error" }, fmtDate(s.at) + " · " + (s.full ? "full" : "incremental") + " · " + (s.ok ? "succeeded" : "failed")) : el("span", {}, "never");
  const err = a.lastAppleError || (s && s.error) || null;
  return el("article", { class: "card", "data-account": a.id },
    el("h3", {}, statusIcon(a.status), a.name),
    el("dl", { class: "facts" },
      el("dt", {}, "Connection"), el("dd", { class: "text-" + (a.status.severity === "ok" ? "ok" : a.status.severity) }, a.status.description),
      el("dt", {}, "Last synchronized"), el("dd", {}, timeEl(a.lastSynchronized)),
      el("dt", {}, "Last sync attempt"), el("dd", {}, last),
      el("dt", {}, "Token expiry"), el("dd", {}, expiry(a.expiryDate)),
      el("dt", {}, "Ownership"), el("dd", {}, owner(a.owner)),
      el("dt", {}, "Last Apple answer"), el("dd", {}, timeEl(a.lastAppleOkAt)),
      el("dt", {}, "Last Apple error"), el("dd", {}, err ? el("span", { class: "text-error" }, err.message + " (" + err.code + (err.number ? ", Apple error " + err.number : "") + (err.at ? ", " + fmtDate(err.at) : "") + ")") : "none"),
      el("dt", {}, "Apple's notifications"), el("dd", {}, a.notifications ? "subscribed" : "off (changes are read at synchronization)")));
}

function check(name, c) {
  const ok = c && c.ok;
  const extra = c && (c.error || (c.status ? "status " + c.status : ""));
  return el("li", { class: ok ? "text-ok" : "text-error" }, (ok ? "✓ " : "✗ ") + name + (extra ? ": " + extra : ""));
}

export async function render(root) {
  root.append(el("h1", {}, "Connector status"),
    el("p", { class: "hint" }, "Each account is a connection to Apple's Apps and Books service through its server token."));
  const cards = el("div", { class: "cards" });
  const app = el("section", { class: "panel", "aria-labelledby": "app-health" }, el("h2", { id: "app-health" }, "This app"));
  root.append(cards, app);
  try {
    const { accounts } = await get("/api/accounts");
    cards.replaceChildren(...(accounts.length ? accounts.map(card) : [el("p", { class: "empty" }, "No accounts yet.")]));
  } catch (e) {
    cards.replaceChildren(errorBox(e));
  }
  const h = await health().catch((e) => ({ status: 0, body: null, error: e }));
  if (!h.body) {
    app.append(h.error ? errorBox(h.error) : el("p", { class: "text-error" }, "The health check gave no answer (" + h.status + ")."));
  } else {
    const c = h.body.checks || {};
    app.append(el("p", { class: h.body.status === "ok" ? "text-ok" : "text-error", id: "app-status" }, (h.body.status === "ok" ? "Healthy" : "Degraded") + " · version " + h.body.version),
      el("ul", { class: "checks" }, check("Key-value store", c.keyValue), check("Variables (admin key set)", c.variables), check("Apple component", c.appleComponent)));
  }
  try {
    const d = await get("/api/daily");
    const last = d.job;
    app.append(el("h2", {}, "Daily work"), el("dl", { class: "facts" },
      el("dt", {}, "Runs at"), el("dd", {}, d.dailyAtUtc + " UTC; full refresh every " + d.fullRefreshDays + " days"),
      el("dt", {}, "Next run"), el("dd", {}, timeEl(d.nextRunAt)),
      el("dt", {}, "Last run"), el("dd", {}, last ? (last.state + " · started " + fmtDate(last.createdAt) + (last.finishedAt ? " · finished " + fmtDate(last.finishedAt) : "")) : "not yet")));
  } catch (e) {
    app.append(errorBox(e));
  }
}
