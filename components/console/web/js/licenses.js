// App licenses: every app and book with its counts, search, account filter, Sync, CSV export,
// and the drill-down into one asset's assignments.
import { get, post, apiText, enc } from "./api.js";
import { el, action, table, timeEl, errorBox, followJob, announce } from "./ui.js";

export const title = "App licenses";

let filters = { search: "", accountId: "", low: false };

export async function render(root, args) {
  if (args.length >= 2) return renderAsset(root, args[0], args[1], args[2] || "");
  const accounts = await get("/api/accounts").then((r) => r.accounts).catch(() => []);
  const jobs = el("div", { class: "jobs", role: "region", "aria-label": "Synchronization" });
  const host = el("div", {});
  const search = el("input", { type: "search", id: "license-search", placeholder: "Name or Adam ID", value: filters.search });
  const account = el("select", { id: "license-account" }, el("option", { value: "" }, "All accounts"),
    accounts.map((a) => el("option", { value: a.id, selected: a.id === filters.accountId }, a.name)));
  const low = el("input", { type: "checkbox", id: "license-low" });
  low.checked = filters.low;
  const summary = el("p", { class: "hint", id: "license-summary", role: "status" });
  let timer = null;
  const reload = () => load(host, summary);
  search.addEventListener("input", () => { filters.search = search.value; clearTimeout(timer); timer = setTimeout(reload, 250); });
  account.addEventListener("change", () => { filters.accountId = account.value; reload(); });
  low.addEventListener("change", () => { filters.low = low.checked; reload(); });
  const sync = action("Sync", async () => {
    const targets = filters.accountId ? accounts.filter((a) => a.id === filters.accountId) : accounts;
    for (const a of targets) {
      try {
        const job = await post("/api/accounts/" + enc(a.id) + "/refresh?full=false");
        followJob(jobs, job, a.name, reload);
      } catch (e) {
        jobs.prepend(el("div", { class: "job" }, errorBox(e)));
      }
    }
  }, { id: "license-sync", title: "Read the changes since the last synchronization from Apple", reason: accounts.length ? undefined : "No account to synchronize" });
  const csv = el("button", { type: "button", id: "license-csv" }, "Download CSV");
  csv.addEventListener("click", () => downloadCsv(csv));
  root.append(
    el("h1", {}, "App licenses"),
    el("p", { class: "hint" }, "Licenses of every app and book the organization bought, per account: how many there are, how many are free, and how many are in use."),
    el("div", { class: "toolbar", role: "search" },
      el("label", { for: "license-search" }, "Search"), search,
      el("label", { for: "license-account" }, "Account"), account,
      el("label", { class: "inline", for: "license-low" }, low, "Low on licenses only"),
      el("span", { class: "spacer" }), sync, csv),
    jobs, summary, host);
  await reload();
}

function query(extra) {
  const q = new URLSearchParams();
  if (filters.accountId) q.set("accountId", filters.accountId);
  if (filters.search) q.set("search", filters.search);
  if (filters.low) q.set("low", "true");
  for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
  const s = q.toString();
  return "/api/licenses" + (s ? "?" + s : "");
}

function icon(row) {
  const letter = (row.name || row.adamId || "?").trim().charAt(0).toUpperCase();
  if (row.iconUrl && row.iconUrl.startsWith("https://")) {
    const img = el("img", { class: "asset-icon", src: row.iconUrl, alt: "", width: "32", height: "32", loading: "lazy", referrerpolicy: "no-referrer" });
    img.addEventListener("error", () => img.replaceWith(el("span", { class: "asset-icon", "aria-hidden": "true" }, letter)));
    return img;
  }
  return el("span", { class: "asset-icon", "aria-hidden": "true" }, letter);
}

async function load(host, summary) {
  let rows = [];
  try {
    rows = await allRows(query, {});
  } catch (e) {
    host.replaceChildren(errorBox(e));
    return;
  }
  const lowCount = rows.filter((r) => r.lowLicenses).length;
  summary.textContent = rows.length + (rows.length === 1 ? " asset" : " assets") + (lowCount ? ", " + lowCount + " low on licenses" : "");
  const trs = rows.map((r) => {
    const href = "#/licenses/" + enc(r.accountId) + "/" + enc(r.adamId) + "/" + enc(r.pricingParam);
    return el("tr", { "data-adam": r.adamId },
      el("td", {}, icon(r)),
      el("td", { class: "wrap" }, el("a", { href }, r.name || r.adamId), el("div", { class: "hint" }, r.adamId + (r.pricingParam !== "STDQ" ? " · " + r.pricingParam : ""))),
      el("td", {}, r.productType === "Book" ? "Book" : "App"),
      el("td", {}, r.accountName),
      el("td", { class: "num", "data-col": "total" }, r.unlimited ? "Unlimited" : String(r.total)),
      el("td", { class: "num", "data-col": "available" }, r.unlimited ? "Unlimited" : String(r.available)),
      el("td", { class: "num", "data-col": "inUse" }, String(r.inUse) + (r.pending ? " (+" + r.pending + " pending)" : "")),
      el("td", {}, r.lowLicenses ? el("span", { class: "badge low", title: "Few or no licenses left to assign" }, "⚠ Low") : ""));
  });
  host.replaceChildren(table(["", "Name", "Type", "Account", { label: "Total", num: true }, { label: "Available", num: true }, { label: "In use", num: true }, "Licenses"],
    trs, "No licenses match. Add an account, or change the search.", "App licenses"));
}

