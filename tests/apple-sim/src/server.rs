//! The HTTP layer: hyper server, routing, the control API, delayed events and notification
//! delivery. All decisions are made by [`Model`]; this file only moves bytes and time.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::*;

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// State shared by the server tasks and the Rust API.
pub(crate) struct Shared {
    pub model: Mutex<Model>,
    pub client: HttpClient,
    /// Notification batches spawned and not yet finished.
    pub in_flight: std::sync::atomic::AtomicUsize,
}

impl Shared {
    pub fn new(origin: &str) -> Self {
        Shared {
            model: Mutex::new(Model::new(origin)),
            client: Client::builder(TokioExecutor::new()).build_http(),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }
    pub fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Decodes `%XX` and `+`.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn json_response(status: u16, headers: &[(String, String)], body: &Value) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header("Content-Type", "application/json;charset=UTF-8");
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"{}"))))
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Receipt time: used by the rate limiter and the call log.
    let received_at = Instant::now();
    let received_wall = Utc::now();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let authorization = header("authorization");
    let content_type = header("content-type");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let query = parse_query(&raw_query);

    if let Some(rest) = path.strip_prefix("/mdm/v2/") {
        let api = ApiRequest {
            method: method.clone(),
            path: rest.to_string(),
            query,
            authorization: authorization.clone(),
            content_type,
            body: body.clone(),
        };
        let resp = api_call(&shared, &api, received_at).await;
        let token = authorization.as_deref().and_then(|h| {
            let h = h.trim();
            (h.len() > 7 && h[..7].eq_ignore_ascii_case("bearer "))
                .then(|| h[7..].trim().to_string())
        });
        let (resp, uid) = resp;
        shared.lock().log_call(CallRecord {
            time: received_wall,
            method,
            path,
            query: raw_query,
            token,
            location_uid: uid,
            status: resp.status,
            error_number: resp.error_number(),
            body: serde_json::from_slice(&body).ok(),
        });
        return Ok(json_response(resp.status, &resp.headers, &resp.body));
    }
    if path == LOOKUP_PATH {
        let (status, v) = {
            let mut m = shared.lock();
            let v = m.lookup(&query);
            m.log_call(CallRecord {
                time: received_wall,
                method,
                path,
                query: raw_query,
                token: None,
                location_uid: None,
                status: 200,
                error_number: None,
                body: None,
            });
            (200, v)
        };
        return Ok(json_response(status, &[], &v));
    }
    if let Some(rest) = path.strip_prefix("/control") {
        let (status, v) = control(&shared, &method, rest, &query, &body);
        return Ok(json_response(status, &[], &v));
    }
    if path == "/" || path.is_empty() {
        return Ok(json_response(
            200,
            &[],
            &json!({"name": "apple-sim", "api": "/mdm/v2", "control": "/control"}),
        ));
    }
    Ok(json_response(
        404,
        &[],
        &json!({"errorNumber": 9602, "errorMessage": "Not found."}),
    ))
}

/// Runs one API call through the model, with latency, the TEST_NOTIFICATION round trip and
/// the effects. Returns the response and the location uId.
async fn api_call(
    shared: &Arc<Shared>,
    api: &ApiRequest,
    received_at: Instant,
) -> (ApiResponse, Option<String>) {
    let outcome = shared.lock().handle_api(api, received_at);
    if outcome.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(outcome.latency_ms)).await;
    }
    let mut response = outcome.response;
    if let Some(pending) = &outcome.pending_config {
        let delivered = deliver(shared.clone(), pending.test.clone(), Some(1)).await;
        response = shared.lock().finish_client_config(pending, delivered);
    }
    run_effects(shared, outcome.effects);
    (response, outcome.location_uid)
}

