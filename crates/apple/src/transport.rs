//! The seams: how a request reaches Apple, and time.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Where Apple's v2 API lives; transports that call Apple directly prefix `Target::Api` paths
/// with it.
pub const APPLE_BASE_URL: &str = "https://vpp.itunes.apple.com/mdm/v2";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A v2 endpoint relative to `/mdm/v2` (e.g. `assets`, `service/config`).
    Api {
        path: String,
        query: Vec<(String, String)>,
    },
    /// A full URL (the content metadata lookup), query included.
    Absolute(String),
}

/// One HTTP request to Apple, without the bearer: the transport adds
/// `Authorization: Bearer {whole token file}` (and `Content-Type: application/json` when there is
/// a body). For `Target::Absolute` (the metadata lookup) a direct transport may add
/// `Cookie: itvt={token}` for custom apps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppleRequest {
    pub method: Method,
    pub target: Target,
    pub body: Option<Vec<u8>>,
}

impl AppleRequest {
    pub fn get(path: impl Into<String>, query: Vec<(String, String)>) -> Self {
        AppleRequest {
            method: Method::Get,
            target: Target::Api {
                path: path.into(),
                query,
            },
            body: None,
        }
    }

    pub fn post(path: impl Into<String>, body: Vec<u8>) -> Self {
        AppleRequest {
            method: Method::Post,
            target: Target::Api {
                path: path.into(),
                query: Vec::new(),
            },
            body: Some(body),
        }
    }

    /// The full URL for `base` (e.g. [`APPLE_BASE_URL`] or the Apple component's
    /// `{gateway}/accounts/{id}/mdm/v2`). Absolute targets ignore `base`.
    pub fn url(&self, base: &str) -> String {
        match &self.target {
            Target::Absolute(url) => url.clone(),
            Target::Api { path, query } => {
                let mut url = format!(
                    "{}/{}",
                    base.trim_end_matches('/'),
                    path.trim_start_matches('/')
                );
                if !query.is_empty() {
                    url.push('?');
                    url.push_str(&encode_query(query));
                }
                url
            }
        }
    }

    /// `path?query` relative to `/mdm/v2` (Api targets) or the absolute URL.
    pub fn path_and_query(&self) -> String {
        match &self.target {
            Target::Absolute(url) => url.clone(),
            Target::Api { path, query } if query.is_empty() => path.clone(),
            Target::Api { path, query } => format!("{path}?{}", encode_query(query)),
        }
    }
}

/// `k=v&…` with RFC 3986 percent-encoding.
pub fn encode_query(query: &[(String, String)]) -> String {
    query
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Apple's answer as it came: status, `Retry-After` header, body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppleResponse {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl AppleResponse {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        AppleResponse {
            status,
            retry_after: None,
            body: body.into(),
        }
    }

    pub fn with_retry_after(mut self, value: impl Into<String>) -> Self {
        self.retry_after = Some(value.into());
        self
    }
}

/// Sends one request and returns Apple's answer, whatever its status. `Err` only when no HTTP
/// answer came back. Implementations build the body anew from `req` on every call, so retries
/// never send a consumed body.
pub trait Transport {
    fn send(&self, req: &AppleRequest) -> impl Future<Output = Result<AppleResponse, String>>;
}

impl<T: Transport> Transport for &T {
    fn send(&self, req: &AppleRequest) -> impl Future<Output = Result<AppleResponse, String>> {
        (**self).send(req)
    }
}

/// Time, injected so that tests can run a fake clock.
pub trait Clock {
    fn now(&self) -> DateTime<Utc>;
    fn sleep(&self, d: Duration) -> impl Future<Output = ()>;
    /// A random number in `0..1` for backoff jitter.
    fn jitter(&self) -> f64;
}

impl<C: Clock> Clock for &C {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> {
        (**self).sleep(d)
    }
    fn jitter(&self) -> f64 {
        (**self).jitter()
    }
}
