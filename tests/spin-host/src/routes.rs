//! HTTP trigger routing and the `spin-*` request headers, as Spin's `crates/routes` and
//! `crates/trigger-http/src/headers.rs` compute them.
//!
//! Spin builds its router on `routefinder` (`/...` becomes `/*`), so this module does too:
//! exact routes beat `:name` segments beat wildcards, then the longest prefix wins. Private
//! routes (`{ private = true }`) are not routable; duplicates: the last one wins.

use std::net::SocketAddr;

use anyhow::anyhow;

/// The prefix Spin reserves for its own endpoints.
pub const WELL_KNOWN_PREFIX: &str = "/.well-known/spin/";

#[derive(Clone, Debug)]
struct Handler {
    component: String,
    based_route: String,
    raw_route: String,
}

/// The result of routing a path: which component, and what Spin tells it about the match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    pub component: String,
    /// The route as written in the manifest, with the (always `/`) base: `spin-matched-route`.
    pub based_route: String,
    /// The route as written in the manifest: `spin-raw-component-route`.
    pub raw_route: String,
    /// The part matched by a trailing `/...`: `spin-path-info`.
    pub path_info: String,
    /// `:name` segments: `spin-path-match-<name>`.
    pub named: Vec<(String, String)>,
}

impl RouteMatch {
    /// The match Spin fabricates for service chaining: as if the target's route were `/...`.
    pub fn synthetic(component: &str, path: &str) -> Self {
        Self {
            component: component.to_string(),
            based_route: "/...".into(),
            raw_route: "/...".into(),
            path_info: path.to_string(),
            named: Vec::new(),
        }
    }

    /// The route without a trailing wildcard: `spin-component-route`.
    pub fn raw_route_or_prefix(&self) -> &str {
        self.raw_route
            .strip_suffix("/...")
            .unwrap_or(&self.raw_route)
    }
}

/// The HTTP router of an app.
#[derive(Debug, Default)]
pub struct Router {
    router: routefinder::Router<Handler>,
}

/// Spin's base-path sanitising with the fixed base `/`: absolutize, then drop one trailing `/`.
fn based(route: &str) -> String {
    let abs = if route.starts_with('/') {
        route.to_string()
    } else {
        format!("/{route}")
    };
    abs.strip_suffix('/').map(str::to_string).unwrap_or(abs)
}

impl Router {
    /// Build from `(component id, route)`; `None` is a private route.
    pub fn build<'a>(
        routes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> anyhow::Result<Self> {
        // Later duplicates replace earlier ones, as Spin's IndexMap insert does.
        let mut entries: Vec<(String, Handler)> = Vec::new();
        for (component, route) in routes {
            let Some(raw_route) = route else { continue };
            let based_route = based(raw_route);
            let handler = Handler {
                component: component.to_string(),
                based_route: based_route.clone(),
                raw_route: raw_route.to_string(),
            };
            if let Some(existing) = entries.iter_mut().find(|(r, _)| r == raw_route) {
                existing.1 = handler;
            } else {
                entries.push((raw_route.to_string(), handler));
            }
        }
        let mut router = routefinder::Router::new();
        for (_, handler) in entries {
            let spec = if let Some(prefix) = handler.based_route.strip_suffix("/...") {
                format!("{prefix}/*")
            } else {
                handler.based_route.clone()
            };
            let based_route = handler.based_route.clone();
            let component = handler.component.clone();
            router.add(spec, handler).map_err(|e| {
                anyhow!(
                    "Error parsing route {based_route} associated with component {component}: {e}"
                )
            })?;
        }
        Ok(Self { router })
    }

    /// Route a path (no query). `None` means 404.
    pub fn route(&self, path: &str) -> Option<RouteMatch> {
        let m = self.router.best_match(path)?;
        let handler = m.handler();
        let captures = m.captures();
        // Spin keeps trailing slashes in the path info; routefinder does not capture them.
        let path_info = captures
            .wildcard()
            .map(|s| match (s.is_empty(), path.ends_with('/')) {
                (true, false) => String::new(),
                (true, true) => "/".to_string(),
                (false, false) => format!("/{s}"),
                (false, true) => format!("/{s}/"),
            })
            .unwrap_or_default();
        let named = captures
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(RouteMatch {
            component: handler.component.clone(),
            based_route: handler.based_route.clone(),
            raw_route: handler.raw_route.clone(),
            path_info,
            named,
        })
    }

    /// `(component, route)` for every public route, for start-up output.
    pub fn routes(&self) -> Vec<(String, String)> {
        self.router
            .iter()
            .map(|(_, h)| (h.component.clone(), h.raw_route.clone()))
            .collect()
    }
}

