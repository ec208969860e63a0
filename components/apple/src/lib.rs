//! The apple component: the only one that calls Apple and the only one given the key that
//! unseals server tokens. Reached by service chaining (private route) or, on platforms without
//! it, through a public route guarded by `internal_secret`. Its internal API is described in
//! docs/architecture.md; the other components use it through `vpp_spin_bridge::GatewayTransport`.

mod proxy;

use spin_sdk::http::{Request, Response};
use spin_sdk::http_component;
use vpp_licensing::auth::constant_time_eq;
use vpp_licensing::{ApiError, ErrorCode};
use vpp_spin_bridge::gateway::INTERNAL_SECRET_HEADER;
use vpp_spin_bridge::{vars, ApiRequest, ApiResponse, SpinKv};

/// Where the internal API is mounted when reached through a public route instead of chaining.
const PUBLIC_PREFIX: &str = "/internal/apple";

#[http_component]
async fn handle(req: Request) -> Response {
    let mut api = ApiRequest::from_spin(&req);
    drop(req);
    let result = match authorize(&mut api) {
        Ok(()) => route(&api).await,
        Err(e) => Err(e),
    };
    result
        .unwrap_or_else(|e| ApiResponse::error(&e))
        .into_spin()
}

/// Service chaining needs no secret (only components of this app can chain). A request that came
/// through the public route must carry `internal_secret`, and the route only works when one is set.
fn authorize(api: &mut ApiRequest) -> Result<(), ApiError> {
    let Some(rest) = api.path.strip_prefix(PUBLIC_PREFIX) else {
        return Ok(());
    };
    let rest = if rest.is_empty() { "/" } else { rest }.to_string();
    let secret = vars::optional("internal_secret").ok_or_else(ApiError::unauthorized)?;
    let presented = api.header(INTERNAL_SECRET_HEADER).unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), secret.as_bytes()) {
        return Err(ApiError::unauthorized());
    }
    api.path = rest;
    Ok(())
}

async fn route(req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments = req.segments();
    if let ("GET", ["health"]) = (req.method.as_str(), segments.as_slice()) {
        return Ok(health());
    }
    let kv = SpinKv::open().map_err(ApiError::store)?;
    let ctx = proxy::Ctx::load(kv)?;
    match (req.method.as_str(), segments.as_slice()) {
        ("POST", ["tokens", "inspect"]) => ctx.inspect(req).await,
        ("GET", ["service-config"]) => ctx.service_config_response().await,
        ("GET", ["metadata"]) => ctx.metadata(req).await,
        ("DELETE", ["accounts", account]) => ctx.forget(account),
        ("GET", ["accounts", account, "lookup"]) => ctx.lookup(account, req).await,
        (_, ["accounts", account, "mdm", "v2", rest @ ..]) => {
            ctx.forward(account, &rest.join("/"), req).await
        }
        _ => Err(ApiError::no_route(&req.method, &req.path)),
    }
}

fn health() -> ApiResponse {
    let seal = vars::required("token_seal_key").and_then(|k| {
        vpp_seal::SealKey::from_base64(&k)
            .map_err(|e| ApiError::new(ErrorCode::Misconfigured, e.to_string()))
    });
    let origin = vars::required("apple_base_url");
    let ok = seal.is_ok() && origin.is_ok();
    ApiResponse::ok(&serde_json::json!({
        "reachable": true,
        "ok": ok,
        "sealKey": match &seal { Ok(_) => "valid".to_string(), Err(e) => e.message.clone() },
        "appleBaseUrl": origin.ok(),
    }))
}
