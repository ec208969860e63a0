// Boot, sign-in and the page router (#/accounts, #/licenses, ...).
import { api, storedKey, storeKey, forgetKey, setHandlers } from "./api.js";
import { session, unsavedDialog } from "./ui.js";
import * as accounts from "./accounts.js";
import * as licenses from "./licenses.js";
import * as connectors from "./connectors.js";
import * as policies from "./policies.js";
import * as activity from "./activity.js";

const PAGES = { accounts, licenses, connectors, policies, activity };
const $ = (id) => document.getElementById(id);
let current = null; // the shown page module
let currentHash = "";

function banner(text, kind) {
  const b = $("banner");
  if (!text) { b.hidden = true; b.textContent = ""; return; }
  b.className = "banner" + (kind ? " " + kind : "");
  b.textContent = text;
  b.hidden = false;
}

setHandlers({
  unauthorized: () => {
    forgetKey();
    showSignIn("The API did not accept this key (401). Paste a valid admin or reader key.");
  },
  unreachable: (f) => banner(f.message),
  reachable: () => { if ($("banner").textContent.startsWith("The vpp-spin API")) banner(""); },
});

function showSignIn(message) {
  session.role = null;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("page").replaceChildren();
  current = null;
  $("sign-in").hidden = false;
  $("api-key-error").textContent = message || "";
  $("api-key").value = "";
  $("api-key").focus();
}

async function signIn(key) {
  const who = await api("GET", "/api/session", undefined, { key });
  session.role = who.role;
  session.caller = who.caller;
  storeKey(key);
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  const badge = $("role-badge");
  badge.textContent = who.role === "admin" ? "Admin key" : "Reader key: read only";
  badge.className = "badge " + who.role;
  await route();
}

async function route() {
  if (!session.role) return;
  const hash = location.hash || "#/accounts";
  const [name, ...rest] = hash.replace(/^#\/?/, "").split("/");
  const page = PAGES[name] || accounts;
  if (current && current.unsaved && current.unsaved()) {
    const choice = await unsavedDialog(current.unsavedWhat || "a setting");
    if (choice === "stay") { history.replaceState(null, "", currentHash); return; }
    if (choice === "save") {
      const ok = await current.saveUnsaved();
      if (!ok) { history.replaceState(null, "", currentHash); return; }
    }
  }
  currentHash = hash;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === (PAGES[name] ? name : "accounts")) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  current = page;
  const root = $("page");
  root.replaceChildren();
  document.title = (page.title || "Console") + " · vpp-spin";
  await page.render(root, rest.map(decodeURIComponent));
  $("main").focus({ preventScroll: true });
}

window.addEventListener("hashchange", () => { route(); });
window.addEventListener("beforeunload", (e) => {
  if (current && current.unsaved && current.unsaved()) { e.preventDefault(); e.returnValue = ""; }
});

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) { $("api-key-error").textContent = "Paste an API key first."; return; }
  $("api-key-error").textContent = "Checking the key…";
  try {
    await signIn(key);
  } catch (err) {
    $("api-key-error").textContent = err.kind === "unauthorized"
      ? "The API did not accept this key. Check it and try again."
      : err.message;
  }
});
$("sign-out").addEventListener("click", () => { forgetKey(); showSignIn("The key is forgotten. Paste a key to continue."); });

(async function boot() {
  const key = storedKey();
  if (!key) return showSignIn("");
  try {
    await signIn(key);
  } catch (err) {
    if (err.kind !== "unauthorized") showSignIn(err.message);
  }
})();
