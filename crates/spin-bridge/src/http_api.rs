//! Requests in, responses out: authentication, the body limit, JSON errors and the audit
//! record of every mutating call, the same way in every HTTP component.

use crate::kv::SpinKv;
use chrono::Utc;
use serde::Serialize;
use spin_sdk::http::{Fields, OutgoingBody, OutgoingResponse, Request, Response, ResponseOutparam};
use vpp_licensing::audit::{self, AuditRecord};
use vpp_licensing::auth::Caller;
use vpp_licensing::{ApiError, MAX_BODY_BYTES};

/// A request as the domain handlers see it.
pub struct ApiRequest {
    pub method: String,
    /// The path, without the query. Works for both routed (`/api/x`) and chained requests.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Who is calling, once authenticated.
    pub caller: Option<Caller>,
}

impl ApiRequest {
    pub fn from_spin(req: &Request) -> ApiRequest {
        let method = req.method().to_string();
        let path = req.path().to_string();
        let query = parse_query(req.query());
        let headers = req
            .headers()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or("").to_string()))
            .collect();
        ApiRequest {
            method,
            path,
            query,
            headers,
            body: req.body().to_vec(),
            caller: None,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Path segments after `/`, e.g. `["api", "accounts", "abc"]`.
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        vpp_licensing::error::parse_json(&self.body)
    }

    pub fn caller(&self) -> Result<&Caller, ApiError> {
        self.caller.as_ref().ok_or_else(ApiError::unauthorized)
    }

    /// `scheme://host[:port]` the client used, from the `spin-full-url` header Spin adds.
    pub fn origin(&self) -> Option<String> {
        let full = self.header("spin-full-url")?;
        let (scheme, rest) = full.split_once("://")?;
        let host = rest.split('/').next()?;
        Some(format!("{scheme}://{host}"))
    }

    /// An absolute URL for `path` on this app, when the origin is known.
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{path}", self.origin().unwrap_or_default())
    }

    pub fn is_mutating(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    /// A numeric query parameter, with a clear error when it is not a number.
    pub fn query_u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.query(name) {
            None => Ok(None),
            // `?page=` names the parameter without a number: refuse it rather than guess.
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::invalid_field(name, format!("{name} must be a whole number"))
            }),
        }
    }
}

