// App policies: the desired state (which devices and users should hold which assets of one
// account). Create, edit by pasting lists, delete; the shortfall the API reports after a save.
import { get, put, del, enc, ApiFailure } from "./api.js";
import { el, action, table, modal, confirmDialog, errorBox, announce, parseList, unsavedDialog } from "./ui.js";
import { licensePage, PAGE_SIZE } from "./licenses.js";

export const title = "App policies";

let host = null, resultHost = null;

export async function render(root) {
  host = el("div", {});
  resultHost = el("div", { role: "region", "aria-label": "Result of the last save" });
  root.append(el("h1", {}, "App policies"),
    el("p", { class: "hint" }, "A policy says which devices and users should hold which apps and books of one account. Saving one assigns what is missing as far as licenses allow; a device or user taken out of every policy keeps its license until Reconcile takes it back."),
    el("div", { class: "toolbar" }, action("+ New policy", () => edit(null), { class: "primary", id: "new-policy" })),
    resultHost, host);
  await load();
}

async function load() {
  let policies, accounts;
  try {
    [policies, accounts] = await Promise.all([get("/api/policies").then((r) => r.policies), get("/api/accounts").then((r) => r.accounts)]);
  } catch (e) {
    host.replaceChildren(errorBox(e));
    return;
  }
  const nameOf = (id) => (accounts.find((a) => a.id === id) || { name: id }).name;
  const rows = policies.map((p) => el("tr", { "data-policy": p.id },
    el("td", {}, el("button", { type: "button", class: "link", onclick: () => edit(p) }, p.name)),
    el("td", {}, p.id),
    el("td", {}, nameOf(p.accountId)),
    el("td", { class: "num" }, String(p.assets.length)),
    el("td", { class: "num" }, String((p.serialNumbers || []).length)),
    el("td", { class: "num" }, String((p.clientUserIds || []).length)),
    el("td", {}, new Date(p.updatedAt).toLocaleString()),
    el("td", {}, action("Edit", () => edit(p), { "aria-label": "Edit " + p.name }), " ",
      action("Delete", () => remove(p), { class: "danger", "aria-label": "Delete " + p.name }))));
  host.replaceChildren(table(["Name", "ID", "Account", { label: "Assets", num: true }, { label: "Devices", num: true }, { label: "Users", num: true }, "Changed", "Actions"], rows, "No app policies yet.", "App policies"));
  host.accounts = accounts;
}

function slug(s) {
  return s.toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 64);
}

