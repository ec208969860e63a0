//! Running components: the HTTP trigger (`crates/trigger-http`), outbound HTTP dispatch
//! (`crates/factor-outbound-http/src/wasi.rs`, `trigger-http/src/outbound_http.rs`) and the cron
//! trigger. Every request or tick gets a fresh instance, as Spin does for WASIp2 components.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme as WasiScheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks, WasiHttpView};

use crate::host::cron_bindings::{fermyon::spin_cron::cron_types, SpinCronPre};
use crate::host::{HostState, OutboundHooks, TriggerKind};
use crate::outbound::{self, Outbound};
use crate::routes::{self, RouteMatch, WELL_KNOWN_PREFIX};
use crate::AppInner;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The client address Spin reports for chained requests.
const CHAINED_CLIENT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

fn empty(status: StatusCode) -> Response<Vec<u8>> {
    let mut r = Response::new(Vec::new());
    *r.status_mut() = status;
    r
}

/// The HTTP trigger's entry point: well-known paths, routing, then the component.
pub fn handle(
    app: Arc<AppInner>,
    mut req: Request<Vec<u8>>,
    client: SocketAddr,
) -> BoxFuture<anyhow::Result<Response<Vec<u8>>>> {
    Box::pin(async move {
        // Spin's strip_forbidden_headers: a Host naming *.spin.internal never reaches a guest.
        let chaining_host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| outbound::service_chaining_target(h).is_some());
        if chaining_host {
            req.headers_mut().remove(HOST);
        }

        let path = req.uri().path().to_string();
        if let Some(well_known) = path.strip_prefix(WELL_KNOWN_PREFIX) {
            return Ok(match well_known {
                "health" => Response::new(b"OK".to_vec()),
                "info" => {
                    let body = serde_json::to_vec_pretty(&serde_json::json!({
                        "name": app.manifest.name,
                        "version": app.manifest.version,
                        "description": app.manifest.description,
                    }))?;
                    let mut r = Response::new(body);
                    r.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/json"));
                    r
                }
                _ => empty(StatusCode::NOT_FOUND),
            });
        }

        let Some(route) = app.router.route(&path) else {
            return Ok(empty(StatusCode::NOT_FOUND));
        };
        Ok(execute(app, route, req, client).await)
    })
}