/// Split `a=1&b=x%20y` into decoded pairs.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response on its way out.
pub struct ApiResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ApiResponse {
    pub fn json(status: u16, value: &impl Serialize) -> ApiResponse {
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        ApiResponse {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn ok(value: &impl Serialize) -> ApiResponse {
        ApiResponse::json(200, value)
    }

    pub fn no_content() -> ApiResponse {
        ApiResponse {
            status: 204,
            content_type: "application/json",
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn error(e: &ApiError) -> ApiResponse {
        let mut r = ApiResponse::json(e.status(), &e.body());
        if let Some(s) = e.retry_after {
            r.headers.push(("retry-after".into(), s.to_string()));
        }
        // RFC 9110 15.5.6: a 405 lists the methods the resource supports.
        if let Some(allow) = e.allow_header() {
            r.headers.push(("allow".into(), allow));
        }
        r
    }

    pub fn with_header(mut self, name: &str, value: &str) -> ApiResponse {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn into_spin(self) -> Response {
        let mut b = Response::builder();
        b.status(self.status);
        if !self.body.is_empty() || self.status != 204 {
            b.header("content-type", self.content_type);
        }
        for (k, v) in &self.headers {
            b.header(k.as_str(), v.as_str());
        }
        b.body(self.body).build()
    }
}

/// Which requests skip API-key authentication (they authenticate some other way, or are
/// deliberately public like the health check).
pub type IsPublic = fn(&ApiRequest) -> bool;

/// Serve one API request: authenticate, bound the body, run `handler`, turn errors into the
/// JSON error shape, and audit every mutating call.
pub async fn serve<H>(req: Request, is_public: IsPublic, handler: H) -> Response
where
    H: AsyncFnOnce(&SpinKv, &ApiRequest) -> Result<ApiResponse, ApiError>,
{
    let mut api = ApiRequest::from_spin(&req);
    drop(req);
    let response = match prepare(&mut api, is_public) {
        Err(e) => ApiResponse::error(&e),
        Ok(kv) => {
            let result = handler(&kv, &api).await;
            if api.is_mutating() {
                audit_call(&kv, &api, &result);
            }
            result.unwrap_or_else(|e| ApiResponse::error(&e))
        }
    };
    response.into_spin()
}

/// The rest of a streamed body, produced chunk by chunk after the response head was sent.
pub trait BodyStream {
    /// The next chunk, `None` at the end. An error here ends the body without finishing it, so
    /// the client sees a broken transfer rather than a short document.
    fn next_chunk(&mut self, kv: &SpinKv) -> Result<Option<Vec<u8>>, ApiError>;
}

/// What a handler answers: a whole response, or a head (status, headers, the first chunk as
/// its body) followed by a body written as it is produced.
pub enum Reply {
    Whole(ApiResponse),
    Stream(ApiResponse, Box<dyn BodyStream>),
}

/// [`serve`] for a component with a route whose body is streamed: the same authentication,
/// body limit, errors and audit; the response goes to `out` (Spin's response outparam).
pub async fn serve_to<H>(req: Request, out: ResponseOutparam, is_public: IsPublic, handler: H)
where
    H: AsyncFnOnce(&SpinKv, &ApiRequest) -> Result<Reply, ApiError>,
{
    let mut api = ApiRequest::from_spin(&req);
    drop(req);
    let (kv, reply) = match prepare(&mut api, is_public) {
        Err(e) => (None, Reply::Whole(ApiResponse::error(&e))),
        Ok(kv) => {
            let result = handler(&kv, &api).await;
            if api.is_mutating() {
                let summary = match &result {
                    Ok(Reply::Whole(w)) | Ok(Reply::Stream(w, _)) => Ok(ApiResponse {
                        status: w.status,
                        content_type: w.content_type,
                        headers: Vec::new(),
                        body: Vec::new(),
                    }),
                    Err(e) => Err(e.clone()),
                };
                audit_call(&kv, &api, &summary);
            }
            let reply = result.unwrap_or_else(|e| Reply::Whole(ApiResponse::error(&e)));
            (Some(kv), reply)
        }
    };
    let (head, rest) = match reply {
        Reply::Whole(r) => (r, None),
        Reply::Stream(r, rest) => (r, Some(rest)),
    };
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    if !head.body.is_empty() || head.status != 204 {
        fields.push(("content-type".into(), head.content_type.as_bytes().to_vec()));
    }
    for (k, v) in &head.headers {
        fields.push((k.clone(), v.as_bytes().to_vec()));
    }
    let Ok(headers) = Fields::from_list(&fields) else {
        eprintln!("response headers refused");
        return;
    };
    let response = OutgoingResponse::new(headers);
    if response.set_status_code(head.status).is_err() {
        eprintln!("response status {} refused", head.status);
        return;
    }
    let Ok(body) = response.body() else {
        eprintln!("response body already taken");
        return;
    };
    out.set(response);
    let Ok(stream) = body.write() else {
        eprintln!("response body not writable");
        return;
    };
    // As much per call as the stream accepts (`check-write`; Spin's hosts take up to 1 MiB),
    // waiting only when it has no room: `blocking-write-and-flush` takes at most 4,096 bytes
    // and waits for the host to take each one, a round trip per 4 KiB of the body.
    let write = |mut bytes: &[u8]| -> bool {
        while !bytes.is_empty() {
            let room = match stream.check_write() {
                Ok(0) => {
                    stream.subscribe().block();
                    continue;
                }
                Ok(n) => usize::try_from(n).unwrap_or(usize::MAX).min(bytes.len()),
                Err(_) => return false,
            };
            if stream.write(&bytes[..room]).is_err() {
                return false;
            }
            bytes = &bytes[room..];
        }
        true
    };
    if !write(&head.body) {
        return;
    }
    if let (Some(mut rest), Some(kv)) = (rest, kv) {
        loop {
            match rest.next_chunk(&kv) {
                Ok(Some(chunk)) => {
                    if !write(&chunk) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // The head is sent: end without finishing the body (a broken transfer).
                    eprintln!("streamed body failed: {}", e.message);
                    return;
                }
            }
        }
    }
    // Everything written reaches the host before the body is finished.
    if stream.flush().is_ok() {
        while let Ok(0) = stream.check_write() {
            stream.subscribe().block();
        }
    }
    drop(stream);
    if let Err(e) = OutgoingBody::finish(body, None) {
        eprintln!("finishing the response body failed: {e:?}");
    }
}

fn audit_call(kv: &SpinKv, api: &ApiRequest, result: &Result<ApiResponse, ApiError>) {
    let Some(caller) = &api.caller else { return };
    let (status, error) = match result {
        Ok(r) => (r.status, None),
        Err(e) => (e.status(), Some(e.code.as_str().to_string())),
    };
    let rec = AuditRecord {
        at: Utc::now(),
        actor: caller.name.clone(),
        action: format!("{} {}", api.method, api.path),
        target: None,
        status,
        error,
    };
    // The call already happened; a failed audit write is reported, not turned into a failure.
    if let Err(e) = audit::record(kv, &rec) {
        eprintln!("audit record failed: {e}");
    }
}

fn prepare(api: &mut ApiRequest, is_public: IsPublic) -> Result<SpinKv, ApiError> {
    if !is_public(api) {
        let keys = crate::vars::api_keys()?;
        api.caller = Some(keys.authenticate(api.header("authorization"))?);
    }
    if api.body.len() > MAX_BODY_BYTES {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    SpinKv::open().map_err(ApiError::store)
}
