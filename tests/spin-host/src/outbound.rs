//! Outbound networking rules, as Spin's `outbound-networking-config/src/allowed_hosts.rs` and
//! `factor-outbound-http/src/wasi.rs` apply them.
//!
//! Entry grammar: `scheme://host[:port]` with `*` for any part, `*.domain` for subdomains,
//! CIDR or IP hosts, `a..b` port ranges (end exclusive), `self`/`self.alt` for self-requests,
//! no path. An omitted port is the scheme's well-known port. `{{ var }}` templates are
//! expanded once at load from application variables, then parsed like literals.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;

use anyhow::{bail, Context};

use crate::variables::Template;

/// The service chaining domain: `http://<component-id>.spin.internal`.
pub const SERVICE_CHAINING_DOMAIN: &str = "spin.internal";

#[derive(Clone, Debug, PartialEq, Eq)]
enum SchemeConfig {
    Any,
    One(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostConfig {
    Any,
    /// `*.example.com` is stored as `.example.com`.
    AnySubdomain(String),
    ToSelf,
    Exact(String),
    Cidr(IpAddr, u8),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PortConfig {
    Any,
    Port(u16),
    Range(Range<u16>),
}

/// One parsed `allowed_outbound_hosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHost {
    original: String,
    scheme: SchemeConfig,
    host: HostConfig,
    port: PortConfig,
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "postgres" => Some(5432),
        "mysql" => Some(3306),
        "redis" => Some(6379),
        "mqtt" => Some(1883),
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `1.2.3.4` or `10.0.0.0/8` (host bits truncated, as `IpNetwork::from_str_truncate` does).
fn parse_cidr(host: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = match host.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (host, None),
    };
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
        None => max,
    };
    Some((ip, prefix))
}

fn cidr_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            (u32::from(n) & mask) == (u32::from(i) & mask)
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            (u128::from(n) & mask) == (u128::from(i) & mask)
        }
        _ => false,
    }
}

impl AllowedHost {
    /// Parse one literal entry (templates must be expanded first).
    pub fn parse(entry: &str) -> anyhow::Result<Self> {
        let original = entry.to_string();
        let url = entry.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            match url {
                "*" | ":" | "" | "?" => bail!("{url:?} is not an allowed outbound host format.\nHosts must be in the form <scheme>://<host>[:<port>], with '*' wildcards allowed for each."),
                _ => bail!("{url:?} does not contain a scheme (e.g., 'http://' or '*://')"),
            }
        };
        let (host, rest) = rest.rsplit_once(':').unwrap_or((rest, ""));
        let port = match rest.split_once('/') {
            Some((port, path)) => {
                if !path.is_empty() {
                    bail!("{url:?} has a path but is not allowed to");
                }
                port
            }
            None => rest,
        };

        let scheme = if scheme == "*" {
            SchemeConfig::Any
        } else if scheme.starts_with('{') {
            bail!("scheme lists are not yet supported")
        } else if scheme.chars().any(|c| !c.is_alphabetic()) {
            bail!(" scheme {scheme:?} contains non alphabetic character")
        } else {
            SchemeConfig::One(scheme.to_string())
        };

        let host = {
            let host = host.trim();
            if host == "*" {
                HostConfig::Any
            } else if host == "self" || host == "self.alt" {
                HostConfig::ToSelf
            } else if host.starts_with('{') {
                bail!("host lists are not yet supported")
            } else if let Some((ip, prefix)) = parse_cidr(host) {
                HostConfig::Cidr(ip, prefix)
            } else if matches!(host.split('/').nth(1), Some(path) if !path.is_empty()) {
                bail!("hosts must not contain paths")
            } else if let Some(domain) = host.strip_prefix("*.") {
                if domain.contains('*') {
                    bail!("Invalid allowed host {host}: wildcards are allowed only as prefixes");
                }
                HostConfig::AnySubdomain(format!(".{domain}"))
            } else if host.contains('*') {
                bail!("Invalid allowed host {host}: wildcards are allowed only as subdomains")
            } else {
                HostConfig::Exact(host.trim_end_matches('/').to_string())
            }
        };

