// App licenses: the apps and books with their counts, a page at a time (Next and Previous),
// search, account filter, Sync, CSV export (every row), and the drill-down into one asset's
// assignments.
import { get, post, apiText, enc } from "./api.js";
import { el, action, table, timeEl, errorBox, followJob, announce } from "./ui.js";

export const title = "App licenses";

/** Rows the list shows at once (the API's default page). */
export const PAGE_SIZE = 50;
/** Requests one page may make to fill itself when a search leaves the API's pages short. */
const FILL_REQUESTS = 8;
/**
 * Requests the asset page makes at most to find its row, and the rows each may return (a
 * request of the API reads a bounded part of the account for a search: with these, the row of
 * an account of 10,000 assets is found within the cap).
 */

let filters = { search: "", accountId: "", low: false };
// Where the list is: the cursor that starts each page seen so far (the API's cursor only goes
// forward, so Previous goes back along this stack) and the row number each page starts after.
const firstPage = () => ({ cursors: [null], starts: [0], index: 0, next: null, count: 0 });
let paging = firstPage();

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
  const range = el("span", { class: "hint", id: "license-range" });
  const prev = el("button", { type: "button", id: "license-prev", disabled: true }, "Previous page");
  const next = el("button", { type: "button", id: "license-next", disabled: true }, "Next page");
  const pager = el("nav", { class: "pager", "aria-label": "Pages of app licenses" }, prev, range, next);
  const view = { host, summary, range, prev, next, pager };
  let timer = null;
  // A new search or filter starts again at the first page.
  const reload = () => { paging = firstPage(); return load(view); };
  // After Previous or Next: the new page from its top, the focus kept on a button that works.
  const turned = async () => {
    const had = document.activeElement;
    await load(view);
    if (had === next && next.disabled && !prev.disabled) prev.focus();
    if (had === prev && prev.disabled && !next.disabled) next.focus();
    if (summary.getBoundingClientRect().top < 0) summary.scrollIntoView({ block: "start" });
  };
  prev.addEventListener("click", () => {
    if (view.loading || paging.index === 0) return;
    paging.index -= 1;
    turned();
  });
  next.addEventListener("click", () => {
    if (view.loading || !paging.next) return;
    const i = paging.index;
    paging.cursors.length = i + 1;
    paging.starts.length = i + 1;
    paging.cursors.push(paging.next);
    paging.starts.push(paging.starts[i] + paging.count);
    paging.index = i + 1;
    turned();
  });
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
  const csv = el("button", { type: "button", id: "license-csv", title: "Every row that matches the search and filters, in one file" }, "Download CSV");
  csv.addEventListener("click", () => downloadCsv(csv));
  root.append(
    el("h1", {}, "App licenses"),
    el("p", { class: "hint" }, "Licenses of every app and book the organization bought, per account: how many there are, how many are free, and how many are in use. The list shows " + PAGE_SIZE + " at a time; Download CSV gives every row that matches."),
    el("div", { class: "toolbar", role: "search" },
      el("label", { for: "license-search" }, "Search"), search,
      el("label", { for: "license-account" }, "Account"), account,
      el("label", { class: "inline", for: "license-low" }, low, "Low on licenses only"),
      el("span", { class: "spacer" }), sync, csv),
    jobs, summary, host, pager);
  await load(view);
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