async function edit(p) {
  let accounts = host.accounts;
  if (!accounts) {
    try {
      accounts = (await get("/api/accounts")).accounts;
    } catch (e) {
      resultHost.replaceChildren(errorBox(e));
      return;
    }
  }
  const out = await modal(p ? "Edit policy " + p.name : "New app policy", (d, close, h) => {
    const name = el("input", { type: "text", id: "policy-name", required: true, autocomplete: "off", "aria-describedby": "policy-name-error" });
    const id = el("input", { type: "text", id: "policy-id", required: true, autocomplete: "off", pattern: "[A-Za-z0-9._-]{1,64}", "aria-describedby": "policy-id-hint policy-id-error" });
    const account = el("select", { id: "policy-account", "aria-describedby": "policy-accountId-error" }, accounts.map((a) => el("option", { value: a.id }, a.name)));
    // The asset picker: the chosen assets (always shown, whatever the search), then the account's
    // assets a page at a time, narrowed by a search the API runs.
    const chosenList = el("div", { class: "asset-list chosen", id: "policy-chosen", role: "group", "aria-label": "Chosen assets" });
    const assetSearch = el("input", { type: "search", id: "policy-asset-search", placeholder: "Name or Adam ID", autocomplete: "off", "aria-controls": "policy-assets" });
    const assetList = el("div", { class: "asset-list", id: "policy-assets", role: "group", "aria-label": "Assets of the account" });
    const more = el("button", { type: "button", id: "policy-assets-more", hidden: true }, "More assets");
    const assetStatus = el("span", { class: "hint", id: "policy-assets-status", role: "status" });
    const devices = el("textarea", { id: "policy-devices", "aria-describedby": "policy-devices-hint policy-serialNumbers-error", spellcheck: "false" });
    const users = el("textarea", { id: "policy-users", "aria-describedby": "policy-users-hint policy-clientUserIds-error", spellcheck: "false" });
    const general = el("div", { "aria-live": "polite" });
    if (p) {
      name.value = p.name; id.value = p.id; id.readOnly = true; account.value = p.accountId;
      devices.value = (p.serialNumbers || []).join("\n"); users.value = (p.clientUserIds || []).join("\n");
    }
    name.addEventListener("input", () => { if (!p && !id.dataset.touched) id.value = slug(name.value); });
    id.addEventListener("input", () => { id.dataset.touched = "1"; });
    // Chosen assets by key (adamId/pricingParam), with what the picker knows of each.
    const chosen = new Map((p ? p.assets : []).map((a) => {
      const key = a.adamId + "/" + (a.pricingParam || "STDQ");
      return [key, { adamId: a.adamId, pricingParam: a.pricingParam || "STDQ", name: null }];
    }));
    const assetLabel = (l) => {
      const id = l.adamId + (l.pricingParam !== "STDQ" ? ", " + l.pricingParam : "");
      return l.name ? l.name + " (" + id + ")" : id;
    };
    // A tick in the results shows the asset among the chosen ones; one in the chosen list leaves
    // that list as it is (the box keeps its place and the focus) until the next tick below.
    function choose(key, asset, on, inChosen) {
      if (on) chosen.set(key, asset); else chosen.delete(key);
      assetList.querySelectorAll("input[type=checkbox]").forEach((b) => { if (b.value === key) b.checked = on; });
      if (!inChosen) showChosen();
    }
    function showChosen() {
      const items = [...chosen.entries()].map(([key, a]) => {
        const box = el("input", { type: "checkbox", value: key, "data-adam": a.adamId, checked: true });
        box.addEventListener("change", () => choose(key, a, box.checked, true));
        return el("label", {}, box, assetLabel(a));
      });
      chosenList.replaceChildren(...(items.length ? items : [el("span", { class: "hint" }, "No asset chosen yet: tick assets below.")]));
    }
    let cursor = null, shown = 0, picks = 0, loading = false, searchTimer = null;
    // The first page of the account's assets matching the search (`more`: the next page).
    async function fillAssets(moreOf) {
      if (moreOf && loading) return;
      const mine = ++picks;
      loading = true;
      if (!moreOf) {
        cursor = null; shown = 0;
        assetList.replaceChildren(el("span", { class: "hint" }, "Loading the account's assets…"));
      }
      const search = assetSearch.value.trim();
      const path = (q) => "/api/licenses?" + new URLSearchParams({ accountId: account.value, ...(search ? { search } : {}), ...q }).toString();
      let page;
      try {
        page = await licensePage(path, moreOf ? cursor : null, PAGE_SIZE);
      } catch (e) {
        if (mine === picks) { loading = false; assetList.replaceChildren(errorBox(e)); more.hidden = true; assetStatus.textContent = ""; }
        return;
      }
      if (mine !== picks) return;
      loading = false;
      if (!moreOf) assetList.replaceChildren();
      const had = document.activeElement;
      let firstNew = null, named = false;
      for (const l of page.rows) {
        const key = l.adamId + "/" + l.pricingParam;
        const asset = { adamId: l.adamId, pricingParam: l.pricingParam, name: l.name };
        if (chosen.has(key) && !chosen.get(key).name && asset.name) { chosen.set(key, asset); named = true; }
        const box = el("input", { type: "checkbox", value: key, "data-adam": l.adamId });
        box.checked = chosen.has(key);
        firstNew = firstNew || box;
        box.addEventListener("change", () => choose(key, asset, box.checked));
        assetList.append(el("label", {}, box, assetLabel(l) + " · " + (l.unlimited ? "unlimited" : l.available + " available")));
      }
      // Chosen assets known by their Adam ID only (a saved policy) get their names as they show up.
      if (named && !chosenList.contains(document.activeElement)) showChosen();
      shown += page.rows.length;
      cursor = page.next;
      if (!shown) {
        assetList.replaceChildren(el("span", { class: "hint" }, search ? (page.next ? "No match yet: More assets looks further." : "No asset of this account matches.")
          : "This account has no assets yet: refresh it first."));
      }
      more.hidden = !page.next;
      // More gone (nothing follows): the focus goes to the first asset it brought.
      if (had === more && more.hidden && firstNew) firstNew.focus();
      assetStatus.textContent = (shown === 1 ? "1 asset shown" : shown + " assets shown") + (page.next ? "; more follow." : search ? ": every match." : ": every asset.");
    }
    more.addEventListener("click", () => fillAssets(true));
    // Enter in the search box searches now (it does not save the policy).
    assetSearch.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); clearTimeout(searchTimer); fillAssets(false); } });
    assetSearch.addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(() => fillAssets(false), 250); });
    account.addEventListener("change", () => { chosen.clear(); showChosen(); fillAssets(false); });
    showChosen();
    const err = (f) => el("p", { class: "field-error", id: "policy-" + f + "-error", "aria-live": "polite" });
    const save = el("button", { type: "submit", class: "primary" }, "Save policy");
    const snapshot = () => JSON.stringify([name.value, id.value, account.value, [...chosen.keys()].sort(), devices.value, users.value]);
    let initial = "";
    const form = el("form", { novalidate: true }, h,
      el("div", { class: "field" }, el("label", { for: "policy-name" }, "Name"), name, err("name")),
      el("div", { class: "field" }, el("label", { for: "policy-id" }, "Policy ID"), id, el("p", { class: "hint", id: "policy-id-hint" }, "Letters, digits, '.', '_' or '-'; fixed once created."), err("id")),
      el("div", { class: "field" }, el("label", { for: "policy-account" }, "Account"), account, err("accountId")),
      el("div", { class: "field" }, el("span", { class: "label" }, el("strong", {}, "Assets")),
        el("p", { class: "hint" }, "Chosen"), chosenList,
        el("label", { for: "policy-asset-search" }, "Find assets"), assetSearch,
        assetList, el("div", { class: "pager" }, more, assetStatus), err("assets")),
      el("div", { class: "field" }, el("label", { for: "policy-devices" }, "Device serial numbers"), el("p", { class: "hint", id: "policy-devices-hint" }, "Paste a list: one per line, or separated by commas or spaces."), devices, err("serialNumbers")),
      el("div", { class: "field" }, el("label", { for: "policy-users" }, "Users (client user IDs)"), el("p", { class: "hint", id: "policy-users-hint" }, "Paste a list, as for devices."), users, err("clientUserIds")),
      general,
      el("div", { class: "dialog-actions" }, el("button", { type: "button", onclick: () => tryClose() }, "Cancel"), save));
    d.append(form);
    async function tryClose() {
      if (snapshot() === initial) return close(null);
      const c = await unsavedDialog("this policy");
      if (c === "discard") close(null);
      else if (c === "save") form.requestSubmit();
    }
    d.beforeClose = async () => { await tryClose(); return false; };
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      form.querySelectorAll(".field-error").forEach((x) => { x.textContent = ""; });
      general.replaceChildren();
      const body = {
        name: name.value.trim(), accountId: account.value,
        assets: [...chosen.values()].map((a) => ({ adamId: a.adamId, pricingParam: a.pricingParam })),
        serialNumbers: parseList(devices.value), clientUserIds: parseList(users.value),
      };
      if (!id.value.trim()) { form.querySelector("#policy-id-error").textContent = "Give the policy an ID."; id.focus(); return; }
      save.disabled = true; save.textContent = "Saving and assigning…";
      try {
        close(await put("/api/policies/" + enc(id.value.trim()), body));
      } catch (e2) {
        if (!(e2 instanceof ApiFailure)) throw e2;
        const f = e2.field && form.querySelector("#policy-" + e2.field.replace(/[^A-Za-z]/g, "") + "-error");
        if (f) f.textContent = e2.message; else general.replaceChildren(errorBox(e2));
      } finally {
        save.disabled = false; save.textContent = "Save policy";
      }
    });
    fillAssets().then(() => { initial = snapshot(); });
    initial = snapshot();
    name.focus();
  });
  if (!out) return;
  showResult(out);
  await load();
}