        let port = if port.is_empty() {
            let p = well_known_port(scheme_str(&scheme, url)).with_context(|| {
                format!("no port was provided and the scheme {scheme:?} does not have a known default port number")
            })?;
            PortConfig::Port(p)
        } else if port == "*" {
            PortConfig::Any
        } else if port.starts_with('{') {
            bail!("port lists are not yet supported")
        } else if let Some((start, end)) = port.split_once("..") {
            let start = start
                .parse()
                .with_context(|| format!("port range {port:?} contains non-number"))?;
            let end = end
                .parse()
                .with_context(|| format!("port range {port:?} contains non-number"))?;
            PortConfig::Range(start..end)
        } else {
            PortConfig::Port(
                port.parse()
                    .with_context(|| format!("port {port:?} is not a number"))?,
            )
        };

        Ok(Self {
            original,
            scheme,
            host,
            port,
        })
    }

    fn allows(&self, url: &OutboundUrl) -> bool {
        let scheme_ok = match &self.scheme {
            SchemeConfig::Any => true,
            SchemeConfig::One(s) => *s == url.scheme,
        };
        let host_ok = match &self.host {
            HostConfig::Any => true,
            HostConfig::AnySubdomain(suffix) => url.host.ends_with(suffix.as_str()),
            HostConfig::ToSelf => false,
            HostConfig::Exact(h) => *h == url.host,
            HostConfig::Cidr(net, prefix) => url
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| cidr_contains(*net, *prefix, ip)),
        };
        let port_ok = match &self.port {
            PortConfig::Any => true,
            other => match url.port.or_else(|| well_known_port(&url.scheme)) {
                Some(p) => match other {
                    PortConfig::Port(q) => *q == p,
                    PortConfig::Range(r) => r.contains(&p),
                    PortConfig::Any => true,
                },
                None => false,
            },
        };
        scheme_ok && host_ok && port_ok
    }

    fn allows_relative(&self, schemes: &[&str]) -> bool {
        let scheme_ok = schemes.iter().any(|s| match &self.scheme {
            SchemeConfig::Any => true,
            SchemeConfig::One(x) => x == s,
        });
        scheme_ok && matches!(self.host, HostConfig::Any | HostConfig::ToSelf)
    }
}

impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.original)
    }
}

fn scheme_str<'a>(scheme: &'a SchemeConfig, _url: &str) -> &'a str {
    match scheme {
        SchemeConfig::Any => "*",
        SchemeConfig::One(s) => s,
    }
}

/// A URL as the allow list sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundUrl {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl OutboundUrl {
    /// From an absolute request URI; `default_scheme` is used when the URI has none.
    pub fn from_uri(uri: &http::Uri, default_scheme: &str) -> Option<Self> {
        let authority = uri.authority()?;
        let scheme = uri
            .scheme_str()
            .unwrap_or(default_scheme)
            .to_ascii_lowercase();
        let port = authority.port_u16();
        // The `url` crate (which Spin parses with) drops a port equal to the scheme default.
        let port = port.filter(|p| Some(*p) != well_known_port(&scheme));
        Some(Self {
            host: authority.host().to_ascii_lowercase(),
            scheme,
            port,
        })
    }
}

/// A component's whole allow list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    hosts: Vec<AllowedHost>,
}