/// Schedules events and spawns notification deliveries. Needs a tokio runtime context.
pub(crate) fn run_effects(shared: &Arc<Shared>, effects: Vec<Effect>) {
    for e in effects {
        match e {
            Effect::Notify(notes) => spawn_notifications(shared, notes),
            Effect::Schedule { event_id, delay_ms } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    // Counted before the event stops being pending, so "idle" never flickers.
                    shared.in_flight.fetch_add(1, Ordering::SeqCst);
                    let notes = shared.lock().apply_event(&event_id);
                    deliver_all(shared.clone(), notes).await;
                    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }
}

pub(crate) fn spawn_notifications(shared: &Arc<Shared>, notes: Vec<Outgoing>) {
    if notes.is_empty() {
        return;
    }
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let shared = shared.clone();
    tokio::spawn(async move {
        deliver_all(shared.clone(), notes).await;
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
}

pub(crate) async fn deliver_all(shared: Arc<Shared>, notes: Vec<Outgoing>) {
    for n in notes {
        deliver(shared.clone(), n, None).await;
    }
}

/// Delivers a notification (each copy, up to the configured attempts). True when the first copy
/// got a 2xx.
pub(crate) async fn deliver(shared: Arc<Shared>, n: Outgoing, attempts: Option<u32>) -> bool {
    let (max_attempts, pause) = {
        let m = shared.lock();
        (
            attempts.unwrap_or(m.config.notification_attempts).max(1),
            Duration::from_millis(m.config.notification_retry_delay_ms),
        )
    };
    let body = Bytes::from(n.envelope.to_string());
    let mut first_ok = false;
    for copy in 0..n.copies.max(1) {
        let mut tries = 0;
        let mut ok = false;
        let mut last_status = None;
        let mut last_error = None;
        while tries < max_attempts {
            tries += 1;
            let req = Request::builder()
                .method("POST")
                .uri(n.url.as_str())
                .header("Content-Type", "application/json")
                .header("Authorization", format!("Bearer {}", n.auth_token))
                .header("User-Agent", "apple-sim")
                .body(Full::new(body.clone()));
            match req {
                Err(e) => {
                    last_error = Some(e.to_string());
                    break;
                }
                Ok(req) => {
                    match tokio::time::timeout(Duration::from_secs(5), shared.client.request(req))
                        .await
                    {
                        Ok(Ok(resp)) => {
                            let status = resp.status().as_u16();
                            let _ = resp.into_body().collect().await;
                            last_status = Some(status);
                            if (200..300).contains(&status) {
                                ok = true;
                                break;
                            }
                        }
                        Ok(Err(e)) => last_error = Some(e.to_string()),
                        Err(_) => last_error = Some("timeout".into()),
                    }
                }
            }
            if tries < max_attempts {
                tokio::time::sleep(pause).await;
            }
        }
        if copy == 0 {
            first_ok = ok;
        }
        shared.lock().record_notification(NotificationRecord {
            time: Utc::now(),
            url: n.url.clone(),
            location_uid: n.location_uid.clone(),
            notification_id: n.notification_id.clone(),
            notification_type: n.notification_type.clone(),
            envelope: n.envelope.clone(),
            attempts: tries,
            delivered: ok,
            last_status,
            last_error,
        });
    }
    first_ok
}

// ---------------------------------------------------------------------------------------------
// Control API
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::Many(v) => v,
            OneOrMany::One(t) => vec![t],
        }
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, (u16, Value)> {
    let body: &[u8] = if body.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| (400, json!({"error": format!("bad JSON: {e}")})))
}

fn bad(e: anyhow::Error) -> (u16, Value) {
    (404, json!({"error": e.to_string()}))
}

fn ok_empty() -> (u16, Value) {
    (200, json!({"ok": true}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssetCountChange {
    adam_id: String,
    #[serde(default)]
    pricing_param: Option<String>,
    delta: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenState {
    #[serde(default)]
    exp_date: Option<DateTime<Utc>>,
    #[serde(default)]
    revoked: Option<bool>,
}

/// Merges a partial JSON object into the config.
pub(crate) fn merge_config(cfg: &SimConfig, patch: &Value) -> Result<SimConfig, String> {
    fn merge(a: &mut Value, b: &Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b.clone(),
        }
    }
    let mut cur = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    merge(&mut cur, patch);
    serde_json::from_value(cur).map_err(|e| e.to_string())
}

fn control(
    shared: &Arc<Shared>,
    method: &str,
    rest: &str,
    query: &[(String, String)],
    body: &[u8],
) -> (u16, Value) {
    match control_inner(shared, method, rest, query, body) {
        Ok(v) => v,
        Err(e) => e,
    }
}

fn control_inner(
    shared: &Arc<Shared>,
    method: &str,
    rest: &str,
    query: &[(String, String)],
    body: &[u8],
) -> Result<(u16, Value), (u16, Value)> {
    let segs: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let q = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut m = shared.lock();
    let to_json =
        |v: Result<Value, serde_json::Error>| v.map_err(|e| (500, json!({"error": e.to_string()})));
    Ok(match (method, segs.as_slice()) {
        ("GET", ["config"]) => (200, to_json(serde_json::to_value(&m.config))?),
        ("POST", ["config"]) | ("PATCH", ["config"]) => {
            let patch: Value = parse(body)?;
            let cfg = merge_config(&m.config, &patch).map_err(|e| (400, json!({"error": e})))?;
            m.config = cfg;
            (200, to_json(serde_json::to_value(&m.config))?)
        }
        ("POST", ["reset"]) => {
            m.reset();
            ok_empty()
        }
        ("GET", ["locations"]) => (
            200,
            json!(m
                .locations
                .iter()
                .map(
                    |l| json!({"uId": l.uid, "token": l.token, "orgName": l.org_name,
                    "locationName": l.location_name, "mdmInfo": l.mdm_info})
                )
                .collect::<Vec<_>>()),
        ),
        ("POST", ["locations"]) => {
            let spec: LocationSpec = parse(body)?;
            let token = m.add_location(spec);
            let uid = m.location(&token).map(|l| l.uid.clone());
            (200, json!({"token": token, "uId": uid}))
        }
        ("GET", ["locations", key]) => (
            200,
            to_json(serde_json::to_value(m.location_state(key).map_err(bad)?))?,
        ),
        ("POST", ["locations", key, "assets"]) => {
            let specs: OneOrMany<AssetSpec> = parse(body)?;
            m.add_assets(key, specs.into_vec()).map_err(bad)?;
            ok_empty()
        }
        ("POST", ["locations", key, "assignments"]) => {
            let specs: OneOrMany<AssignmentSpec> = parse(body)?;
            m.add_assignments(key, specs.into_vec()).map_err(bad)?;
            ok_empty()
        }
        ("DELETE", ["locations", key, "assignments"]) => {
            let specs: OneOrMany<AssignmentSpec> = parse(body)?;
            m.remove_assignments(key, specs.into_vec()).map_err(bad)?;
            ok_empty()
        }
        ("POST", ["locations", key, "users"]) => {
            let specs: OneOrMany<UserSpec> = parse(body)?;
            m.add_users(key, specs.into_vec()).map_err(bad)?;
            ok_empty()
        }
        ("POST", ["locations", key, "users", user, "associate"]) => {
            let notes = m.associate_user(key, user).map_err(bad)?;
            drop(m);
            spawn_notifications(shared, notes);
            ok_empty()
        }
        ("POST", ["locations", key, "asset-count"]) => {
            let c: AssetCountChange = parse(body)?;
            let notes = m
                .change_asset_count(
                    key,
                    &c.adam_id,
                    c.pricing_param.as_deref().unwrap_or("STDQ"),
                    c.delta,
                )
                .map_err(bad)?;
            drop(m);
            spawn_notifications(shared, notes);
            ok_empty()
        }
        ("POST", ["locations", key, "faults"]) => {
            let specs: OneOrMany<FaultSpec> = parse(body)?;
            for f in specs.into_vec() {
                m.add_fault(Some(key), f).map_err(bad)?;
            }
            ok_empty()
        }
        ("DELETE", ["locations", key, "faults"]) => {
            m.clear_faults(Some(key)).map_err(bad)?;
            ok_empty()
        }
        ("POST", ["faults"]) => {
            let specs: OneOrMany<FaultSpec> = parse(body)?;
            for f in specs.into_vec() {
                m.add_fault(None, f).map_err(bad)?;
            }
            ok_empty()
        }
        ("DELETE", ["faults"]) => {
            m.clear_faults(None).map_err(bad)?;
            ok_empty()
        }
        ("POST", ["locations", key, "take-over"]) => {
            let t: TakeOver = parse(body)?;
            m.take_over(key, t).map_err(bad)?;
            ok_empty()
        }
        ("POST", ["locations", key, "token"]) => {
            let t: TokenState = parse(body)?;
            m.set_token_state(key, t.exp_date, t.revoked).map_err(bad)?;
            ok_empty()
        }
        ("GET", ["calls"]) => {
            let filter = q("location").or_else(|| q("uId")).or_else(|| q("token"));
            let uid = filter
                .as_deref()
                .and_then(|k| m.location(k).map(|l| l.uid.clone()));
            let calls: Vec<&CallRecord> = m
                .calls
                .iter()
                .filter(|c| filter.is_none() || (uid.is_some() && c.location_uid == uid))
                .collect();
            (200, to_json(serde_json::to_value(calls))?)
        }
        ("DELETE", ["calls"]) => {
            m.calls.clear();
            ok_empty()
        }
        ("GET", ["notifications"]) => (200, to_json(serde_json::to_value(&m.notifications))?),
        ("DELETE", ["notifications"]) => {
            m.notifications.clear();
            ok_empty()
        }
        ("GET", ["events"]) => (
            200,
            to_json(serde_json::to_value(m.events.values().collect::<Vec<_>>()))?,
        ),
        ("GET", ["events", id]) => match m.events.get(*id) {
            Some(e) => (200, to_json(serde_json::to_value(e))?),
            None => (404, json!({"error": "unknown event"})),
        },
        ("POST", ["events", "flush"]) => {
            let notes = m.flush_events();
            drop(m);
            spawn_notifications(shared, notes);
            ok_empty()
        }
        _ => (
            404,
            json!({"error": format!("no control route {method} /control{rest}")}),
        ),
    })
}
