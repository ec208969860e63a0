// App Store license accounts: one row per server token, the row actions, adding and editing
// accounts, the license-removal notification setting and Reconcile.
import { get, post, put, patch, del, enc, ApiFailure } from "./api.js";
import {
  el, action, rowMenu, statusIcon, timeEl, daysUntil, table, modal, confirmDialog, infoDialog,
  unsavedDialog, followJob, showRunningJobs, errorBox, announce, lockForReader, canAct,
} from "./ui.js";

export const title = "Accounts";
export const unsavedWhat = "the license removal notification setting";

let state = null; // {root, accounts, settings, saved, toggle, bar, jobs, tableHost}

export function unsaved() {
  return !!(state && state.settings && state.toggle && state.toggle.checked !== state.saved);
}
export async function saveUnsaved() {
  return saveSetting();
}

export async function render(root) {
  const jobs = el("div", { class: "jobs", "aria-label": "Running and finished work", role: "region" });
  const tableHost = el("div", {});
  const settingsHost = el("div", { class: "toolbar" });
  const bar = el("div", { class: "unsaved", role: "region", "aria-label": "Unsaved changes", hidden: true });
  state = { root, accounts: [], settings: null, saved: false, toggle: null, bar, jobs, tableHost };
  root.append(
    el("h1", {}, "App Store license accounts"),
    el("p", { class: "hint" }, "Each account holds one Apps and Books server token from Apple Business Manager or Apple School Manager. The app synchronizes every account and revokes unused licenses once a day by itself."),
    el("div", { class: "toolbar" },
      action("+ Add account", () => addDialog(), { class: "primary", id: "add-account", "aria-label": "Add account" }),
      el("span", { class: "spacer" }),
      settingsHost,
      action("Reconcile licenses", () => reconcile(), { id: "reconcile" })),
    bar, jobs, tableHost);
  await Promise.all([loadSettings(settingsHost), loadAccounts()]);
  showRunningJobs(jobs, (j) => true, (j) => labelOf(j.accountId), () => loadAccounts());
}

function labelOf(accountId) {
  const a = state && state.accounts.find((x) => x.id === accountId);
  return a ? a.name : accountId || "all accounts";
}

// ---- the license removal notification toggle (Save or Cancel) ------------------------------

async function loadSettings(host) {
  try {
    state.settings = await get("/api/settings");
  } catch (e) {
    host.replaceChildren(errorBox(e));
    return;
  }
  state.saved = !!state.settings.licenseRemovalNotification;
  const toggle = el("input", { type: "checkbox", role: "switch", id: "removal-notification", "data-action": "" });
  toggle.checked = state.saved;
  toggle.addEventListener("change", showBar);
  state.toggle = toggle;
  host.replaceChildren(el("label", { class: "switch", for: "removal-notification", title: "When on, every license taken from a device or user produces a notice for the MDM to tell the person" }, toggle, "License removal notification"));
  lockForReader(host);
}

function showBar() {
  const bar = state.bar;
  if (!unsaved()) { bar.hidden = true; bar.replaceChildren(); return; }
  bar.replaceChildren(
    el("span", {}, "License removal notification will be turned " + (state.toggle.checked ? "on" : "off") + ": not saved yet."),
    el("button", { type: "button", class: "primary", id: "save-settings", onclick: () => saveSetting() }, "Save"),
    el("button", { type: "button", id: "cancel-settings", onclick: () => { state.toggle.checked = state.saved; showBar(); announce("Change cancelled"); } }, "Cancel"));
  bar.hidden = false;
}

async function saveSetting() {
  try {
    state.settings = await put("/api/settings", { licenseRemovalNotification: state.toggle.checked });
    state.saved = !!state.settings.licenseRemovalNotification;
    state.toggle.checked = state.saved;
    showBar();
    announce("License removal notification saved: " + (state.saved ? "on" : "off"));
    return true;
  } catch (e) {
    state.bar.append(errorBox(e));
    return false;
  }
}

// ---- the accounts table ---------------------------------------------------------------------

async function loadAccounts() {
  if (!state) return;
  try {
    const { accounts } = await get("/api/accounts");
    state.accounts = accounts;
    state.tableHost.replaceChildren(accountsTable(accounts));
  } catch (e) {
    state.tableHost.replaceChildren(errorBox(e));
  }
}