impl AllowedHosts {
    /// Parse the manifest list, expanding `{{ var }}` templates with application variables.
    pub fn parse(entries: &[String], app_vars: &HashMap<String, String>) -> anyhow::Result<Self> {
        if entries.len() == 1 && entries[0] == "insecure:allow-all" {
            bail!("'insecure:allow-all' is not allowed - use '*://*:*' instead if you really want to allow all outbound traffic'")
        }
        let mut hosts = Vec::with_capacity(entries.len());
        for entry in entries {
            let template = Template::parse(entry)?;
            let literal = if template.is_literal() {
                entry.clone()
            } else {
                for var in template.variables() {
                    if !app_vars.contains_key(var) {
                        bail!("invalid variable template: unknown variable {var:?} in allowed host {entry:?}");
                    }
                }
                template.resolve(app_vars)?
            };
            hosts.push(
                AllowedHost::parse(&literal)
                    .with_context(|| format!("invalid allowed_outbound_hosts entry {entry:?}"))?,
            );
        }
        Ok(Self { hosts })
    }

    pub fn allows(&self, url: &OutboundUrl) -> bool {
        self.hosts.iter().any(|h| h.allows(url))
    }

    /// Whether a relative (self) request is allowed: some entry is `self`/`*` for http or https.
    pub fn allows_relative(&self) -> bool {
        self.hosts
            .iter()
            .any(|h| h.allows_relative(&["http", "https"]))
    }
}

/// `apple.spin.internal[:port]` → `Some("apple")`.
pub fn service_chaining_target(host: &str) -> Option<String> {
    let host = host.trim();
    let (host, _) = host.rsplit_once(':').unwrap_or((host, ""));
    let (first, rest) = host.split_once('.')?;
    (rest == SERVICE_CHAINING_DOMAIN).then(|| first.to_string())
}

/// What the host does with an outbound request, decided before anything is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// No authority or `self.alt`: goes to the app's own router.
    SelfRequest,
    /// `<id>.spin.internal`: served in-process by that component (HTTP trigger only).
    Chain(String),
    /// Anything else: the real network.
    Network,
}