// The page `paging.index` of the list; a later call (another page, a new search) wins over an
// earlier one still waiting for its answer.
let loads = 0;
async function load(view) {
  const { host, summary, range, prev, next, pager } = view;
  const mine = ++loads;
  // While a page loads its buttons do nothing (they stay enabled, so the focus stays on them).
  view.loading = true;
  host.setAttribute("aria-busy", "true");
  let page;
  try {
    page = await licensePage(query, paging.cursors[paging.index], PAGE_SIZE);
  } catch (e) {
    if (mine !== loads) return;
    view.loading = false;
    host.removeAttribute("aria-busy");
    // A cursor into an account no longer listed (deleted meanwhile): start again.
    if (e.status === 409 && paging.index > 0) { paging = firstPage(); return load(view); }
    host.replaceChildren(errorBox(e));
    summary.textContent = "";
    range.textContent = "";
    paging.next = null;
    paging.count = 0;
    next.disabled = true;
    prev.disabled = paging.index === 0;
    pager.hidden = paging.index === 0;
    return;
  }
  if (mine !== loads) return;
  view.loading = false;
  host.removeAttribute("aria-busy");
  const rows = page.rows;
  paging.next = page.next;
  paging.count = rows.length;
  const first = paging.starts[paging.index];
  const lowCount = rows.filter((r) => r.lowLicenses).length;
  // Which rows these are, and whether more follow: the API gives no total, but once nothing
  // follows the rows seen so far are all of them.
  const last = first + rows.length;
  const shown = rows.length === 1 ? "Row " + last : "Rows " + (first + 1) + "–" + last;
  let text;
  if (!rows.length) {
    text = paging.index > 0 ? "No more rows after row " + first + "."
      : page.next ? "No match yet: the search goes on, Next page looks further." : "No asset matches.";
  } else if (!page.next) {
    text = shown + " of " + last;
  } else if (rows.length < PAGE_SIZE) {
    text = shown + "; the search goes on: Next page looks further";
  } else {
    text = shown + ", more follow";
  }
  if (lowCount) text += " · " + lowCount + " low on licenses" + (paging.index === 0 && !page.next ? "" : " on this page");
  summary.textContent = text;
  range.textContent = rows.length ? (page.next ? shown : shown + " of " + last) : "";
  pager.hidden = paging.index === 0 && !page.next;
  prev.disabled = paging.index === 0;
  next.disabled = !page.next;
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
    trs, paging.index > 0 ? "No more rows." : "No licenses match. Add an account, or change the search.", "App licenses"));
}

/**
 * One page of a filtered list: up to `size` rows from `cursor` (null: the beginning), and the
 * cursor of what follows (null: nothing). The API may answer a search with fewer rows and a
 * cursor (it reads a bounded part of the store per request), so this asks again, at most
 * FILL_REQUESTS times, until the page is full. After a full page the API gives a cursor even
 * when nothing follows, so one more request for a single row tells whether a next page exists.
 * `path(params)` builds the request from the limit and cursor.
 */
export async function licensePage(path, cursor, size) {
  let rows = [];
  let next = cursor || null;
  let asked = 0;
  do {
    const params = { limit: String(size - rows.length) };
    if (next) params.cursor = next;
    const page = await get(path(params));
    rows = rows.concat(page.licenses);
    next = page.nextCursor || null;
    asked += 1;
  } while (next && rows.length < size && asked < FILL_REQUESTS);
  if (next && rows.length >= size) {
    const peek = await get(path({ limit: "1", cursor: next }));
    if (!peek.licenses.length && !peek.nextCursor) next = null;
  }
  return { rows, next };
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
  // The first page of assignments carries the asset's row of the list (its counts): one request.
  const first = await assignmentsPage(host, accountId, adamId, pricing, 0);
  const row = first && first.license ? first.license : null;
  head.append(el("h1", {}, row && row.name ? row.name : "Asset " + adamId),
    row ? el("p", { class: "hint" }, row.accountName + " · Adam ID " + adamId + " · " + row.pricingParam + " · total " + (row.unlimited ? "unlimited" : row.total) + ", available " + (row.unlimited ? "unlimited" : row.available) + ", in use " + row.inUse +
      (row.pending ? " · " + row.pending + " assignment(s) sent to Apple and not confirmed yet" : "") + " · synchronized " + (row.syncedAt ? new Date(row.syncedAt).toLocaleString() : "never"))
      : el("p", { class: "hint" }, "Adam ID " + adamId + (pricing ? " · " + pricing : "") + " · its counts could not be read (see below)."));
}

async function assignmentsPage(host, accountId, adamId, pricing, page) {
  let r;
  try {
    r = await get("/api/licenses/" + enc(accountId) + "/" + enc(adamId) + "/assignments?page=" + page + (pricing ? "&pricingParam=" + enc(pricing) : ""));
  } catch (e) {
    host.replaceChildren(errorBox(e));
    return null;
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
  return r;
}