function accountsTable(accounts) {
  const rows = accounts.map((a) => {
    const inUse = (a.policies || []).length > 0;
    const reason = inUse ? "Cannot delete: used by app " + (a.policies.length === 1 ? "policy " : "policies ") + a.policies.join(", ") : undefined;
    const soon = daysUntil(a.expiryDate);
    const menu = rowMenu("Actions for " + a.name, [
      { label: "Test", run: () => test(a) },
      { label: "Edit", run: () => editDialog(a) },
      { label: "Clean up", run: () => cleanup(a) },
      { label: "Refresh", run: () => refresh(a) },
      { label: "Reclaim ownership", run: () => reclaim(a) },
      { label: "Delete", run: () => remove(a), reason },
    ]);
    const delBtn = action("Delete", () => remove(a), { class: "icon danger", "aria-label": "Delete " + a.name + (reason ? " (" + reason + ")" : ""), title: reason || "Delete " + a.name, reason });
    return el("tr", { "data-account": a.id },
      el("td", {}, menu),
      el("td", {}, statusIcon(a.status)),
      el("td", {}, el("button", { type: "button", class: "link account-name", onclick: () => editDialog(a), title: "Edit " + a.name }, a.name)),
      el("td", {}, a.organization || ""),
      el("td", {}, a.location || "—"),
      el("td", { class: "last-sync" }, timeEl(a.lastSynchronized)),
      el("td", { class: soon < 0 ? "text-error" : soon <= 30 ? "text-warning" : undefined }, timeEl(a.expiryDate, false)),
      el("td", {}, delBtn));
  });
  return table([{ label: el("span", { class: "visually-hidden" }, "Actions") }, "Status", "Account name", "Organization", "Location", "Last synchronized", "Expiry date", { label: el("span", { class: "visually-hidden" }, "Delete") }],
    rows, "No accounts yet. Add one with a server token file (.vpptoken) from Apple Business Manager or Apple School Manager.", "Accounts");
}

// ---- row actions ------------------------------------------------------------------------------

async function test(a) {
  const list = el("ul", { class: "checks" }, el("li", {}, "Testing the token and the round trip to Apple…"));
  infoDialog("Test of " + a.name, list);
  try {
    const r = await post("/api/accounts/" + enc(a.id) + "/test");
    list.replaceChildren(...r.checks.map((c) => el("li", { "data-check": c.name, class: c.ok ? "text-ok" : "text-error" },
      (c.ok ? "✓ " : "✗ ") + c.name + ": " + c.message)));
    list.before(el("p", { role: "status", class: r.ok ? "text-ok" : "text-error" }, r.ok ? "Every check passed." : "Some checks failed."));
  } catch (e) {
    list.replaceChildren(el("li", {}, errorBox(e)));
  }
  loadAccounts();
}

async function runJob(path, a) {
  try {
    const job = await post(path);
    followJob(state.jobs, job, a ? a.name : "all accounts", () => loadAccounts());
    loadAccounts();
  } catch (e) {
    state.jobs.prepend(el("div", { class: "job" }, errorBox(e)));
  }
}

async function refresh(a) {
  const ok = await confirmDialog("Refresh " + a.name + "?", [
    "A refresh reads every asset and assignment of this account from Apple again. It is slow and spends Apple's request allowance on large accounts, so use it sparingly.",
    "The app already refreshes every account by itself every day. Last synchronized: " + (a.lastSynchronized ? new Date(a.lastSynchronized).toLocaleString() : "never") + ".",
  ], "Refresh now");
  if (ok) runJob("/api/accounts/" + enc(a.id) + "/refresh", a);
}

async function cleanup(a) {
  const ok = await confirmDialog("Clean up " + a.name + "?", [
    "Clean up revokes every license of this account that this app did not assign, typically what another MDM left behind before the token came here. Those devices and users lose the apps and books, and the licenses become free to assign from here.",
    "Licenses this app assigned are not touched (Reconcile handles those). This cannot be undone.",
  ], "Clean up", true);
  if (ok) runJob("/api/accounts/" + enc(a.id) + "/cleanup", a);
}

async function reconcile() {
  const ok = await confirmDialog("Reconcile licenses now?", [
    "Reconcile revokes, across every account, each license this app assigned that no app policy wants any more. It is slow on large organizations and runs by itself once a day.",
    "Licenses another MDM assigned are left alone (use Clean up for those).",
  ], "Reconcile now");
  if (ok) runJob("/api/reconcile", null);
}

async function reclaim(a) {
  const owner = a.owner && a.owner.kind === "foreign" ? "It is now claimed by \"" + a.owner.name + "\"; that MDM will stop managing these licenses." : "";
  const ok = await confirmDialog("Reclaim ownership of " + a.name + "?", [
    "This app writes itself to Apple as the manager of this token's location again. " + owner,
  ], "Reclaim");
  if (!ok) return;
  try {
    await post("/api/accounts/" + enc(a.id) + "/reclaim");
    announce("Ownership reclaimed for " + a.name);
    state.jobs.prepend(el("div", { class: "job" }, el("p", { role: "status", class: "text-ok" }, "This app owns " + a.name + " again.")));
  } catch (e) {
    state.jobs.prepend(el("div", { class: "job" }, errorBox(e)));
  }
  loadAccounts();
}

async function remove(a) {
  const ok = await confirmDialog("Delete " + a.name + "?", [
    "The account, its sealed token and this app's copy of its assets and assignments are removed. Licenses already assigned stay with their devices and users at Apple.",
  ], "Delete", true);
  if (!ok) return;
  try {
    await del("/api/accounts/" + enc(a.id));
    announce(a.name + " deleted");
  } catch (e) {
    state.jobs.prepend(el("div", { class: "job" }, errorBox(e)));
  }
  loadAccounts();
}