/// Run the matched component; any failure of the guest is a 500 with an empty body.
fn execute(
    app: Arc<AppInner>,
    route: RouteMatch,
    req: Request<Vec<u8>>,
    client: SocketAddr,
) -> BoxFuture<Response<Vec<u8>>> {
    Box::pin(async move {
        let component = route.component.clone();
        match execute_inner(app, route, req, client).await {
            Ok(resp) => resp,
            Err(e) => {
                eprintln!("spin-host: error processing request for component {component:?}: {e:?}");
                empty(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    })
}

async fn execute_inner(
    app: Arc<AppInner>,
    route: RouteMatch,
    req: Request<Vec<u8>>,
    client: SocketAddr,
) -> anyhow::Result<Response<Vec<u8>>> {
    let loaded = app
        .components
        .get(&route.component)
        .with_context(|| format!("unknown component {:?}", route.component))?;
    let (mut parts, body) = req.into_parts();

    // The authority, as Spin's set_req_uri: the Host header, else the URI's authority.
    let host_header = parts
        .headers
        .get(HOST)
        .map(|h| h.to_str().map(str::to_string))
        .transpose()
        .context("'Host' header is not valid UTF-8")?;
    let authority = match (&host_header, parts.uri.authority()) {
        (Some(h), Some(a)) if h.as_str() != a.as_str() => {
            anyhow::bail!("authority in 'Host' header does not match authority in URI")
        }
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.to_string(),
        // Library callers may omit Host; a real HTTP/1.1 client never does.
        (None, None) => "localhost".to_string(),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());

    // Original headers (non-UTF-8 values fail the request, as in Spin) plus spin-*.
    for (name, value) in parts.headers.iter() {
        value
            .to_str()
            .with_context(|| format!("header {name} is not valid UTF-8"))?;
    }
    let host_for_url = host_header.as_deref().unwrap_or("localhost");
    for (k, v) in routes::spin_headers(&route, "http", host_for_url, &path_and_query, client) {
        parts.headers.insert(
            http::HeaderName::from_bytes(k.as_bytes())?,
            HeaderValue::from_str(&v)?,
        );
    }
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path_and_query.as_str())
        .build()?;
    let hyper_req = Request::from_parts(parts, full_body(body));

    let mut store = Store::new(
        &app.engine,
        HostState::new(app.clone(), loaded.env.clone(), TriggerKind::Http),
    );
    set_deadline(&app, &mut store);
    HostState::meter(&mut store);
    let pre = ProxyPre::new(loaded.pre.clone()).map_err(anyhow::Error::from)?;
    let proxy = pre
        .instantiate_async(&mut store)
        .await
        .map_err(anyhow::Error::from)?;
    let req_res = store
        .data_mut()
        .http()
        .new_incoming_request(WasiScheme::Http, hyper_req)
        .map_err(anyhow::Error::from)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let out = store
        .data_mut()
        .http()
        .new_response_outparam(tx)
        .map_err(anyhow::Error::from)?;

    // The guest keeps running (writing the body) after it hands over the response head.
    let limit = app.invocation_limit;
    let task = tokio::spawn(async move {
        let call = proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, req_res, out);
        within_limit(limit, call).await
    });

    let resp = match rx.await {
        Ok(Ok(resp)) => resp,
        Ok(Err(code)) => anyhow::bail!("guest returned error code {code:?}"),
        Err(_) => {
            let result = task.await;
            return Err(match result {
                Ok(Err(trap)) => trap.context("guest failed before sending a response"),
                Ok(Ok(())) => anyhow!("guest returned without sending a response"),
                Err(join) => anyhow!("guest task failed: {join}"),
            });
        }
    };
    let (head, body) = resp.into_parts();
    let collected = body.collect().await;
    let body = match collected {
        Ok(c) => c.to_bytes().to_vec(),
        Err(e) => {
            let trap = task.await.ok().and_then(Result::err);
            return Err(anyhow!("response body failed: {e}; guest: {trap:?}"));
        }
    };
    if let Ok(Err(trap)) = task.await {
        eprintln!("spin-host: guest failed after sending its response: {trap:?}");
    }
    Ok(Response::from_parts(head, body))
}

/// Invoke a cron component's `handle-cron-event` once.
pub async fn run_cron(
    app: Arc<AppInner>,
    component_id: &str,
    timestamp: u64,
) -> anyhow::Result<Result<(), String>> {
    let loaded = app
        .components
        .get(component_id)
        .with_context(|| format!("unknown component {component_id:?}"))?;
    if app.platform == crate::Platform::ManagedCloud {
        anyhow::bail!("this platform has no cron trigger");
    }
    let mut store = Store::new(
        &app.engine,
        HostState::new(app.clone(), loaded.env.clone(), TriggerKind::Cron),
    );
    set_deadline(&app, &mut store);
    HostState::meter(&mut store);
    let pre = SpinCronPre::new(loaded.pre.clone())
        .map_err(anyhow::Error::from)
        .with_context(|| format!("component {component_id:?} is not a cron component"))?;
    let instance = pre
        .instantiate_async(&mut store)
        .await
        .map_err(anyhow::Error::from)?;
    let result = within_limit(
        app.invocation_limit,
        instance.call_handle_cron_event(&mut store, cron_types::Metadata { timestamp }),
    )
    .await?;
    Ok(result.map_err(|e| match e {
        cron_types::Error::Other(m) => m,
    }))
}

// ---- the invocation time limit ----

/// With a limit, a guest that computes past it traps at its next epoch check.
fn set_deadline(app: &AppInner, store: &mut Store<HostState>) {
    if let Some(limit) = app.invocation_limit {
        let ticks = limit.as_millis() / crate::compile::EPOCH_TICK.as_millis().max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX).max(1));
        store.epoch_deadline_trap();
    }
}

/// Run a guest call; past the limit it is dropped where it waits (a host call, outbound HTTP),
/// which ends the instance, as the managed platforms end an invocation that runs too long.
async fn within_limit<T>(
    limit: Option<std::time::Duration>,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> anyhow::Result<T> {
    match limit {
        None => call.await.map_err(anyhow::Error::from),
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map_err(anyhow::Error::from),
            Err(_) => Err(anyhow!("invocation exceeded the time limit of {limit:?}")),
        },
    }
}