// Every row of a filtered list: the API pages it (a default page is 50 rows), so this follows
// nextCursor, asking for the largest page (1,000 rows) to keep the requests few.
export async function allRows(path, extra) {
  let page = await get(path({ ...extra, limit: "1000" }));
  let rows = page.licenses;
  while (page.nextCursor) {
    page = await get(path({ ...extra, limit: "1000", cursor: page.nextCursor }));
    rows = rows.concat(page.licenses);
  }
  return rows;
}

async function downloadCsv(btn) {
  btn.disabled = true;
  try {
    const { text, disposition } = await apiText(query({ format: "csv" }), "text/csv");
    const m = /filename="?([^";]+)"?/.exec(disposition);
    const name = m ? m[1] : "licenses.csv";
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const a = el("a", { href: url, download: name, class: "visually-hidden" }, name);
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    announce("Downloaded " + name);
  } catch (e) {
    btn.after(errorBox(e));
  } finally {
    btn.disabled = false;
  }
}

// ---- one asset's assignments --------------------------------------------------------------------

async function renderAsset(root, accountId, adamId, pricing) {
  const back = el("a", { href: "#/licenses" }, "← All app licenses");
  const head = el("div", {});
  const host = el("div", {});
  root.append(back, head, host);
  let row = null;
  try {
    const licenses = await allRows((q) => "/api/licenses?" + new URLSearchParams({ accountId, search: adamId, ...q }).toString(), {});
    row = licenses.find((l) => l.adamId === adamId && (!pricing || l.pricingParam === pricing)) || null;
  } catch (e) {
    head.append(errorBox(e));
  }
  head.append(el("h1", {}, row && row.name ? row.name : "Asset " + adamId),
    row ? el("p", { class: "hint" }, row.accountName + " · Adam ID " + adamId + " · " + row.pricingParam + " · total " + (row.unlimited ? "unlimited" : row.total) + ", available " + (row.unlimited ? "unlimited" : row.available) + ", in use " + row.inUse +
      (row.pending ? " · " + row.pending + " assignment(s) sent to Apple and not confirmed yet" : "") + " · synchronized " + (row.syncedAt ? new Date(row.syncedAt).toLocaleString() : "never")) : "");
  await assignmentsPage(host, accountId, adamId, pricing, 0);
}

async function assignmentsPage(host, accountId, adamId, pricing, page) {
  let r;
  try {
    r = await get("/api/licenses/" + enc(accountId) + "/" + enc(adamId) + "/assignments?page=" + page + (pricing ? "&pricingParam=" + enc(pricing) : ""));
  } catch (e) {
    host.replaceChildren(errorBox(e));
    return;
  }
  const rows = r.assignments.map((a) => el("tr", { "data-subject": a.serialNumber || a.clientUserId },
    el("td", {}, a.serialNumber ? "Device" : "User"),
    el("td", {}, a.serialNumber || a.clientUserId),
    el("td", {}, a.madeBy === "thisInstance" ? "This app" : "Another MDM or Apple Business Manager"),
    el("td", {}, a.state || "Assigned"),
    el("td", {}, a.at ? timeEl(a.at) : "—"),
    el("td", {}, a.eventId || "—")));
  const pages = Math.max(r.pages || 1, 1);
  const prev = el("button", { type: "button", disabled: page === 0, onclick: () => assignmentsPage(host, accountId, adamId, pricing, page - 1) }, "Previous page");
  const next = el("button", { type: "button", disabled: r.nextPage === null || r.nextPage === undefined, onclick: () => assignmentsPage(host, accountId, adamId, pricing, r.nextPage) }, "Next page");
  host.replaceChildren(
    el("h2", {}, "Assignments"),
    el("p", { class: "hint" }, "As Apple last reported them at synchronization; who made each: this app, or someone else (another MDM, or Apple Business Manager directly)."),
    table(["Kind", "Device serial or user", "Made by", "State", "Assigned at", "Apple event"], rows, "No device or user holds this asset.", "Assignments"),
    el("div", { class: "pager" }, prev, el("span", { role: "status" }, "Page " + (page + 1) + " of " + pages), next));
}
