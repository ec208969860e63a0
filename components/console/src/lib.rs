//! The console component: serves the web console's static files, embedded in the wasm at
//! compile time (no build step, no network at `spin build`). Every response carries strict
//! security headers; files carry an `ETag` (a hash computed at compile time) and are
//! revalidated on each use (`Cache-Control: no-cache`), answering `304` when unchanged, so an
//! upgraded app is seen at once and an unchanged one costs no bytes. The pages are one more API
//! client: they call `/api/...` with the key the user typed, kept in `sessionStorage`.

use spin_sdk::http::{Request, Response};
use spin_sdk::http_component;

/// Scripts and styles only from this origin (no inline code or style attributes), data only
/// from the API on this origin, icons from this origin or Apple's https CDN, never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' https: data:; connect-src 'self'; font-src 'self'; form-action 'none'; \
    base-uri 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: u64,
}

/// FNV-1a, 64 bits, at compile time: enough to tell two versions of a file apart.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

macro_rules! asset {
    ($path:literal, $file:literal, $ty:expr) => {{
        const BODY: &[u8] = include_bytes!(concat!("../web/", $file));
        Asset {
            path: $path,
            content_type: $ty,
            body: BODY,
            etag: fnv1a(BODY),
        }
    }};
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

static ASSETS: &[Asset] = &[
    asset!("/", "index.html", HTML),
    asset!("/index.html", "index.html", HTML),
    asset!("/console.css", "console.css", CSS),
    asset!("/js/app.js", "js/app.js", JS),
    asset!("/js/api.js", "js/api.js", JS),
    asset!("/js/ui.js", "js/ui.js", JS),
    asset!("/js/accounts.js", "js/accounts.js", JS),
    asset!("/js/licenses.js", "js/licenses.js", JS),
    asset!("/js/connectors.js", "js/connectors.js", JS),
    asset!("/js/policies.js", "js/policies.js", JS),
    asset!("/js/activity.js", "js/activity.js", JS),
    asset!("/icon.svg", "icon.svg", SVG),
];

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

fn with_security(b: &mut spin_sdk::http::ResponseBuilder) {
    b.header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .header("cross-origin-opener-policy", "same-origin")
        .header(
            "permissions-policy",
            "camera=(), microphone=(), geolocation=(), payment=()",
        );
}

/// Does an `If-None-Match` value name this ETag (or `*`)?
fn matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/").is_some_and(|w| w == etag))
}

fn plain(status: u16, text: &str, allow: Option<&str>) -> Response {
    let mut b = Response::builder();
    b.status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("cache-control", "no-store");
    if let Some(a) = allow {
        b.header("allow", a);
    }
    with_security(&mut b);
    b.body(text.as_bytes().to_vec()).build()
}

#[http_component]
fn handle(req: Request) -> Response {
    let method = req.method().to_string();
    let head = method == "HEAD";
    if method != "GET" && !head {
        return plain(405, "method not allowed\n", Some("GET, HEAD"));
    }
    let Some(asset) = find(req.path()) else {
        return plain(404, "not found: the console's pages are at /\n", None);
    };
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = req
        .header("if-none-match")
        .and_then(|v| v.as_str())
        .is_some_and(|v| matches(v, &etag));
    let mut b = Response::builder();
    b.header("etag", etag.as_str())
        .header("cache-control", "no-cache");
    with_security(&mut b);
    if fresh {
        return b.status(304).body(Vec::new()).build();
    }
    b.status(200).header("content-type", asset.content_type);
    if head {
        b.body(Vec::new()).build()
    } else {
        b.body(asset.body.to_vec()).build()
    }
}