// ---- outbound HTTP ----

fn full_body(bytes: Vec<u8>) -> WasiBody {
    Full::new(Bytes::from(bytes))
        .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} })
        .boxed_unsync()
}

type SendResult = wasmtime_wasi_http::Result<(
    Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let app = self.app.clone();
        let component = self.component.clone();
        let trigger = self.trigger;
        Box::new(
            async move { send(app, &component.allowed_hosts, trigger, request, options).await },
        )
    }
}

async fn collect_request(req: Request<WasiBody>) -> wasmtime_wasi_http::Result<Request<Vec<u8>>> {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await?.to_bytes().to_vec();
    Ok(Request::from_parts(parts, bytes))
}

fn into_send_result(resp: Response<Vec<u8>>) -> SendResult {
    let io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> =
        Box::new(async { Ok(()) });
    Ok((resp.map(full_body), io))
}

async fn send(
    app: Arc<AppInner>,
    allowed: &outbound::AllowedHosts,
    trigger: TriggerKind,
    mut request: Request<WasiBody>,
    options: Option<RequestOptions>,
) -> SendResult {
    use wasmtime_wasi_http::Error;

    // wasmtime-wasi-http fills in a scheme and an empty host for relative URLs; undo that,
    // as Spin does, so they read as self-requests.
    if request
        .uri()
        .authority()
        .is_some_and(|a| a.host().is_empty())
    {
        let pq = request.uri().path_and_query().cloned();
        let mut b = Uri::builder();
        if let Some(pq) = pq {
            b = b.path_and_query(pq);
        }
        *request.uri_mut() = b.build().map_err(|_| Error::HttpRequestUriInvalid)?;
    }

    let Some(decision) = outbound::classify(request.uri(), allowed) else {
        return Err(Error::HttpRequestDenied);
    };

    match decision {
        Outbound::SelfRequest => {
            // Only the HTTP trigger sets a self-request origin in Spin.
            if trigger != TriggerKind::Http {
                return Err(Error::HttpRequestUriInvalid);
            }
            let origin = app
                .self_origin
                .lock()
                .ok()
                .and_then(|o| *o)
                .map(|a| a.to_string())
                .unwrap_or_else(|| "localhost".to_string());
            let pq = request
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".to_string());
            let mut req = collect_request(request).await?;
            *req.uri_mut() = pq.parse().map_err(|_| Error::HttpRequestUriInvalid)?;
            req.headers_mut().insert(
                HOST,
                HeaderValue::from_str(&origin).map_err(|_| Error::HttpRequestUriInvalid)?,
            );
            let client: SocketAddr = ([127, 0, 0, 1], 0).into();
            let resp = handle(app, req, client)
                .await
                .map_err(|e| Error::InternalError(Some(format!("{e:#}"))))?;
            into_send_result(resp)
        }
        Outbound::Chain(target) => {
            if trigger != TriggerKind::Http || app.platform == crate::Platform::ManagedCloud {
                // No service chaining on the managed clouds either.
                // Spin installs the chaining interceptor only for the HTTP trigger; elsewhere
                // `*.spin.internal` goes to DNS, which does not know it.
                return Err(Error::DnsError {
                    rcode: Some("address not available".to_string()),
                    info_code: Some(0),
                });
            }
            if !app.http_components.contains(&target) || !app.components.contains_key(&target) {
                return Err(Error::InternalError(Some(format!(
                    "unknown routing destination '{target}'"
                ))));
            }
            request.headers_mut().remove(HOST);
            let path = request.uri().path().to_string();
            let req = collect_request(request).await?;
            let resp = execute(
                app,
                RouteMatch::synthetic(&target, &path),
                req,
                CHAINED_CLIENT_ADDR,
            )
            .await;
            into_send_result(resp)
        }
        Outbound::Network => {
            // Spin's client sets Host from the URI; the bare hyper connection used here does
            // not, so set it explicitly.
            if let Some(a) = request.uri().authority() {
                let v =
                    HeaderValue::from_str(a.as_str()).map_err(|_| Error::HttpRequestUriInvalid)?;
                request.headers_mut().insert(HOST, v);
            }
            let (resp, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            let io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> = Box::new(io);
            Ok((resp.map(|b| b.boxed_unsync()), io))
        }
    }
}