/// The headers Spin adds to a routed request (names already in header form).
///
/// `host` is the request's Host header (Spin uses `localhost` when there is none), `scheme` the
/// server's scheme, `path_and_query` the request target.
pub fn spin_headers(
    route: &RouteMatch,
    scheme: &str,
    host: &str,
    path_and_query: &str,
    client_addr: SocketAddr,
) -> Vec<(String, String)> {
    let mut out = vec![
        ("spin-path-info".to_string(), route.path_info.clone()),
        (
            "spin-full-url".to_string(),
            format!("{scheme}://{host}{path_and_query}"),
        ),
        ("spin-matched-route".to_string(), route.based_route.clone()),
        ("spin-base-path".to_string(), "/".to_string()),
        (
            "spin-raw-component-route".to_string(),
            route.raw_route.clone(),
        ),
        (
            "spin-component-route".to_string(),
            route.raw_route_or_prefix().to_string(),
        ),
        ("spin-client-addr".to_string(), client_addr.to_string()),
    ];
    for (name, value) in &route.named {
        out.push((
            format!(
                "spin-path-match-{}",
                name.to_ascii_lowercase().replace('_', "-")
            ),
            value.clone(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, &str)]) -> Router {
        Router::build(routes.iter().map(|(c, r)| (*c, Some(*r)))).unwrap()
    }

    fn comp(r: &Router, path: &str) -> Option<String> {
        r.route(path).map(|m| m.component)
    }

    #[test]
    fn exact_routes() {
        let r = router(&[("foo", "/foo"), ("foobar", "/foo/bar")]);
        assert_eq!(comp(&r, "/foo").as_deref(), Some("foo"));
        assert_eq!(comp(&r, "/foo/bar").as_deref(), Some("foobar"));
        assert_eq!(comp(&r, "/foo/baz"), None);
        assert_eq!(comp(&r, "/"), None);
    }

    #[test]
    fn wildcard_matches_everything_below() {
        let r = router(&[("all", "/...")]);
        for p in ["/foo/bar", "/abc/", "/"] {
            assert_eq!(comp(&r, p).as_deref(), Some("all"), "{p}");
        }
        let r = router(&[("api", "/api/...")]);
        assert_eq!(comp(&r, "/api").as_deref(), Some("api"));
        assert_eq!(comp(&r, "/api/x/y").as_deref(), Some("api"));
        assert_eq!(comp(&r, "/apix"), None);
    }

    #[test]
    fn longest_prefix_and_exact_win() {
        let r = router(&[
            ("one", "/one/..."),
            ("three", "/one/two/three/..."),
            ("two", "/one/two/..."),
            ("exact", "/one/two"),
            ("root", "/..."),
        ]);
        assert_eq!(comp(&r, "/one/two/three/four").as_deref(), Some("three"));
        assert_eq!(comp(&r, "/one/two/x").as_deref(), Some("two"));
        assert_eq!(comp(&r, "/one/two").as_deref(), Some("exact"));
        assert_eq!(comp(&r, "/one/x").as_deref(), Some("one"));
        assert_eq!(comp(&r, "/zzz").as_deref(), Some("root"));
    }

    #[test]
    fn private_routes_and_duplicates() {
        let r = Router::build([
            ("pub", Some("/a")),
            ("private", None),
            ("second", Some("/a")),
        ])
        .unwrap();
        assert_eq!(comp(&r, "/a").as_deref(), Some("second"));
        assert_eq!(r.routes().len(), 1);
    }

    #[test]
    fn path_info_keeps_trailing_slashes() {
        let r = router(&[("c", "/test/...")]);
        assert_eq!(r.route("/test").unwrap().path_info, "");
        assert_eq!(r.route("/test/").unwrap().path_info, "/");
        assert_eq!(r.route("/test/hello").unwrap().path_info, "/hello");
        assert_eq!(r.route("/test/hello/").unwrap().path_info, "/hello/");
        let r = router(&[("c", "/...")]);
        assert_eq!(r.route("/1/2/3").unwrap().path_info, "/1/2/3");
    }

    #[test]
    fn named_segments() {
        let r = router(&[("c", "/users/:userid/cart/...")]);
        let m = r.route("/users/1/cart/items/3/edit").unwrap();
        assert_eq!(m.named, vec![("userid".to_string(), "1".to_string())]);
        assert_eq!(m.path_info, "/items/3/edit");
        let r = router(&[("c", "/1/:two/3")]);
        assert_eq!(r.route("/1/2/3").unwrap().named[0].1, "2");
    }

    #[test]
    fn headers_as_spin_computes_them() {
        let r = router(&[("c", "/users/:userid/cart/...")]);
        let m = r.route("/users/1/cart/items/3/edit").unwrap();
        let addr: SocketAddr = "127.0.0.1:53152".parse().unwrap();
        let h = spin_headers(
            &m,
            "https",
            "example.com:8080",
            "/users/1/cart/items/3/edit?theme=pink",
            addr,
        );
        let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("spin-full-url"),
            Some("https://example.com:8080/users/1/cart/items/3/edit?theme=pink")
        );
        assert_eq!(get("spin-path-info"), Some("/items/3/edit"));
        assert_eq!(get("spin-path-match-userid"), Some("1"));
        assert_eq!(get("spin-matched-route"), Some("/users/:userid/cart/..."));
        assert_eq!(
            get("spin-raw-component-route"),
            Some("/users/:userid/cart/...")
        );
        assert_eq!(get("spin-component-route"), Some("/users/:userid/cart"));
        assert_eq!(get("spin-base-path"), Some("/"));
        assert_eq!(get("spin-client-addr"), Some("127.0.0.1:53152"));

        let root = router(&[("c", "/")]);
        let m = root.route("/").unwrap();
        assert_eq!(m.based_route, "");
        assert_eq!(m.raw_route, "/");

        let s = RouteMatch::synthetic("apple", "/accounts/1");
        let h = spin_headers(&s, "http", "localhost", "/accounts/1?x=1", addr);
        let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("spin-path-info"), Some("/accounts/1"));
        assert_eq!(get("spin-matched-route"), Some("/..."));
        assert_eq!(get("spin-component-route"), Some(""));
    }
}
