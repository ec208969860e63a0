// Notices and audit: the license-removal notices with their delivery state, and the audit log.
import { get, post } from "./api.js";
import { el, action, table, timeEl, errorBox, canAct, announce } from "./ui.js";

export const title = "Notices and audit";

export async function render(root) {
  const notices = el("section", { "aria-labelledby": "notices-h" });
  const audit = el("section", { "aria-labelledby": "audit-h" });
  root.append(el("h1", {}, "Notices and audit"), notices, audit);
  await Promise.all([noticePage(notices, 0), auditPage(audit, 0)]);
}

async function noticePage(host, page) {
  let r;
  try {
    r = await get("/api/notices" + (page ? "?page=" + page : ""));
  } catch (e) {
    host.replaceChildren(el("h2", { id: "notices-h" }, "License removal notices"), errorBox(e));
    return;
  }
  const rows = r.notices.map((n) => el("tr", {},
    el("td", {}, timeEl(n.at)),
    el("td", {}, n.serialNumber ? "Device " + n.serialNumber : "User " + n.clientUserId),
    el("td", {}, n.adamId + (n.pricingParam && n.pricingParam !== "STDQ" ? " (" + n.pricingParam + ")" : "")),
    el("td", {}, n.reason || ""),
    el("td", {}, n.deliveredAt ? el("span", { class: "text-ok" }, "delivered ", timeEl(n.deliveredAt)) : el("span", { class: "text-warning" }, "waiting"))));
  const deliver = action("Deliver now", async () => {
    try {
      const rep = await post("/api/notices/deliver");
      announce("Delivery: " + JSON.stringify(rep));
    } catch (e) {
      host.append(errorBox(e));
      return;
    }
    noticePage(host, page);
  }, { id: "deliver-notices" });
  host.replaceChildren(
    el("h2", { id: "notices-h" }, "License removal notices"),
    el("p", { class: "hint" }, "When License removal notification is on, each license taken from a device or user becomes a notice, delivered to the configured webhook so the MDM can tell the person. " +
      (r.undelivered ? r.undelivered + " waiting for delivery." : "None waiting.") + (r.lastDeliveryError ? " Last delivery error: " + r.lastDeliveryError : "")),
    el("div", { class: "toolbar" }, deliver),
    table(["When", "Device or user", "Asset", "Why", "Delivery"], rows, "No notices.", "Notices"),
    pager(r, page, (p) => noticePage(host, p)));
}

async function auditPage(host, page) {
  const head = el("h2", { id: "audit-h" }, "Audit log");
  if (!canAct()) {
    host.replaceChildren(head, el("p", { class: "hint" }, "The audit log needs the admin key."));
    return;
  }
  let r;
  try {
    r = await get("/api/audit" + (page ? "?page=" + page : ""));
  } catch (e) {
    host.replaceChildren(head, errorBox(e));
    return;
  }
  const rows = r.records.map((a) => el("tr", {},
    el("td", {}, timeEl(a.at)), el("td", {}, a.actor), el("td", {}, a.action), el("td", {}, a.target || ""),
    el("td", { class: a.status >= 400 ? "text-error" : "text-ok" }, String(a.status) + (a.error ? " " + a.error : ""))));
  host.replaceChildren(head, el("p", { class: "hint" }, "Every change, who made it (key role and fingerprint) and how it ended; newest first."),
    table(["When", "Who", "What", "About", "Result"], rows, "No changes recorded yet.", "Audit log"),
    pager(r, page, (p) => auditPage(host, p)));
}

function pager(r, page, go) {
  const next = r.nextPage;
  return el("div", { class: "pager" },
    el("button", { type: "button", disabled: page === 0, onclick: () => go(0) }, "Newest"),
    el("button", { type: "button", disabled: next === undefined || next === null, onclick: () => go(next) }, "Older"));
}