function showResult(out) {
  const rows = (out.assignments || []).map((a) => el("tr", { "data-adam": a.adamId },
    el("td", {}, a.adamId), el("td", { class: "num" }, String(a.wanted)), el("td", { class: "num" }, String(a.alreadyAssigned)),
    el("td", { class: "num" }, String(a.requested)),
    el("td", { class: "num " + (a.shortfall ? "text-error" : "") }, String(a.shortfall)),
    el("td", { class: "wrap" }, (a.shortfallSubjects || []).map((s) => s.serialNumber || s.clientUserId).join(", ") || "—")));
  const short = (out.assignments || []).reduce((n, a) => n + (a.shortfall || 0), 0);
  resultHost.replaceChildren(el("div", { class: "panel", id: "policy-result" },
    el("h2", {}, "Saved " + out.policy.name),
    el("p", { role: "status", class: short ? "text-error" : "text-ok" }, short ? short + " device(s) or user(s) could not get a license: buy more licenses or free some, then save again." : "Every device and user in the policy holds or was sent its licenses."),
    table(["Asset", { label: "Wanted", num: true }, { label: "Already held", num: true }, { label: "Sent to Apple", num: true }, { label: "Shortfall", num: true }, "Left without a license"], rows, "The policy names no asset.", "Result per asset")));
  announce("Policy saved");
}

async function remove(p) {
  const ok = await confirmDialog("Delete policy " + p.name + "?", [
    "Its devices and users keep their licenses until the next Reconcile, which takes back every license no policy wants.",
  ], "Delete", true);
  if (!ok) return;
  try {
    await del("/api/policies/" + enc(p.id));
    announce("Policy deleted");
    resultHost.replaceChildren();
  } catch (e) {
    resultHost.replaceChildren(errorBox(e));
  }
  await load();
}