/// Apply Spin's order: allow list first (self-requests need a `self` entry), then chaining.
/// Returns `None` when the request is denied.
pub fn classify(uri: &http::Uri, allowed: &AllowedHosts) -> Option<Outbound> {
    let is_self = match uri.authority() {
        Some(a) => a.host() == "self.alt" || a.host().is_empty(),
        None => true,
    };
    if is_self {
        return allowed.allows_relative().then_some(Outbound::SelfRequest);
    }
    let url = OutboundUrl::from_uri(uri, "https")?;
    if !allowed.allows(&url) {
        return None;
    }
    Some(match service_chaining_target(&url.host) {
        Some(id) => Outbound::Chain(id),
        None => Outbound::Network,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(entries: &[&str]) -> AllowedHosts {
        let vars = HashMap::from([
            ("api_base".to_string(), "http://127.0.0.1:9000".to_string()),
            (
                "with_path".to_string(),
                "https://x.example.com/v1".to_string(),
            ),
        ]);
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        AllowedHosts::parse(&entries, &vars).unwrap()
    }

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn exact_host_and_default_port() {
        let h = hosts(&["https://api.example.com"]);
        assert_eq!(
            classify(&uri("https://api.example.com/x"), &h),
            Some(Outbound::Network)
        );
        assert_eq!(
            classify(&uri("https://api.example.com:443/x"), &h),
            Some(Outbound::Network)
        );
        assert_eq!(
            classify(&uri("https://API.example.com/x"), &h),
            Some(Outbound::Network)
        );
        assert_eq!(classify(&uri("https://api.example.com:8443/x"), &h), None);
        assert_eq!(classify(&uri("http://api.example.com/x"), &h), None);
        assert_eq!(classify(&uri("https://other.example.com/x"), &h), None);
    }

    #[test]
    fn wildcards_and_ports() {
        let h = hosts(&[
            "https://*.example.com",
            "http://127.0.0.1:*",
            "*://b.org:8000..8090",
        ]);
        assert!(classify(&uri("https://a.example.com/"), &h).is_some());
        assert!(classify(&uri("https://example.com/"), &h).is_none());
        assert!(classify(&uri("http://127.0.0.1:1234/"), &h).is_some());
        assert!(classify(&uri("http://127.0.0.2:1234/"), &h).is_none());
        assert!(classify(&uri("http://b.org:8000/"), &h).is_some());
        assert!(classify(&uri("https://b.org:8089/"), &h).is_some());
        assert!(classify(&uri("https://b.org:8090/"), &h).is_none());
        let all = hosts(&["*://*:*"]);
        assert!(classify(&uri("http://anything:1/"), &all).is_some());
    }

    #[test]
    fn cidr_hosts() {
        let h = hosts(&["http://10.0.0.0/8:80"]);
        // A CIDR with a port: the host part "10.0.0.0/8" parses as a network.
        assert!(classify(&uri("http://10.1.2.3/"), &h).is_some());
        assert!(classify(&uri("http://11.1.2.3/"), &h).is_none());
    }

    #[test]
    fn templates_resolve_from_app_variables() {
        let h = hosts(&["{{ api_base }}"]);
        assert!(classify(&uri("http://127.0.0.1:9000/mdm"), &h).is_some());
        assert!(classify(&uri("http://127.0.0.1:9001/mdm"), &h).is_none());
        // A template whose value has a path is rejected at load, as Spin does.
        let vars = HashMap::from([("p".to_string(), "https://x.example.com/v1".to_string())]);
        assert!(AllowedHosts::parse(&["{{ p }}".to_string()], &vars).is_err());
        assert!(AllowedHosts::parse(&["{{ nope }}".to_string()], &vars).is_err());
    }

    #[test]
    fn bad_entries_are_rejected() {
        let vars = HashMap::new();
        for bad in [
            "*",
            "",
            "example.com",
            "https://example.com/path",
            "https://example.com:443/path",
            "https://*example.com",
            "https://a.*.com",
            "{http,https}://example.com",
            "ftp://example.com",
            "https://example.com:abc",
        ] {
            assert!(
                AllowedHosts::parse(&[bad.to_string()], &vars).is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert!(AllowedHosts::parse(&["insecure:allow-all".to_string()], &vars).is_err());
        // A trailing slash is tolerated.
        assert!(AllowedHosts::parse(&["https://example.com/".to_string()], &vars).is_ok());
    }

    #[test]
    fn self_requests() {
        let none = hosts(&[]);
        assert_eq!(classify(&uri("/api/x"), &none), None);
        let h = hosts(&["http://self"]);
        assert_eq!(classify(&uri("/api/x"), &h), Some(Outbound::SelfRequest));
        assert_eq!(
            classify(&uri("http://self.alt/api/x"), &h),
            Some(Outbound::SelfRequest)
        );
        let alt = hosts(&["https://self.alt"]);
        assert_eq!(classify(&uri("/api/x"), &alt), Some(Outbound::SelfRequest));
        // `self` never allows a named host.
        assert_eq!(classify(&uri("http://localhost/api"), &h), None);
    }

    #[test]
    fn service_chaining() {
        let h = hosts(&["http://apple.spin.internal"]);
        assert_eq!(
            classify(&uri("http://apple.spin.internal/accounts"), &h),
            Some(Outbound::Chain("apple".into()))
        );
        assert_eq!(classify(&uri("http://other.spin.internal/"), &h), None);
        // The scheme is checked like any other host.
        assert_eq!(classify(&uri("https://apple.spin.internal/"), &h), None);
        let all = hosts(&["http://*.spin.internal"]);
        assert_eq!(
            classify(&uri("http://licenses.spin.internal/x"), &all),
            Some(Outbound::Chain("licenses".into()))
        );
        assert_eq!(
            service_chaining_target("a.spin.internal:80"),
            Some("a".into())
        );
        assert_eq!(service_chaining_target("a.b.spin.internal"), None);
        assert_eq!(service_chaining_target("spin.internal"), None);
    }
}