// ---- the account dialog (add and edit) ---------------------------------------------------------

/** Which field an API error is about: the one it names, else the token for token problems. */
function fieldOf(err) {
  if (err.field) return err.field;
  if (/token|apple_rejected|duplicate_location|location_mismatch|owned/.test(err.code || "")) return "token";
  return null;
}

function tokenPicker(required) {
  const fileInput = el("input", { type: "file", id: "account-token", accept: ".vpptoken,text/plain", "aria-describedby": "account-token-hint account-token-error" });
  const chosen = el("span", { id: "account-token-chosen" }, required ? "No file chosen." : "Keep the current token.");
  const drop = el("div", { class: "drop", id: "token-drop" },
    el("p", { id: "account-token-hint" }, "Drop the .vpptoken file here, or choose it: ", fileInput), chosen);
  const picked = { text: null, name: null };
  const read = (file) => {
    if (!file) return;
    const r = new FileReader();
    r.onload = () => { picked.text = String(r.result).trim(); picked.name = file.name; chosen.textContent = "Chosen: " + file.name; drop.dispatchEvent(new Event("picked")); };
    r.onerror = () => { chosen.textContent = "Could not read " + file.name; };
    r.readAsText(file);
  };
  fileInput.addEventListener("change", () => read(fileInput.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    read(e.dataTransfer.files[0]);
  });
  const field = el("div", { class: "field" }, el("label", { for: "account-token" }, required ? "Server token file" : "Replace the token (a renewed one of the same location)"), drop,
    el("p", { class: "field-error", id: "account-token-error", "aria-live": "polite" }));
  return { field, picked };
}

function accountForm(d, close, h, { account, submitLabel, submit }) {
  const name = el("input", { type: "text", id: "account-name", required: true, maxlength: "100", autocomplete: "off", "aria-describedby": "account-name-error" });
  name.value = account ? account.name : "";
  const token = tokenPicker(!account);
  const general = el("div", { id: "account-form-error", "aria-live": "polite" });
  const submitBtn = el("button", { type: "submit", class: "primary" }, submitLabel);
  const form = el("form", { novalidate: true }, h,
    el("div", { class: "field" }, el("label", { for: "account-name" }, "Account name"), name,
      el("p", { class: "field-error", id: "account-name-error", "aria-live": "polite" })),
    token.field, general,
    el("div", { class: "dialog-actions" },
      el("button", { type: "button", id: "account-cancel", onclick: () => tryClose() }, "Cancel"), submitBtn));
  d.append(form);
  const changed = () => (account ? name.value.trim() !== account.name || token.picked.text !== null : false);
  async function tryClose() {
    if (!changed()) return close(false);
    const choice = await unsavedDialog("this account");
    if (choice === "discard") close(false);
    else if (choice === "save") form.requestSubmit();
  }
  d.beforeClose = async () => { await tryClose(); return false; };
  const clearErrors = () => {
    for (const id of ["account-name-error", "account-token-error"]) d.querySelector("#" + id).textContent = "";
    general.replaceChildren();
  };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    if (!account && !name.value.trim()) { d.querySelector("#account-name-error").textContent = "Give the account a name."; name.focus(); return; }
    if (!account && !token.picked.text) { d.querySelector("#account-token-error").textContent = "Choose or drop the server token file (.vpptoken)."; return; }
    submitBtn.disabled = true;
    submitBtn.textContent = "Checking with Apple…";
    try {
      const result = await submit(name.value.trim(), token.picked.text);
      close(result);
    } catch (err) {
      if (!(err instanceof ApiFailure)) throw err;
      const field = fieldOf(err);
      const target = field === "name" ? "account-name-error" : field === "token" ? "account-token-error" : null;
      if (target) d.querySelector("#" + target).textContent = err.message;
      else general.replaceChildren(errorBox(err));
      (field === "name" ? name : d.querySelector("#account-token")).focus();
    } finally {
      submitBtn.disabled = false;
      submitBtn.textContent = submitLabel;
    }
  });
  name.focus();
}

async function addDialog() {
  const added = await modal("Add an account", (d, close, h) => accountForm(d, close, h, {
    account: null, submitLabel: "Add",
    submit: (name, token) => post("/api/accounts", { name, token }),
  }));
  if (!added) return;
  announce("Account " + added.name + " added");
  await loadAccounts();
  showRunningJobs(state.jobs, (j) => j.accountId === added.id, () => added.name, () => loadAccounts());
}

async function editDialog(a) {
  if (!canAct()) {
    return infoDialog(a.name, el("p", {}, "This key can only read: editing needs the admin key."));
  }
  const changed = await modal("Edit " + a.name, (d, close, h) => accountForm(d, close, h, {
    account: a, submitLabel: "Save",
    submit: (name, token) => {
      const body = {};
      if (name !== a.name) body.name = name;
      if (token) body.token = token;
      return Object.keys(body).length ? patch("/api/accounts/" + enc(a.id), body) : Promise.resolve(a);
    },
  }));
  if (changed) { announce("Account saved"); loadAccounts(); }
}
