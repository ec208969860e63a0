// The console's only way to the app: the /api routes with the key the user gave, as a bearer
// token. The key lives in sessionStorage (this tab only); no cookie is ever set.

const KEY = "vpp-spin.apiKey";

export function storedKey() {
  return sessionStorage.getItem(KEY) || "";
}
export function storeKey(key) {
  sessionStorage.setItem(KEY, key);
}
export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

/** A failed call: `kind` is unreachable, unauthorized, forbidden or error. */
export class ApiFailure extends Error {
  constructor(kind, status, code, message, details) {
    super(message);
    this.kind = kind;
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
  /** The field the API says the error is about, if any. */
  get field() {
    return typeof this.details.field === "string" ? this.details.field : null;
  }
}

let onUnauthorized = () => {};
let onUnreachable = () => {};
let onReachable = () => {};
export function setHandlers(h) {
  onUnauthorized = h.unauthorized || onUnauthorized;
  onUnreachable = h.unreachable || onUnreachable;
  onReachable = h.reachable || onReachable;
}

async function send(method, path, body, accept, key) {
  const headers = { Accept: accept };
  const k = key === undefined ? storedKey() : key;
  if (k) headers.Authorization = "Bearer " + k;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: payload, credentials: "omit", cache: "no-store" });
  } catch (e) {
    const f = new ApiFailure("unreachable", 0, "unreachable",
      "The vpp-spin API cannot be reached (" + location.origin + "/api). Check that the app is running and this network can reach it.");
    onUnreachable(f);
    throw f;
  }
  onReachable();
  return resp;
}

async function failure(resp) {
  let code = "http_" + resp.status, message = resp.status + " " + resp.statusText, details = {};
  try {
    const j = await resp.json();
    if (j && j.error) {
      code = j.error.code || code;
      message = j.error.message || message;
      details = j.error.details || {};
    }
  } catch (_) { /* not JSON: keep the status line */ }
  const kind = resp.status === 401 ? "unauthorized" : resp.status === 403 ? "forbidden"
    : resp.status >= 502 && resp.status <= 504 && code.startsWith("http_") ? "unreachable" : "error";
  const f = new ApiFailure(kind, resp.status, code, message, details);
  if (kind === "unauthorized") onUnauthorized(f);
  if (kind === "unreachable") onUnreachable(f);
  return f;
}

/** Call the API; resolves to the parsed JSON body (null for 204), rejects with ApiFailure. */
export async function api(method, path, body, opts = {}) {
  const resp = await send(method, path, body, "application/json", opts.key);
  if (!resp.ok) throw await failure(resp);
  if (resp.status === 204) return null;
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/** Fetch a text body (the CSV export). */
export async function apiText(path, accept) {
  const resp = await send("GET", path, undefined, accept);
  if (!resp.ok) throw await failure(resp);
  return { text: await resp.text(), disposition: resp.headers.get("content-disposition") || "" };
}

/** The app's health (no key needed). */
export async function health() {
  const resp = await send("GET", "/api/health", undefined, "application/json", "");
  let body = null;
  try { body = await resp.json(); } catch (_) { body = null; }
  return { status: resp.status, body };
}

export const get = (p) => api("GET", p);
export const post = (p, b) => api("POST", p, b);
export const put = (p, b) => api("PUT", p, b);
export const patch = (p, b) => api("PATCH", p, b);
export const del = (p) => api("DELETE", p);
export const enc = encodeURIComponent;
